//! The one set-up every task run shares: typed config → tokenizer → datasets (all read and every
//! image checked before any output exists) → model + checkpoint (key report) → run folder →
//! optimizer, loader, [`fit`] → best checkpoint → final evaluation → `metrics.json` and `log.txt`.
//! A task supplies only what is its own, through [`TaskSpec`].

use super::{load_checkpoint, RunOptions, TeacherInit};
use crate::config::{Config, TaskKeys, Training};
use crate::data::loader::{LoaderConfig, TrainSet};
use crate::data::retrieval::{check_images_exist, ImageRef};
use crate::data::Tokenizer;
use crate::dist::{Comm, Communicator};
use crate::model::{ModelConfig, TaskModel};
use crate::task::Task;
use crate::train::fit::{fit, load_best, FitConfig, FitEnd};
use crate::train::optim::AdamW;
use crate::train::run::RunDir;
use crate::train::{LoopConfig, Losses};
use crate::util::{mem, Metrics};
use anyhow::{bail, Result};
use candle_core::Device;
use rand::rngs::StdRng;
use serde_json::{json, Value};
use std::sync::Arc;

/// What a task is given when it reads its data.
pub struct Setup<'a, K: TaskKeys> {
    pub opts: &'a RunOptions,
    pub cfg: &'a Config<K>,
    pub model_cfg: &'a ModelConfig,
    /// Present when training.
    pub training: Option<&'a Training>,
}

/// What a task's steps are given.
pub struct Ctx<'a, M> {
    pub model: &'a M,
    pub tokenizer: &'a Tokenizer,
    pub device: &'a Device,
    /// Loader worker threads (`--workers`).
    pub workers: Option<usize>,
    pub run: &'a RunDir,
    /// The communicator of a data-parallel run.
    pub comm: Option<&'a Comm>,
}

impl<M> Ctx<'_, M> {
    pub fn dist(&self) -> Option<&dyn Communicator> {
        self.comm.map(|c| c.as_ref())
    }
}

/// How the run got to its final evaluation.
pub enum Outcome {
    /// `--evaluate`: the loaded checkpoint as it is.
    Evaluate,
    /// After training, with `checkpoint_best` loaded when the task validates.
    Trained { best_epoch: Option<usize>, best_val: Option<Metrics> },
}

/// The final evaluation's results: `metrics.json`, and a record for `log.txt`.
pub struct Report {
    pub metrics: Value,
    pub log: Option<serde_json::Map<String, Value>>,
}

/// One task: its config keys, its model, its data, its batch step and its evaluation.
pub trait TaskSpec: Sized {
    const TASK: Task;
    /// The validation metric that picks `checkpoint_best` (higher is better); `None`: the task
    /// does not validate and the last epoch is kept.
    const SELECT: Option<&'static str>;
    /// How validation metrics are prefixed in `log.txt` (see [`FitConfig::val_prefix`]).
    const VAL_LOG_PREFIX: &'static str = "val";
    type Keys: TaskKeys;
    /// The task's own flags.
    type Options;
    type Model: TaskModel;
    /// The training data: a [`crate::data::loader::Dataset`], or a stream of its own.
    type Train: TrainSet;

    fn build_model(cfg: &ModelConfig, device: &Device, seed: u64) -> Result<Self::Model>;

    /// Teacher initialisation when the checkpoint has no momentum weights.
    fn teacher_init(_options: &Self::Options) -> TeacherInit {
        TeacherInit::FromLoaded
    }

    /// Sets the starting weights when no checkpoint is given and the run does not resume
    /// (pre-training starts from BERT and DeiT files); prints what it loaded.
    fn initialise(&self, _model: &Self::Model) -> Result<()> {
        Ok(())
    }

    /// Reads the task's datasets (the training set only when training).
    fn new(options: Self::Options, setup: &Setup<Self::Keys>) -> Result<Self>;

    /// Every image the datasets reference, checked to exist before anything is written.
    fn images(&self) -> Vec<&ImageRef>;

    /// The training set (read by [`TaskSpec::new`] when training).
    fn train_set(&self) -> Option<Arc<Self::Train>>;

    /// The losses of one training batch.
    fn step(
        &self,
        ctx: &Ctx<Self::Model>,
        batch: Vec<<Self::Train as TrainSet>::Item>,
        alpha: f64,
        rng: &mut StdRng,
    ) -> Result<Losses>;

    /// The task's own figures of the epoch just trained (logged as `train_<name>`), e.g. counters
    /// its steps kept; taking them resets them.
    fn epoch_stats(&self) -> Result<Metrics> {
        Ok(Metrics::new())
    }

    /// Validation metrics after an epoch, when the task validates.
    fn validate(&self, _ctx: &Ctx<Self::Model>) -> Result<Option<Metrics>> {
        Ok(None)
    }

    /// The final evaluation and the task's output files.
    fn finish(&self, ctx: &Ctx<Self::Model>, outcome: Outcome) -> Result<Report>;
}

/// Adds the memory levers to a device out-of-memory error.
fn explain_out_of_memory(e: anyhow::Error, batch_size: usize) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("OUT_OF_MEMORY") || text.contains("out of memory") {
        e.context(format!(
            "the device ran out of memory at batch size {batch_size}: try a smaller --batch_size_train \
             (with --accum-steps N to keep the optimizer's batch), --precision bf16, a smaller \
             --batch_size_test, a smaller --image_res, or another device"
        ))
    } else {
        e
    }
}

/// Runs a task: trains (unless `--evaluate`) and evaluates. Returns what `metrics.json` holds.
pub fn run<T: TaskSpec>(opts: &RunOptions, options: T::Options) -> Result<Value> {
    let training_run = !opts.evaluate;
    let cfg = Config::<T::Keys>::load_with(&opts.config, training_run, &opts.overrides)?;
    let model_cfg = cfg.model_config()?;
    crate::nn::set_precision(cfg.model.precision.unwrap_or_default());
    let training = if training_run { Some(cfg.training()?) } else { None };
    let tokenizer = Tokenizer::from_path(&opts.text_encoder)?;
    if tokenizer.vocab_size() != model_cfg.bert.vocab_size {
        bail!(
            "the tokenizer in {} has {} tokens but bert_config says vocab_size {}",
            opts.text_encoder.display(),
            tokenizer.vocab_size(),
            model_cfg.bert.vocab_size
        );
    }
    let teacher = T::teacher_init(&options);
    let setup = Setup { opts, cfg: &cfg, model_cfg: &model_cfg, training: training.as_ref() };
    let task = T::new(options, &setup)?;
    check_images_exist(task.images())?;
    mem::stage("config, tokenizer, data");

    // `--evaluate` builds the model for evaluation only: no teacher (no task's evaluation uses
    // it) and no autograd graph; training builds it whole.
    let mut build_cfg = model_cfg.clone();
    build_cfg.mode.inference = opts.evaluate;
    let model = T::build_model(&build_cfg, &opts.device, opts.seed)?;
    mem::stage("build model");
    match &opts.checkpoint {
        Some(ckpt) => eprint!("{}", load_checkpoint(&model, T::TASK, ckpt, opts.evaluate, teacher)?),
        // A resume with nothing to resume from starts over (see `fit`), initialised as a fresh run.
        None if !opts.resume || !opts.output_dir.join(crate::train::run::LAST).is_file() => task.initialise(&model)?,
        None => {}
    }
    // Data parallel (DDP in the reference): every rank starts from rank 0's parameters and
    // buffers, the queues take every rank's features, and only rank 0 writes the run's files.
    let (rank, world_size) = opts.dist.as_ref().map_or((0, 1), |c| (c.rank(), c.world_size()));
    if let Some(comm) = &opts.dist {
        crate::train::distributed::sync_model(comm.as_ref(), model.store())?;
        if let Some(queues) = model.queues() {
            queues.gather_with(comm.clone());
        }
        mem::stage("broadcast model from rank 0");
    }
    let run = if rank == 0 { RunDir::create(&opts.output_dir)? } else { RunDir::secondary(&opts.output_dir) };
    run.write_text("config.yaml", &cfg.to_yaml()?)?;
    let ctx = Ctx {
        model: &model,
        tokenizer: &tokenizer,
        device: &opts.device,
        workers: opts.workers,
        run: &run,
        comm: opts.dist.as_ref(),
    };

    let outcome = match &training {
        None => Outcome::Evaluate,
        Some(training) => {
            let train_set = match task.train_set() {
                Some(t) => t,
                None => bail!("the {} task read no training set", T::TASK),
            };
            // `seed = args.seed + utils.get_rank()`: each rank its own negatives, masks and dropout;
            // the epoch permutation (the loader's seed) is the same on every rank, as
            // DistributedSampler's, and each rank reads its shard of it.
            let loop_cfg = LoopConfig {
                skip_nonfinite: opts.skip_nonfinite,
                dist: opts.dist.clone(),
                ..LoopConfig::new(training, opts.seed + rank as u64)
            };
            let mut optimizer = AdamW::new(model.store(), training.optimizer.weight_decay)?;
            let loader_cfg =
                LoaderConfig::train(training.batch_size, opts.seed).workers(opts.workers).shard(rank, world_size);
            let source = train_set.source(loader_cfg)?;
            let fit_cfg = FitConfig {
                run: &run,
                loop_cfg: &loop_cfg,
                resume: opts.resume,
                task: T::TASK,
                epochs: loop_cfg.schedule.epochs,
                stop_after_epoch: opts.stop_after_epoch,
                select: T::SELECT,
                val_prefix: T::VAL_LOG_PREFIX,
            };
            let end = fit(
                &fit_cfg,
                model.store(),
                &mut optimizer,
                source.as_ref(),
                |batch, alpha, rng| task.step(&ctx, batch, alpha, rng),
                |_epoch| task.epoch_stats(),
                |_epoch| task.validate(&ctx),
            )
            .map_err(|e| explain_out_of_memory(e, training.batch_size))?;
            match end {
                FitEnd::Stopped(n) => return Ok(json!({"stopped_after_epoch": n})),
                FitEnd::Finished { state, best_val } => {
                    let mut best_val = best_val;
                    if T::SELECT.is_some() {
                        load_best(&run, model.store(), ctx.dist())?;
                        // A run resumed after its last epoch has no validation of this process.
                        if best_val.is_none() {
                            best_val = task.validate(&ctx)?;
                        }
                    }
                    Outcome::Trained { best_epoch: state.best_epoch, best_val }
                }
            }
        }
    };
    let report = task.finish(&ctx, outcome)?;
    mem::stage("final evaluation");
    if let Some(record) = report.log {
        run.log(&Value::Object(record))?;
    }
    run.write_json("metrics.json", &report.metrics)?;
    Ok(report.metrics)
}
