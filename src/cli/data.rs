//! `albef data …`: dataset preparation and generation.

use albef::data::synth::{generate, SynthConfig};
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Generate the synthetic shapes dataset (no download needed).
    Synth(SynthArgs),
    /// Check the annotation files and images a task config names (exit status 1 when anything
    /// a run needs is missing or broken).
    Check(CheckArgs),
}

#[derive(Args)]
pub struct CheckArgs {
    /// Task YAML whose files to check.
    #[arg(long)]
    config: PathBuf,
}

#[derive(Args)]
pub struct SynthArgs {
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 1000)]
    train: usize,
    #[arg(long, default_value_t = 100)]
    val: usize,
    #[arg(long, default_value_t = 100)]
    test: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 64)]
    size: usize,
}

fn check(a: CheckArgs) -> Result<()> {
    let r = albef::data::check::check_config(&a.config)?;
    for (file, n) in &r.files {
        println!("{:>8} entries  {}", n, file.display());
    }
    println!("{} images: {} missing, {} unreadable", r.images, r.missing.len(), r.broken.len());
    for (label, list) in [("missing", &r.missing), ("unreadable", &r.broken)] {
        for line in list.iter().take(10) {
            println!("  {label}: {line}");
        }
        if list.len() > 10 {
            println!("  … and {} more {label}", list.len() - 10);
        }
    }
    if !r.ok() {
        anyhow::bail!("the data for {} is incomplete", a.config.display());
    }
    println!("ok: everything {} needs is in place", a.config.display());
    Ok(())
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Check(a) => check(a),
        DataCommand::Synth(a) => {
            let cfg = SynthConfig {
                seed: a.seed,
                train: a.train,
                val: a.val,
                test: a.test,
                image_size: a.size,
                ..SynthConfig::default()
            };
            let s = generate(&a.out, &cfg)?;
            println!(
                "wrote {}: {} train images ({} captions), {} val, {} test, vocab.txt",
                a.out.display(),
                s.images[0],
                s.train_captions,
                s.images[1],
                s.images[2]
            );
            Ok(())
        }
    }
}
