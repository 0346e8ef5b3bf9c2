//! `albef compare RUN_DIR`.

use albef::compare::{compare, CompareOptions};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct CompareArgs {
    /// A run folder holding metrics.json (and config.yaml, for retrieval's dataset).
    run_dir: PathBuf,
    /// retrieval, vqa, nlvr, ve or grounding (default: told by metrics.json's keys).
    #[arg(long)]
    task: Option<String>,
    /// The paper's pre-training corpus: 4M or 14M.
    #[arg(long, default_value = "4M")]
    pretrain: String,
    /// Retrieval: flickr or coco (default: from the run's config.yaml test_file).
    #[arg(long)]
    dataset: Option<String>,
    /// Retrieval: compare with the zero-shot Flickr30K table (a COCO-fine-tuned model on Flickr).
    #[arg(long = "zero-shot", alias = "zero_shot")]
    zero_shot: bool,
    /// Grounding: the paper's itm (cross-attention Grad-CAM, default) or itc (ViT Grad-CAM) row.
    #[arg(long)]
    method: Option<String>,
    /// JSON instead of Markdown.
    #[arg(long)]
    json: bool,
}

pub fn run(a: CompareArgs) -> Result<()> {
    let opts = CompareOptions {
        task: a.task,
        pretrain: a.pretrain,
        dataset: a.dataset,
        zero_shot: a.zero_shot,
        method: a.method,
    };
    let c = compare(&a.run_dir, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&c.to_json())?);
    } else {
        print!("{}", c.to_markdown());
    }
    Ok(())
}
