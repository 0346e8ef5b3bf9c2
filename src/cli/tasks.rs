//! The task commands (`retrieval`, `ve`, `nlvr`), with the reference scripts' flags.

use albef::checkpoint::Task;
use albef::tasks::classify::{self, ClassifyOptions};
use albef::tasks::nlvr_pretrain::{self, NlvrPretrainOptions};
use albef::tasks::retrieval::{self, RetrievalOptions};
use albef::tasks::vqa::{self, VqaOptions};
use anyhow::Result;
use candle_core::Device;
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
    fn resolve(self, default_config: &str, default_out: &str) -> Result<(PathBuf, PathBuf, Device, Self)> {
        let device = super::device(&self.device)?;
        let config = self.config.clone().unwrap_or_else(|| PathBuf::from(default_config));
        let out = self.output_dir.clone().unwrap_or_else(|| PathBuf::from(default_out));
        Ok((config, out, device, self))
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
    let (config, output_dir, device, c) =
        a.common.resolve("./configs/Retrieval_flickr.yaml", "output/Retrieval_flickr")?;
    print(&retrieval::run(&RetrievalOptions {
        config,
        output_dir,
        text_encoder: c.text_encoder,
        checkpoint: c.checkpoint,
        evaluate: c.evaluate,
        resume: c.resume,
        save_scores: a.save_scores,
        seed: c.seed,
        device,
        workers: c.workers,
        stop_after_epoch: c.stop_after_epoch,
    })?)
}

pub fn classify(task: Task, a: ClassifyArgs) -> Result<()> {
    let (default_config, default_out) = match task {
        Task::Ve => ("./configs/VE.yaml", "output/VE"),
        _ => ("./configs/NLVR.yaml", "output/NLVR"),
    };
    let (config, output_dir, device, c) = a.common.resolve(default_config, default_out)?;
    print(&classify::run(&ClassifyOptions {
        task,
        config,
        output_dir,
        text_encoder: c.text_encoder,
        checkpoint: c.checkpoint,
        evaluate: c.evaluate,
        resume: c.resume,
        seed: c.seed,
        device,
        workers: c.workers,
        stop_after_epoch: c.stop_after_epoch,
        teacher_from_checkpoint: a.teacher_from_checkpoint,
    })?)
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
    let (config, output_dir, device, c) = a.common.resolve("./configs/VQA.yaml", "output/vqa")?;
    print(&vqa::run(&VqaOptions {
        config,
        output_dir,
        text_encoder: c.text_encoder,
        checkpoint: c.checkpoint,
        evaluate: c.evaluate,
        resume: c.resume,
        seed: c.seed,
        device,
        workers: c.workers,
        stop_after_epoch: c.stop_after_epoch,
    })?)
}

pub fn nlvr_pretrain(c: CommonArgs) -> Result<()> {
    let (config, output_dir, device, c) = c.resolve("./configs/NLVR_pretrain.yaml", "output/NLVR_pretrain")?;
    if c.evaluate {
        anyhow::bail!("nlvr-pretrain has no evaluation; evaluate the NLVR2 model with `albef nlvr --evaluate`");
    }
    print(&nlvr_pretrain::run(&NlvrPretrainOptions {
        config,
        output_dir,
        text_encoder: c.text_encoder,
        checkpoint: c.checkpoint,
        resume: c.resume,
        seed: c.seed,
        device,
        workers: c.workers,
        stop_after_epoch: c.stop_after_epoch,
    })?)
}
