//! `albef demo`.

use albef::report::metrics_table;
use albef::tasks::demo::{run, DemoOptions};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct DemoArgs {
    #[arg(long = "output_dir", alias = "output-dir", default_value = "output/demo")]
    output_dir: PathBuf,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Training epochs.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Synthetic training images (two captions each).
    #[arg(long, default_value_t = 2000)]
    train_images: usize,
    /// Epochs of the VQA part (0 skips it).
    #[arg(long, default_value_t = 4)]
    vqa_epochs: usize,
    /// Validation and test images each.
    #[arg(long, default_value_t = 100)]
    test_images: usize,
}

pub fn run_cli(a: DemoArgs) -> Result<()> {
    let opts = DemoOptions {
        output_dir: a.output_dir,
        seed: a.seed,
        train_images: a.train_images,
        test_images: a.test_images,
        epochs: a.epochs,
        max_shapes: 2,
        batch_size: 32,
        vqa_epochs: a.vqa_epochs,
        ..Default::default()
    };
    let s = run(&opts)?;
    println!("\n{}", metrics_table(&[("val (best epoch)", &s.val), ("test", &s.test)]));
    if let Some(v) = &s.vqa {
        println!("VQA accuracy (test): {:.2}% on {} questions", v["vqa_acc"], v["questions"]);
    }
    println!("finished in {:.0} s; report: {}", s.seconds, s.report.display());
    Ok(())
}
