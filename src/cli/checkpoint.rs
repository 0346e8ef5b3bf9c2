//! `albef checkpoint inspect`: what a checkpoint file holds, and how it loads into a task model.

use albef::checkpoint::{classify, read_checkpoint};
use albef::config::{default_model_config, model_config_from_file};
use albef::task::Task;
use albef::tasks::{build_model, default_teacher_init, load_checkpoint};
use anyhow::Result;
use candle_core::Device;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum CheckpointCommand {
    /// List tensors, detect the checkpoint kind, and (with --task) report how it loads.
    Inspect(InspectArgs),
}

#[derive(Args)]
pub struct InspectArgs {
    /// A .pth or .safetensors file.
    path: PathBuf,
    /// Load it into this task's model and print the key report.
    #[arg(long)]
    task: Option<Task>,
    /// Task YAML giving the model sizes (default: the reference's ViT-B/16 + bert-base).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Load as the reference script does under --evaluate.
    #[arg(long)]
    evaluate: bool,
    /// Print only the summary, not every tensor.
    #[arg(long)]
    summary: bool,
}

pub fn run(cmd: CheckpointCommand) -> Result<()> {
    match cmd {
        CheckpointCommand::Inspect(a) => inspect(a),
    }
}

fn inspect(a: InspectArgs) -> Result<()> {
    let device = Device::Cpu;
    let ckpt = read_checkpoint(&a.path, &device)?;
    let numel: usize = ckpt.tensors.values().map(|t| t.elem_count()).sum();
    println!("file:    {}", a.path.display());
    println!("format:  {:?}", ckpt.format);
    println!("kind:    {}", classify(&ckpt));
    println!("tensors: {} ({} values)", ckpt.tensors.len(), numel);
    if !a.summary {
        let width = ckpt.tensors.keys().map(|k| k.len()).max().unwrap_or(0);
        for (name, t) in &ckpt.tensors {
            println!("  {name:width$}  {:<8} {:?}", format!("{:?}", t.dtype()), t.dims());
        }
    }
    if let Some(task) = a.task {
        let cfg = match &a.config {
            Some(p) => model_config_from_file(p)?,
            None => default_model_config(task),
        };
        let model = build_model(task, &cfg, &device, 0)?;
        let report = load_checkpoint(model.as_ref(), task, &a.path, a.evaluate, default_teacher_init(task))?;
        println!("\nloading into the {task} model:");
        print!("{report}");
    }
    Ok(())
}
