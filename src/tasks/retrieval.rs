//! Image-text retrieval (`Retrieval.py`): fine-tune with ITC + ITM, evaluate with the ITC top-k
//! re-ranked by ITM, on Flickr30K / COCO layouts; zero-shot is evaluating any checkpoint on
//! another dataset's config.

use crate::checkpoint::Task;
use crate::config::TaskConfig;
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::retrieval::{check_images_exist, ImageRef, RetrievalEval, RetrievalTrain, TrainSample};
use crate::data::{Padding, Tokenizer};
use crate::eval::retrieval::{itm_eval, score_matrices, Encoded, Metrics, Scores};
use crate::model::ContrastiveModel;
use crate::tasks::{load_checkpoint, RunOptions, TaskModel, TeacherInit};
use crate::train::fit::{fit, load_best, prefixed, print_metrics, FitConfig, FitEnd};
use crate::train::optim::AdamW;
use crate::train::run::RunDir;
use crate::train::{LoopConfig, Progress};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;

/// Everything `albef retrieval` takes.
#[derive(Clone, Debug)]
pub struct RetrievalOptions {
    pub run: RunOptions,
    /// Also write `scores_<split>.safetensors`.
    pub save_scores: bool,
}

const TEXT_MAX_WORDS: usize = 30;
const EVAL_TEXT_LEN: usize = 30;
const EVAL_TEXT_BATCH: usize = 256;

fn paths(cfg: &TaskConfig, key: &str) -> Result<Vec<PathBuf>> {
    cfg.strings(key)?.iter().map(|p| cfg.resolve(p)).collect()
}

/// Encodes a split and scores it (§4).
pub fn evaluate_split(
    model: &ContrastiveModel,
    split: Arc<RetrievalEval>,
    tokenizer: &Tokenizer,
    batch_size: usize,
    k_test: usize,
    workers: Option<usize>,
    name: &str,
) -> Result<(Metrics, Scores, Scores)> {
    let dev = model.store.device().clone();
    let res = model.cfg.vision.image_res;
    let mut text_feats = Vec::new();
    let mut text_masks = Vec::new();
    let mut text_embeds = Vec::new();
    for chunk in split.texts.chunks(EVAL_TEXT_BATCH) {
        let (ids, mask) = tokenizer.encode_batch(chunk, Padding::MaxLength(EVAL_TEXT_LEN)).to_tensors(&dev)?;
        let (feats, embeds) = model.encode_text(&ids, &mask)?;
        text_feats.push(feats);
        text_masks.push(mask);
        text_embeds.push(embeds);
    }
    let cfg = LoaderConfig::eval(batch_size).workers(workers);
    let loader = Loader::new(split.clone(), cfg);
    let progress = Progress::new(&format!("Evaluation ({name}) images"), loader.num_batches(0));
    let (mut image_feats, mut image_embeds) = (Vec::new(), Vec::new());
    for (i, batch) in loader.epoch(0, 0).enumerate() {
        let batch = batch?;
        let images = stack_images(&batch, res, &dev)?;
        let (feats, embeds) = model.encode_image(&images)?;
        image_feats.push(feats);
        image_embeds.push(embeds);
        progress.step(i, String::new);
    }
    progress.finish();
    let enc = Encoded {
        image_feats: Tensor::cat(&image_feats, 0)?,
        image_embeds: Tensor::cat(&image_embeds, 0)?,
        text_feats: Tensor::cat(&text_feats, 0)?,
        text_mask: Tensor::cat(&text_masks, 0)?,
        text_embeds: Tensor::cat(&text_embeds, 0)?,
    };
    let (i2t, t2i) = score_matrices(model, &enc, k_test)?;
    let metrics = itm_eval(&i2t, &t2i, &split.txt2img, &split.img2txt);
    Ok((metrics, i2t, t2i))
}

pub fn stack_images(batch: &[Vec<f32>], res: usize, dev: &Device) -> Result<Tensor> {
    let flat: Vec<f32> = batch.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (batch.len(), 3, res, res), dev)?)
}

fn save_scores(run: &RunDir, split: &str, i2t: &Scores, t2i: &Scores) -> Result<()> {
    let mut sd = crate::checkpoint::StateDict::new();
    sd.insert("score_i2t".into(), Tensor::new(i2t.clone(), &Device::Cpu)?);
    sd.insert("score_t2i".into(), Tensor::new(t2i.clone(), &Device::Cpu)?);
    crate::checkpoint::save_safetensors(&sd, &Default::default(), &run.file(&format!("scores_{split}.safetensors")))
}

/// Runs `albef retrieval`: trains (unless `evaluate`) and evaluates. Returns the metrics written
/// to `metrics.json`.
pub fn run(opts: &RetrievalOptions) -> Result<serde_json::Value> {
    let cfg = TaskConfig::from_yaml_file(&opts.run.config)?;
    let mut required = vec!["val_file", "test_file", "image_root", "batch_size_test", "k_test", "image_res"];
    if !opts.run.evaluate {
        required.extend(["train_file", "batch_size_train", "optimizer", "schedular", "alpha"]);
    }
    cfg.require(&opts.run.config, &required)?;
    let model_cfg = cfg.model_config()?;
    let res = model_cfg.vision.image_res;
    let image_root = PathBuf::from(cfg.str("image_root")?);
    let k_test = cfg.k_test.context("k_test")?;
    let batch_test = cfg.usize("batch_size_test")?;
    let tokenizer = Tokenizer::from_path(&opts.run.text_encoder)?;
    if tokenizer.vocab_size() != model_cfg.bert.vocab_size {
        anyhow::bail!(
            "the tokenizer in {} has {} tokens but bert_config says vocab_size {}",
            opts.run.text_encoder.display(),
            tokenizer.vocab_size(),
            model_cfg.bert.vocab_size
        );
    }
    // Read every annotation file before creating outputs, so bad input leaves nothing behind.
    let val = Arc::new(RetrievalEval::new(&cfg.resolve(&cfg.str("val_file")?)?, &image_root, res, TEXT_MAX_WORDS)?);
    let test = Arc::new(RetrievalEval::new(&cfg.resolve(&cfg.str("test_file")?)?, &image_root, res, TEXT_MAX_WORDS)?);
    let train = if opts.run.evaluate {
        None
    } else {
        let augment = match cfg.extra.get("train_transform").and_then(|v| v.as_str()).unwrap_or("reference") {
            "reference" => true,
            "resize" => false,
            other => anyhow::bail!("train_transform must be 'reference' or 'resize', not {other:?}"),
        };
        Some(Arc::new(
            RetrievalTrain::new(&paths(&cfg, "train_file")?, &image_root, res, TEXT_MAX_WORDS)?
                .with_augmentation(augment),
        ))
    };
    let mut images: Vec<&ImageRef> = val.images.iter().chain(&test.images).collect();
    if let Some(t) = &train {
        images.extend(t.images());
    }
    check_images_exist(images)?;

    let task_model = TaskModel::new(Task::Retrieval, &model_cfg, &opts.run.device, opts.run.seed)?;
    if let Some(ckpt) = &opts.run.checkpoint {
        let report = load_checkpoint(
            &task_model,
            Task::Retrieval,
            &model_cfg,
            ckpt,
            opts.run.evaluate,
            TeacherInit::FromLoaded,
        )?;
        eprint!("{report}");
    }
    let TaskModel::Contrastive(model) = task_model else { unreachable!("retrieval builds the contrastive model") };
    let run_dir = RunDir::create(&opts.run.output_dir)?;
    run_dir.write_text("config.yaml", &serde_norway::to_string(&cfg)?)?;

    if opts.run.evaluate {
        let mut out = serde_json::Map::new();
        let mut record = serde_json::Map::new();
        for (name, split) in [("val", &val), ("test", &test)] {
            let (m, i2t, t2i) =
                evaluate_split(&model, split.clone(), &tokenizer, batch_test, k_test, opts.run.workers, name)?;
            print_metrics(name, &m);
            if opts.save_scores {
                save_scores(&run_dir, name, &i2t, &t2i)?;
            }
            record.extend(prefixed(name, &m));
            out.insert(name.into(), json!(m));
        }
        record.insert("epoch".into(), json!(0));
        run_dir.log(&serde_json::Value::Object(record))?;
        let out = serde_json::Value::Object(out);
        run_dir.write_json("metrics.json", &out)?;
        return Ok(out);
    }

    let train = train.expect("built when training");
    let loop_cfg = LoopConfig::from_config(&cfg, opts.run.seed)?;
    let mut optimizer = AdamW::from_config(&model.store, &cfg)?;
    let loader_cfg = LoaderConfig::train(cfg.usize("batch_size_train")?, opts.run.seed).workers(opts.run.workers);
    let loader = Loader::new(train.clone(), loader_cfg);
    let dev = opts.run.device.clone();
    let fit_cfg = FitConfig {
        run: &run_dir,
        loop_cfg: &loop_cfg,
        resume: opts.run.resume,
        task: "retrieval",
        epochs: loop_cfg.schedule.epochs,
        stop_after_epoch: opts.run.stop_after_epoch,
        select: Some("r_mean"),
    };
    let end = fit(
        &fit_cfg,
        &model.store,
        &mut optimizer,
        &loader,
        |batch: Vec<TrainSample>, alpha, rng| {
            let pixels: Vec<Vec<f32>> = batch.iter().map(|s| s.pixels.clone()).collect();
            let image = stack_images(&pixels, res, &dev)?;
            let captions: Vec<&str> = batch.iter().map(|s| s.caption.as_str()).collect();
            // `padding='longest', max_length=30` without truncation: max_length has no effect.
            let (ids, mask) =
                tokenizer.encode_batch(&captions, Padding::Longest { truncate_to: None }).to_tensors(&dev)?;
            let idx = Tensor::from_vec(batch.iter().map(|s| s.idx).collect::<Vec<i64>>(), batch.len(), &dev)?;
            let l = model.forward_train(&image, &ids, &mask, Some(&idx), alpha, None, rng, true)?;
            Ok(vec![("ita", l.ita), ("itm", l.itm)])
        },
        |_| Ok(Some(evaluate_split(&model, val.clone(), &tokenizer, batch_test, k_test, opts.run.workers, "val")?.0)),
    )?;
    let (state, best_val) = match end {
        FitEnd::Stopped(n) => return Ok(json!({"stopped_after_epoch": n})),
        FitEnd::Finished { state, best_val } => (state, best_val),
    };
    // Test with the best checkpoint.
    load_best(&run_dir, &model.store)?;
    let best_val = match best_val {
        Some(v) => v,
        None => evaluate_split(&model, val.clone(), &tokenizer, batch_test, k_test, opts.run.workers, "val")?.0,
    };
    let (test_m, i2t, t2i) =
        evaluate_split(&model, test.clone(), &tokenizer, batch_test, k_test, opts.run.workers, "test")?;
    print_metrics("test (best epoch)", &test_m);
    if opts.save_scores {
        save_scores(&run_dir, "test", &i2t, &t2i)?;
    }
    let mut record = prefixed("test", &test_m);
    record.insert("best_epoch".into(), json!(state.best_epoch));
    run_dir.log(&serde_json::Value::Object(record))?;
    let out = json!({"val": best_val, "test": test_m, "best_epoch": state.best_epoch});
    run_dir.write_json("metrics.json", &out)?;
    Ok(out)
}
