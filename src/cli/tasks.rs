//! The task commands (`pretrain`, `retrieval`, `vqa`, `nlvr-pretrain`, `nlvr`, `ve`), with the reference scripts' flags.

use albef::task::Task;
use albef::tasks::classify::{self, ClassifyOptions};
use albef::tasks::nlvr_pretrain;
use albef::tasks::pretrain::{self, PretrainOptions};
use albef::tasks::retrieval::{self, RetrievalOptions};
use albef::tasks::vqa;
use albef::tasks::RunOptions;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// Flags every task script of the reference takes.
#[derive(Args)]
pub struct CommonArgs {
    /// Task YAML (configs/*.yaml).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long = "output_dir", alias = "output-dir")]
    output_dir: Option<PathBuf>,
    /// Local bert-base-uncased folder (vocab.txt or tokenizer.json).
    #[arg(long = "text_encoder", alias = "textencoder", alias = "text-encoder", default_value = "bert-base-uncased")]
    text_encoder: PathBuf,
    /// ALBEF.pth, a fine-tuned file, or a checkpoint albef wrote.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Evaluate only.
    #[arg(long)]
    evaluate: bool,
    /// Continue an interrupted run from output_dir/checkpoint_last.safetensors.
    #[arg(long)]
    resume: bool,
    /// Stop after this many epochs; continue later with --resume.
    #[arg(long = "stop-after-epoch")]
    stop_after_epoch: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Loader worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Accepted for compatibility with the reference; one process runs on one device.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    distributed: Option<String>,
    #[arg(long = "world_size", hide = true)]
    world_size: Option<usize>,
    #[arg(long = "dist_url", hide = true)]
    dist_url: Option<String>,
}

impl CommonArgs {
    /// The run options, with the task's default config and output folder.
    fn into_run(self, default_config: &str, default_out: &str) -> Result<RunOptions> {
        Ok(RunOptions {
            config: self.config.unwrap_or_else(|| PathBuf::from(default_config)),
            output_dir: self.output_dir.unwrap_or_else(|| PathBuf::from(default_out)),
            text_encoder: self.text_encoder,
            checkpoint: self.checkpoint,
            evaluate: self.evaluate,
            resume: self.resume,
            seed: self.seed,
            device: super::device(&self.device)?,
            workers: self.workers,
            stop_after_epoch: self.stop_after_epoch,
        })
    }
}

#[derive(Args)]
pub struct RetrievalArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Also write output_dir/scores_<split>.safetensors (score_i2t, score_t2i).
    #[arg(long = "save-scores", alias = "save_scores")]
    save_scores: bool,
}

#[derive(Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// NLVR2: initialise the teacher from the loaded checkpoint (LAVIS's fix) instead of the
    /// reference's behaviour (teacher left at its pre-load weights).
    #[arg(long = "teacher-from-checkpoint")]
    teacher_from_checkpoint: bool,
}

fn print(metrics: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(metrics)?);
    Ok(())
}

pub fn retrieval(a: RetrievalArgs) -> Result<()> {
    let run = a.common.into_run("./configs/Retrieval_flickr.yaml", "output/Retrieval_flickr")?;
    print(&retrieval::run(&RetrievalOptions { run, save_scores: a.save_scores })?)
}

pub fn classify(task: Task, a: ClassifyArgs) -> Result<()> {
    let run = match task {
        Task::Ve => a.common.into_run("./configs/VE.yaml", "output/VE")?,
        _ => a.common.into_run("./configs/NLVR.yaml", "output/NLVR")?,
    };
    print(&classify::run(&ClassifyOptions { task, run, teacher_from_checkpoint: a.teacher_from_checkpoint })?)
}

#[derive(Args)]
pub struct VqaArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Accepted for compatibility (VQA.py's `--text_decoder`); the decoder shares the tokenizer.
    #[arg(long = "text_decoder", hide = true)]
    text_decoder: Option<PathBuf>,
}

pub fn vqa(a: VqaArgs) -> Result<()> {
    print(&vqa::run(&a.common.into_run("./configs/VQA.yaml", "output/vqa")?)?)
}

pub fn nlvr_pretrain(c: CommonArgs) -> Result<()> {
    print(&nlvr_pretrain::run(&c.into_run("./configs/NLVR_pretrain.yaml", "output/NLVR_pretrain")?)?)
}

#[derive(Args)]
pub struct PretrainArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// DeiT-B/16 weights (deit_base_patch16_224-b5f2ef4d.pth) for the image encoder; overrides
    /// the config's init_deit.
    #[arg(long = "init-deit", alias = "init_deit")]
    init_deit: Option<PathBuf>,
}

pub fn pretrain(a: PretrainArgs) -> Result<()> {
    let run = a.common.into_run("./configs/Pretrain.yaml", "output/Pretrain")?;
    print(&pretrain::run(&PretrainOptions { run, init_deit: a.init_deit })?)
}
