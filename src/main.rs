//! The `albef` command line.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod cli;

#[derive(Parser)]
#[command(
    name = "albef",
    version,
    about = "ALBEF (Align before Fuse) vision-language model: load the official checkpoints, fine-tune, evaluate"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect checkpoint files.
    #[command(subcommand)]
    Checkpoint(cli::checkpoint::CheckpointCommand),
    /// Train and evaluate a small ALBEF on generated data, in minutes, on a CPU.
    Demo(cli::demo::DemoArgs),
    /// Image-text retrieval: fine-tune and evaluate (Flickr30K, COCO), as Retrieval.py.
    Retrieval(cli::retrieval::RetrievalArgs),
    /// Datasets: generate the synthetic one.
    #[command(subcommand)]
    Data(cli::data::DataCommand),
    /// Forward-throughput benchmarks of the full-size encoders on this machine.
    Bench(cli::bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Checkpoint(c) => cli::checkpoint::run(c),
        Command::Demo(a) => cli::demo::run_cli(a),
        Command::Retrieval(a) => cli::retrieval::run_cli(a),
        Command::Data(c) => cli::data::run(c),
        Command::Bench(a) => cli::bench::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
