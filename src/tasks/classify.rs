//! SNLI-VE (`VE.py`) and NLVR2 (`NLVR.py`): fine-tune a classifier over fused image-text states
//! and report accuracy per split, with per-example predictions.

use crate::checkpoint::Task;
use crate::config::TaskConfig;
use crate::data::classify::{ClassifyDataset, ClassifySample, Format};
use crate::data::loader::{Dataset, Loader, LoaderConfig};
use crate::data::retrieval::{check_images_exist, ImageRef};
use crate::data::{Padding, Tokenizer};
use crate::eval::retrieval::Metrics;
use crate::model::{ClassifierKind, ClassifierModel};
use crate::tasks::{default_teacher_init, load_checkpoint, RunOptions, TaskModel, TeacherInit};
use crate::train::fit::{fit, load_best, prefixed, print_metrics, FitConfig, FitEnd};
use crate::train::optim::AdamW;
use crate::train::run::RunDir;
use crate::train::{LoopConfig, Progress};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;

/// The options of `albef ve` / `albef nlvr` (the reference scripts' flags).
#[derive(Clone, Debug)]
pub struct ClassifyOptions {
    pub task: Task,
    pub run: RunOptions,
    /// NLVR2: initialise the teacher from the loaded weights instead of the reference's quirk.
    pub teacher_from_checkpoint: bool,
}

fn kind_and_format(task: Task) -> Result<(ClassifierKind, Format)> {
    match task {
        Task::Ve => Ok((ClassifierKind::VisualEntailment, Format::SnliVe)),
        Task::Nlvr => Ok((ClassifierKind::Nlvr2, Format::Nlvr2)),
        other => anyhow::bail!("{other:?} is not a classification task"),
    }
}

/// Images of a batch as the model takes them: (B, 3, R, R), or for NLVR2 all first images then
/// all second images (2B, 3, R, R).
fn batch_images(batch: &[ClassifySample], res: usize, dev: &Device) -> Result<Tensor> {
    let per = batch.first().map_or(1, |s| s.pixels.len());
    let mut flat = Vec::with_capacity(batch.len() * per * 3 * res * res);
    for slot in 0..per {
        for s in batch {
            flat.extend_from_slice(&s.pixels[slot]);
        }
    }
    Ok(Tensor::from_vec(flat, (batch.len() * per, 3, res, res), dev)?)
}

fn batch_text(tokenizer: &Tokenizer, batch: &[ClassifySample], dev: &Device) -> Result<(Tensor, Tensor)> {
    let sentences: Vec<&str> = batch.iter().map(|s| s.sentence.as_str()).collect();
    Ok(tokenizer.encode_batch(&sentences, Padding::Longest { truncate_to: None }).to_tensors(dev)?)
}

/// Accuracy on a split and the predicted class of every example.
pub fn evaluate(
    model: &ClassifierModel,
    split: Arc<ClassifyDataset>,
    tokenizer: &Tokenizer,
    batch_size: usize,
    workers: Option<usize>,
    name: &str,
) -> Result<(Metrics, Vec<i64>)> {
    let dev = model.store.device().clone();
    let res = model.cfg.vision.image_res;
    let cfg = LoaderConfig::eval(batch_size).workers(workers);
    let loader = Loader::new(split.clone(), cfg);
    let progress = Progress::new(&format!("Evaluation ({name})"), loader.num_batches(0));
    let (mut preds, mut correct) = (Vec::with_capacity(split.len()), 0usize);
    for (i, batch) in loader.epoch(0, 0).enumerate() {
        let batch = batch?;
        let (ids, mask) = batch_text(tokenizer, &batch, &dev)?;
        let logits = model.logits(&batch_images(&batch, res, &dev)?, &ids, &mask)?;
        for (p, s) in logits.argmax(1)?.to_vec1::<u32>()?.into_iter().zip(&batch) {
            correct += (p as i64 == s.label) as usize;
            preds.push(p as i64);
        }
        progress.step(i, String::new);
    }
    progress.finish();
    let mut m = Metrics::new();
    m.insert("acc".into(), 100.0 * correct as f64 / split.len().max(1) as f64);
    Ok((m, preds))
}

fn write_predictions(run: &RunDir, name: &str, split: &ClassifyDataset, preds: &[i64], format: Format) -> Result<()> {
    let classes = format.class_names();
    let rows: Vec<serde_json::Value> = split
        .examples
        .iter()
        .zip(preds)
        .enumerate()
        .map(|(i, (e, &p))| {
            json!({"index": i, "images": e.images.iter().map(|im| im.path.display().to_string()).collect::<Vec<_>>(),
                   "sentence": e.sentence, "label": classes[e.label as usize], "prediction": classes[p as usize]})
        })
        .collect();
    run.write_json(&format!("predictions_{name}.json"), &serde_json::Value::Array(rows))
}

pub fn run(opts: &ClassifyOptions) -> Result<serde_json::Value> {
    let (kind, format) = kind_and_format(opts.task)?;
    let cfg = TaskConfig::from_yaml_file(&opts.run.config)?;
    // NLVR.yaml has one `batch_size`; VE.yaml has train/test sizes.
    let (train_bs_key, test_bs_key) = if cfg.extra.contains_key("batch_size") {
        ("batch_size", "batch_size")
    } else {
        ("batch_size_train", "batch_size_test")
    };
    let mut required = vec!["val_file", "test_file", "image_root", "image_res", test_bs_key];
    if !opts.run.evaluate {
        required.extend(["train_file", train_bs_key, "optimizer", "schedular", "alpha"]);
    }
    cfg.require(&opts.run.config, &required)?;
    let model_cfg = cfg.model_config()?;
    let res = model_cfg.vision.image_res;
    let image_root = PathBuf::from(cfg.str("image_root")?);
    let tokenizer = Tokenizer::from_path(&opts.run.text_encoder)?;
    let files = |key: &str| -> Result<Vec<PathBuf>> { cfg.strings(key)?.iter().map(|p| cfg.resolve(p)).collect() };
    let val = Arc::new(ClassifyDataset::new(&files("val_file")?, &image_root, format, res, false)?);
    let test = Arc::new(ClassifyDataset::new(&files("test_file")?, &image_root, format, res, false)?);
    let train = if opts.run.evaluate {
        None
    } else {
        Some(Arc::new(ClassifyDataset::new(&files("train_file")?, &image_root, format, res, true)?))
    };
    let mut images: Vec<&ImageRef> = val.images().chain(test.images()).collect();
    if let Some(t) = &train {
        images.extend(t.images());
    }
    check_images_exist(images)?;

    let task_model = TaskModel::new(opts.task, &model_cfg, &opts.run.device, opts.run.seed)?;
    if let Some(ckpt) = &opts.run.checkpoint {
        let teacher =
            if opts.teacher_from_checkpoint { TeacherInit::FromLoaded } else { default_teacher_init(opts.task) };
        eprint!("{}", load_checkpoint(&task_model, opts.task, &model_cfg, ckpt, opts.run.evaluate, teacher)?);
    }
    let TaskModel::Classifier(model) = task_model else { unreachable!("{kind:?} builds a classifier") };
    let run_dir = RunDir::create(&opts.run.output_dir)?;
    run_dir.write_text("config.yaml", &serde_norway::to_string(&cfg)?)?;
    let batch_test = cfg.usize(test_bs_key)?;
    let task_name = format!("{:?}", opts.task).to_lowercase();

    let finish = |run_dir: &RunDir, val_m: Metrics, epoch_record: Option<usize>| -> Result<serde_json::Value> {
        let (test_m, preds) = evaluate(&model, test.clone(), &tokenizer, batch_test, opts.run.workers, "test")?;
        print_metrics("test", &test_m);
        write_predictions(run_dir, "test", &test, &preds, format)?;
        let mut record = prefixed("val", &val_m);
        record.extend(prefixed("test", &test_m));
        if let Some(e) = epoch_record {
            record.insert("best_epoch".into(), json!(e));
        }
        run_dir.log(&serde_json::Value::Object(record))?;
        let out = json!({"val": val_m, "test": test_m});
        run_dir.write_json("metrics.json", &out)?;
        Ok(out)
    };

    if opts.run.evaluate {
        let (val_m, preds) = evaluate(&model, val.clone(), &tokenizer, batch_test, opts.run.workers, "val")?;
        print_metrics("val", &val_m);
        write_predictions(&run_dir, "val", &val, &preds, format)?;
        return finish(&run_dir, val_m, None);
    }
    let train = train.expect("built when training");
    let loop_cfg = LoopConfig::from_config(&cfg, opts.run.seed)?;
    let mut optimizer = AdamW::from_config(&model.store, &cfg)?;
    let loader_cfg = LoaderConfig::train(cfg.usize(train_bs_key)?, opts.run.seed).workers(opts.run.workers);
    let loader = Loader::new(train.clone(), loader_cfg);
    let dev = opts.run.device.clone();
    let fit_cfg = FitConfig {
        run: &run_dir,
        loop_cfg: &loop_cfg,
        resume: opts.run.resume,
        task: &task_name,
        epochs: loop_cfg.schedule.epochs,
        stop_after_epoch: opts.run.stop_after_epoch,
        select: Some("acc"),
    };
    let end = fit(
        &fit_cfg,
        &model.store,
        &mut optimizer,
        &loader,
        |batch: Vec<ClassifySample>, alpha, _rng| {
            let (ids, mask) = batch_text(&tokenizer, &batch, &dev)?;
            let targets = Tensor::from_vec(batch.iter().map(|s| s.label).collect::<Vec<i64>>(), batch.len(), &dev)?;
            Ok(vec![(
                "loss",
                model.forward_train(&batch_images(&batch, res, &dev)?, &ids, &mask, &targets, alpha, true)?,
            )])
        },
        |_| Ok(Some(evaluate(&model, val.clone(), &tokenizer, batch_test, opts.run.workers, "val")?.0)),
    )?;
    match end {
        FitEnd::Stopped(n) => Ok(json!({"stopped_after_epoch": n})),
        FitEnd::Finished { state, best_val } => {
            load_best(&run_dir, &model.store)?;
            let val_m = best_val.context("validation ran every epoch")?;
            finish(&run_dir, val_m, state.best_epoch)
        }
    }
}
