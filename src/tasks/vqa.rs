//! VQA (`VQA.py`): fine-tune the answer decoder with distillation, then rank the answer list for
//! every test question; `vqa_result.json` is the file the evaluation server takes, and when the
//! questions have annotator answers, `metrics.json` has the VQA accuracy.

use crate::checkpoint::Task;
use crate::config::TaskConfig;
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::retrieval::{check_images_exist, ImageRef};
use crate::data::vqa::{read_answer_list, VqaDataset, VqaSample};
use crate::data::{Padding, Tokenizer};
use crate::eval::retrieval::Metrics;
use crate::eval::vqa::vqa_accuracy;
use crate::model::VqaModel;
use crate::tasks::{load_checkpoint, RunOptions, TaskModel, TeacherInit};
use crate::train::fit::{fit, print_metrics, FitConfig, FitEnd};
use crate::train::optim::AdamW;
use crate::train::run::RunDir;
use crate::train::{LoopConfig, Progress};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;

fn stack(batch: &[VqaSample], res: usize, dev: &Device) -> Result<Tensor> {
    let flat: Vec<f32> = batch.iter().flat_map(|s| s.pixels.iter().copied()).collect();
    Ok(Tensor::from_vec(flat, (batch.len(), 3, res, res), dev)?)
}

/// Ranks the answer list for every question; returns `[{question_id, answer}]` and, when
/// annotator answers exist, the accuracy.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &VqaModel,
    split: Arc<VqaDataset>,
    tokenizer: &Tokenizer,
    answer_list: &[String],
    eos: &str,
    k_test: usize,
    batch_size: usize,
    workers: Option<usize>,
) -> Result<(Vec<serde_json::Value>, Option<Metrics>)> {
    let dev = model.store.device().clone();
    let res = model.cfg.vision.image_res;
    let with_eos: Vec<String> = answer_list.iter().map(|a| format!("{a}{eos}")).collect();
    let (answer_ids, answer_mask) =
        tokenizer.encode_batch(&with_eos, Padding::Longest { truncate_to: None }).to_tensors(&dev)?;
    let cfg = LoaderConfig::eval(batch_size).workers(workers);
    let loader = Loader::new(split.clone(), cfg);
    let progress = Progress::new("Generate VQA test result", loader.num_batches(0));
    let (mut results, mut acc_sum, mut scored) = (Vec::new(), 0.0, 0usize);
    for (i, batch) in loader.epoch(0, 0).enumerate() {
        let batch = batch?;
        let questions: Vec<&str> = batch.iter().map(|s| s.question.as_str()).collect();
        let (q_ids, q_mask) =
            tokenizer.encode_batch(&questions, Padding::Longest { truncate_to: None }).to_tensors(&dev)?;
        let states = model.question_states(&stack(&batch, res, &dev)?, &q_ids, &q_mask)?;
        let ranking = model.rank_answers(&states, &q_mask, &answer_ids, &answer_mask, k_test)?;
        for (s, ids) in batch.iter().zip(&ranking.ids) {
            let answer = &answer_list[ids[0]];
            results.push(json!({"question_id": s.question_id, "answer": answer}));
            if !s.answers.is_empty() {
                acc_sum += vqa_accuracy(answer, &s.answers);
                scored += 1;
            }
        }
        progress.step(i, String::new);
    }
    progress.finish();
    let metrics = (scored > 0).then(|| {
        let mut m = Metrics::new();
        m.insert("vqa_acc".into(), 100.0 * acc_sum / scored as f64);
        m.insert("questions".into(), scored as f64);
        m
    });
    Ok((results, metrics))
}

pub fn run(opts: &RunOptions) -> Result<serde_json::Value> {
    let cfg = TaskConfig::from_yaml_file(&opts.config)?;
    let mut required = vec!["test_file", "answer_list", "vqa_root", "image_res", "batch_size_test", "k_test"];
    if !opts.evaluate {
        required.extend(["train_file", "batch_size_train", "optimizer", "schedular", "alpha"]);
    }
    cfg.require(&opts.config, &required)?;
    let model_cfg = cfg.model_config()?;
    let res = model_cfg.vision.image_res;
    let vqa_root = PathBuf::from(cfg.str("vqa_root")?);
    let vg_root = cfg.str("vg_root").map(PathBuf::from).unwrap_or_else(|_| vqa_root.clone());
    let eos = cfg.str("eos").unwrap_or_else(|_| "[SEP]".into());
    let tokenizer = Tokenizer::from_path(&opts.text_encoder)?;
    let files = |key: &str| -> Result<Vec<PathBuf>> { cfg.strings(key)?.iter().map(|p| cfg.resolve(p)).collect() };
    let answer_list = read_answer_list(&cfg.resolve(&cfg.str("answer_list")?)?)?;
    let test = Arc::new(VqaDataset::test(&files("test_file")?, &vqa_root, &vg_root, res)?);
    let train = if opts.evaluate {
        None
    } else {
        Some(Arc::new(VqaDataset::train(&files("train_file")?, &vqa_root, &vg_root, res, &eos)?))
    };
    let mut images: Vec<&ImageRef> = test.images().collect();
    if let Some(t) = &train {
        images.extend(t.images());
    }
    check_images_exist(images)?;

    let task_model = TaskModel::new(Task::Vqa, &model_cfg, &opts.device, opts.seed)?;
    if let Some(ckpt) = &opts.checkpoint {
        eprint!(
            "{}",
            load_checkpoint(&task_model, Task::Vqa, &model_cfg, ckpt, opts.evaluate, TeacherInit::FromLoaded)?
        );
    }
    let TaskModel::Vqa(model) = task_model else { unreachable!("VQA builds the VQA model") };
    let run_dir = RunDir::create(&opts.output_dir)?;
    run_dir.write_text("config.yaml", &serde_norway::to_string(&cfg)?)?;
    let (k_test, batch_test) = (cfg.k_test.context("k_test")?, cfg.usize("batch_size_test")?);

    let mut best_epoch = None;
    if let Some(train) = train {
        let loop_cfg = LoopConfig::from_config(&cfg, opts.seed)?;
        let mut optimizer = AdamW::from_config(&model.store, &cfg)?;
        let loader_cfg = LoaderConfig::train(cfg.usize("batch_size_train")?, opts.seed).workers(opts.workers);
        let loader = Loader::new(train.clone(), loader_cfg);
        let dev = opts.device.clone();
        // VQA has no validation split: every epoch is checkpointed, the last one is used.
        let fit_cfg = FitConfig {
            run: &run_dir,
            loop_cfg: &loop_cfg,
            resume: opts.resume,
            task: "vqa",
            epochs: loop_cfg.schedule.epochs,
            stop_after_epoch: opts.stop_after_epoch,
            select: None,
        };
        let end = fit(
            &fit_cfg,
            &model.store,
            &mut optimizer,
            &loader,
            |batch: Vec<VqaSample>, alpha, _rng| {
                let questions: Vec<&str> = batch.iter().map(|s| s.question.as_str()).collect();
                let (q_ids, q_mask) =
                    tokenizer.encode_batch(&questions, Padding::Longest { truncate_to: Some(25) }).to_tensors(&dev)?;
                let answers: Vec<&str> = batch.iter().flat_map(|s| s.answers.iter().map(String::as_str)).collect();
                let (a_ids, a_mask) =
                    tokenizer.encode_batch(&answers, Padding::Longest { truncate_to: None }).to_tensors(&dev)?;
                let weights: Vec<f32> = batch.iter().flat_map(|s| s.weights.iter().copied()).collect();
                let weights = Tensor::from_vec(weights, answers.len(), &dev)?;
                let counts: Vec<usize> = batch.iter().map(|s| s.answers.len()).collect();
                let loss = model.forward_train(
                    &stack(&batch, res, &dev)?,
                    &q_ids,
                    &q_mask,
                    &a_ids,
                    &a_mask,
                    &weights,
                    &counts,
                    alpha,
                    true,
                )?;
                Ok(vec![("loss", loss)])
            },
            |_| Ok(None),
        )?;
        match end {
            FitEnd::Stopped(n) => return Ok(json!({"stopped_after_epoch": n})),
            FitEnd::Finished { state, .. } => best_epoch = state.best_epoch,
        }
    }
    let (results, metrics) = evaluate(&model, test, &tokenizer, &answer_list, &eos, k_test, batch_test, opts.workers)?;
    run_dir.write_json("vqa_result.json", &serde_json::Value::Array(results))?;
    let mut out = json!({"result_file": run_dir.file("vqa_result.json").display().to_string(), "epoch": best_epoch});
    if let Some(m) = &metrics {
        print_metrics("test", m);
        out["test"] = json!(m);
        run_dir.log(&json!({"test_vqa_acc": m["vqa_acc"], "epoch": best_epoch}))?;
    }
    run_dir.write_json("metrics.json", &out)?;
    Ok(out)
}
