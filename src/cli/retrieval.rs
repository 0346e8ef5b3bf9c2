//! `albef retrieval`: the flags of the reference's `Retrieval.py`.

use albef::tasks::retrieval::{run, RetrievalOptions};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct RetrievalArgs {
    /// Task YAML (configs/Retrieval_flickr.yaml, configs/Retrieval_coco.yaml).
    #[arg(long, default_value = "./configs/Retrieval_flickr.yaml")]
    config: PathBuf,
    #[arg(long = "output_dir", alias = "output-dir", default_value = "output/Retrieval_flickr")]
    output_dir: PathBuf,
    /// Local bert-base-uncased folder (vocab.txt or tokenizer.json).
    #[arg(long = "text_encoder", alias = "textencoder", alias = "text-encoder", default_value = "bert-base-uncased")]
    text_encoder: PathBuf,
    /// ALBEF.pth, a fine-tuned file, or a checkpoint albef wrote.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Evaluate val and test only.
    #[arg(long)]
    evaluate: bool,
    /// Continue an interrupted run from output_dir/checkpoint_last.safetensors.
    #[arg(long)]
    resume: bool,
    /// Also write output_dir/scores_<split>.safetensors (score_i2t, score_t2i).
    #[arg(long = "save-scores", alias = "save_scores")]
    save_scores: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Loader worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Stop after this many epochs; continue later with --resume.
    #[arg(long = "stop-after-epoch")]
    stop_after_epoch: Option<usize>,
    /// Accepted for compatibility with the reference; one process runs on one device.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    distributed: Option<String>,
    #[arg(long = "world_size", hide = true)]
    world_size: Option<usize>,
    #[arg(long = "dist_url", hide = true)]
    dist_url: Option<String>,
}

pub fn run_cli(a: RetrievalArgs) -> Result<()> {
    let device = super::device(&a.device)?;
    let opts = RetrievalOptions {
        config: a.config,
        output_dir: a.output_dir,
        text_encoder: a.text_encoder,
        checkpoint: a.checkpoint,
        evaluate: a.evaluate,
        resume: a.resume,
        save_scores: a.save_scores,
        seed: a.seed,
        device,
        workers: a.workers,
        stop_after_epoch: a.stop_after_epoch,
    };
    let metrics = run(&opts)?;
    println!("{}", serde_json::to_string_pretty(&metrics)?);
    Ok(())
}
