//! `albef checkpoint inspect`: what a checkpoint file holds, and how it loads into a task model.

use albef::checkpoint::{classify_file, CheckpointFile};
use albef::config::{default_model_config, model_config_from_file};
use albef::nn::StoreMode;
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

/// Names, dtypes and shapes come from the pickle / safetensors header; no tensor data is read.
/// With `--task` the key report is computed against a placeholder model (names and shapes, no
/// memory), so inspecting a full-size file needs next to no memory.
fn inspect(a: InspectArgs) -> Result<()> {
    let device = Device::Cpu;
    let file = CheckpointFile::open(&a.path)?;
    let tensors = file.tensors();
    let numel: usize = tensors.values().map(|t| t.shape.iter().product::<usize>()).sum();
    println!("file:    {}", a.path.display());
    println!("format:  {:?}", file.format);
    println!("kind:    {}", classify_file(&file));
    println!("tensors: {} ({} values)", tensors.len(), numel);
    if !a.summary {
        let width = tensors.keys().map(|k| k.len()).max().unwrap_or(0);
        for (name, t) in tensors {
            println!("  {name:width$}  {:<8} {:?}", format!("{:?}", t.dtype), t.shape);
        }
    }
    drop(file);
    if let Some(task) = a.task {
        let mut cfg = match &a.config {
            Some(p) => model_config_from_file(p)?,
            None => default_model_config(task),
        };
        // As the task would build it: without a teacher under --evaluate.
        cfg.mode = StoreMode { inference: a.evaluate, placeholders: true };
        let model = build_model(task, &cfg, &device, 0)?;
        let report = load_checkpoint(model.as_ref(), task, &a.path, a.evaluate, default_teacher_init(task))?;
        println!("\nloading into the {task} model:");
        print!("{report}");
    }
    Ok(())
}
