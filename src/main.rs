//! The `albef` command line.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod cli;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mimalloc.h` (libmimalloc-sys 0.1.49 names no
/// constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

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
    /// Pre-training with ITC + ITM + MLM from BERT and DeiT weights, on JSON lists or tar shards, as Pretrain.py.
    Pretrain(cli::tasks::PretrainArgs),
    /// Image-text retrieval: fine-tune and evaluate (Flickr30K, COCO), as Retrieval.py.
    Retrieval(cli::tasks::RetrievalArgs),
    /// VQA v2: fine-tune and rank the answer list, as VQA.py.
    Vqa(cli::tasks::VqaArgs),
    /// SNLI-VE visual entailment: fine-tune and evaluate, as VE.py.
    Ve(cli::tasks::ClassifyArgs),
    /// Text-assignment pre-training for NLVR2, as Pretrain_nlvr.py.
    #[command(name = "nlvr-pretrain")]
    NlvrPretrain(cli::tasks::CommonArgs),
    /// NLVR2: fine-tune and evaluate from the text-assignment checkpoint, as NLVR.py.
    Nlvr(cli::tasks::ClassifyArgs),
    /// Weakly-supervised grounding on RefCOCO+: fine-tune and evaluate with Grad-CAM, as Grounding.py.
    Grounding(cli::tasks::GroundingArgs),
    /// Grad-CAM pictures of expressions on images (per word and whole), as visualization.ipynb.
    Gradcam(cli::tasks::GradcamArgs),
    /// Datasets: prepare the official files, check a config's files and images, generate the synthetic one.
    #[command(subcommand)]
    Data(cli::data::DataCommand),
    /// Benchmarks of the full-size model on this machine, each beside a baseline measured in the same run.
    Bench(cli::bench::BenchArgs),
    /// A run's metrics.json beside the paper's numbers for its task and setting, with the differences.
    Compare(cli::compare::CompareArgs),
    /// Index a photo folder (JPEG, PNG) for `albef search`: ITC features in an SQLite file, updated incrementally.
    Index(cli::search::IndexArgs),
    /// Search an index by text (optionally re-ranked by ITM) or by image.
    Search(cli::search::SearchArgs),
    /// Data-parallel runs: one process per GPU (or CPU share) of this node, as torchrun:
    /// `albef launch --nproc_per_node 8 -- pretrain --config …`.
    Launch(cli::tasks::LaunchArgs),
    /// The device checks in one command: fixture parity (fp32, bf16), fused ops, a tiny training run, the bench.
    Selftest(cli::selftest::SelftestArgs),
    /// A local web page over an index: search, the photo large, questions (VQA) and Grad-CAM; JSON API behind it.
    Serve(cli::serve::ServeArgs),
}

fn main() {
    // Keep freed memory for reuse: a training step frees and reallocates gigabytes of activations,
    // and memory handed back is faulted in again page by page (-1: never purge).
    // SAFETY: sets a process-wide allocator option; no other thread runs yet.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // candle runs its element-wise ops on a pool of its own, whose n−1 workers spin between ops
    // beside rayon's n (gemm and the kernels in `nn`). On two threads that oversubscription cost
    // 2–3% of a training step against candle's ops on the calling thread alone (`albef bench
    // --only train`, 2026-12-02; the image encoder and fusion unchanged). Not measured on more
    // cores, where the parallel element-wise ops may matter more: there candle keeps its pool.
    // A CANDLE_NUM_THREADS of the user's wins. Set before any thread or candle op exists.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() && candle_core::utils::get_num_threads() <= 2 {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    albef::util::install_panic_hook();
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Checkpoint(c) => cli::checkpoint::run(c),
        Command::Demo(a) => cli::demo::run_cli(a),
        Command::Pretrain(a) => cli::tasks::pretrain(a),
        Command::Retrieval(a) => cli::tasks::retrieval(a),
        Command::Vqa(a) => cli::tasks::vqa(a),
        Command::NlvrPretrain(a) => cli::tasks::nlvr_pretrain(a),
        Command::Ve(a) => cli::tasks::classify(albef::task::Task::Ve, a),
        Command::Nlvr(a) => cli::tasks::classify(albef::task::Task::Nlvr, a),
        Command::Grounding(a) => cli::tasks::grounding(a),
        Command::Gradcam(a) => cli::tasks::gradcam(a),
        Command::Data(c) => cli::data::run(c),
        Command::Bench(a) => cli::bench::run(a),
        Command::Compare(a) => cli::compare::run(a),
        Command::Index(a) => cli::search::index_cmd(a),
        Command::Search(a) => cli::search::search_cmd(a),
        Command::Launch(a) => cli::tasks::launch(a),
        Command::Selftest(a) => cli::selftest::run(a),
        Command::Serve(a) => cli::serve::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
