//! `albef data …`: dataset preparation and generation.

use albef::data::synth::{generate, SynthConfig};
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Generate the synthetic shapes dataset (no download needed).
    Synth(SynthArgs),
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

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
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
