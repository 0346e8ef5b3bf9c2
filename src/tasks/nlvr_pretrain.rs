//! Text-assignment pre-training for NLVR2 (`Pretrain_nlvr.py`): from a pre-trained ALBEF, learn
//! which of two images a caption describes; its checkpoint initialises `albef nlvr`.

use crate::checkpoint::Task;
use crate::config::TaskConfig;
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::pretrain::{CaptionSample, PretrainDataset};
use crate::data::retrieval::check_images_exist;
use crate::data::{Padding, Tokenizer};
use crate::tasks::{load_checkpoint, RunOptions, TaskModel, TeacherInit};
use crate::train::fit::{fit, FitConfig, FitEnd};
use crate::train::optim::AdamW;
use crate::train::run::{RunDir, LAST};
use crate::train::LoopConfig;
use anyhow::Result;
use candle_core::Tensor;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;

pub fn run(opts: &RunOptions) -> Result<serde_json::Value> {
    let cfg = TaskConfig::from_yaml_file(&opts.config)?;
    cfg.require(&opts.config, &["train_file", "image_res", "batch_size", "optimizer", "schedular"])?;
    let model_cfg = cfg.model_config()?;
    let res = model_cfg.vision.image_res;
    let tokenizer = Tokenizer::from_path(&opts.text_encoder)?;
    let files: Vec<PathBuf> = cfg.strings("train_file")?.iter().map(|p| cfg.resolve(p)).collect::<Result<_>>()?;
    let image_root = cfg.str("image_root").ok().map(PathBuf::from);
    let train = Arc::new(PretrainDataset::new(&files, image_root.as_deref(), res)?);
    check_images_exist(train.images())?;

    let task_model = TaskModel::new(Task::NlvrPretrain, &model_cfg, &opts.device, opts.seed)?;
    if let Some(ckpt) = &opts.checkpoint {
        eprint!(
            "{}",
            load_checkpoint(&task_model, Task::NlvrPretrain, &model_cfg, ckpt, false, TeacherInit::FromLoaded)?
        );
    }
    let TaskModel::TextAssign(model) = task_model else { unreachable!("nlvr-pretrain builds the TA model") };
    let run_dir = RunDir::create(&opts.output_dir)?;
    run_dir.write_text("config.yaml", &serde_norway::to_string(&cfg)?)?;
    // The TA loss has no distillation: α is unused.
    let loop_cfg = LoopConfig::from_config(&cfg, opts.seed)?;
    let mut optimizer = AdamW::from_config(&model.store, &cfg)?;
    let loader_cfg = LoaderConfig::train(cfg.usize("batch_size")?, opts.seed).workers(opts.workers);
    let loader = Loader::new(train.clone(), loader_cfg);
    let dev = opts.device.clone();
    let fit_cfg = FitConfig {
        run: &run_dir,
        loop_cfg: &loop_cfg,
        resume: opts.resume,
        task: "nlvr-pretrain",
        epochs: loop_cfg.schedule.epochs,
        stop_after_epoch: opts.stop_after_epoch,
        select: None,
    };
    let end = fit(
        &fit_cfg,
        &model.store,
        &mut optimizer,
        &loader,
        |batch: Vec<CaptionSample>, _alpha, rng| {
            let flat: Vec<f32> = batch.iter().flat_map(|s| s.pixels.iter().copied()).collect();
            let image = Tensor::from_vec(flat, (batch.len(), 3, res, res), &dev)?;
            let captions: Vec<&str> = batch.iter().map(|s| s.caption.as_str()).collect();
            let (ids, mask) =
                tokenizer.encode_batch(&captions, Padding::Longest { truncate_to: Some(25) }).to_tensors(&dev)?;
            Ok(vec![("ta", model.forward_train(&image, &ids, &mask, rng, true)?)])
        },
        |_| Ok(None),
    )?;
    match end {
        FitEnd::Stopped(n) => Ok(json!({"stopped_after_epoch": n})),
        FitEnd::Finished { state, .. } => {
            let out = json!({"checkpoint": run_dir.file(LAST).display().to_string(), "epochs": state.epochs_done});
            run_dir.write_json("metrics.json", &out)?;
            Ok(out)
        }
    }
}
