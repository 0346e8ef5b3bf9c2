//! `albef data …`: dataset preparation and generation.

use albef::data::synth::{generate, SynthConfig};
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Generate the synthetic shapes dataset (no download needed).
    Synth(SynthArgs),
    /// Convert official dataset files into the layout the tasks read.
    #[command(subcommand)]
    Prepare(PrepareCommand),
    /// Write pre-training JSON lists as tar shards in the WebDataset layout ({000000..}.tar,
    /// images copied as they are, captions as .txt / .json, img2dataset-style _stats.json).
    Shard(ShardArgs),
    /// Check the annotation files and images a task config names (exit status 1 when anything
    /// a run needs is missing or broken).
    Check(CheckArgs),
}

#[derive(Subcommand)]
pub enum PrepareCommand {
    /// Flickr30K from Karpathy's dataset_flickr30k.json → train/val/test.json (image paths
    /// images/<file>). When OUT holds the official archive's flickr30k-images/ and no images/,
    /// images is created as a link to it (the Flickr30K and SNLI-VE configs both read images/).
    Flickr30k(KarpathyArgs),
    /// COCO 2014 from Karpathy's dataset_coco.json → annotations/retrieval_*.json.
    Coco(KarpathyArgs),
    /// VQA v2 official questions/annotations → vqa_{train,val,test}.json + answer_list.json
    /// (the most frequent multiple_choice_answer values, the reference's rule).
    Vqa(VqaPrepareArgs),
    /// NLVR2 official JSON-lines → train/val/test.json. Image paths are relative to OUT/images/
    /// (NLVR.yaml's image_root) for the layout the official archives unpack to in OUT:
    /// images/train/<n>/…, dev/… and test1/… (written ../dev/…, ../test1/…); a split folder
    /// already at OUT/images/<split>/ is used where it is.
    Nlvr2(SplitsArgs),
    /// SNLI-VE official JSON-lines → ve_{train,dev,test}.json (the image key may be Flickr30K_ID
    /// or the original release's Flikr30kID).
    #[command(name = "snli-ve")]
    SnliVe(SplitsArgs),
    /// RefCOCO, RefCOCO+, RefCOCOg → <dataset>_<split>.json grounding files (+ refs(*).json).
    Refcoco(RefcocoArgs),
}

#[derive(Args)]
pub struct RefcocoArgs {
    /// refcoco, refcoco+ or refcocog.
    #[arg(long, default_value = "refcoco+")]
    dataset: String,
    /// REFER pickle, e.g. refs(unc).p (with --instances).
    #[arg(long)]
    refs: Option<PathBuf>,
    /// COCO instances.json of the REFER release.
    #[arg(long)]
    instances: Option<PathBuf>,
    /// Hugging Face parquet files (jxu124/refcoco layout), instead of --refs/--instances; their
    /// x1, y1, x2, y2 boxes are written as x, y, w, h like the REFER route's.
    #[arg(long, num_args = 1..)]
    parquet: Vec<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct KarpathyArgs {
    /// dataset_flickr30k.json / dataset_coco.json
    #[arg(long)]
    karpathy: PathBuf,
    /// Dataset folder (data/flickr30k, data/coco).
    #[arg(long)]
    out: PathBuf,
    /// Replace existing outputs.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct VqaPrepareArgs {
    #[arg(long = "questions-train")]
    questions_train: Option<PathBuf>,
    #[arg(long = "annotations-train")]
    annotations_train: Option<PathBuf>,
    #[arg(long = "questions-val")]
    questions_val: Option<PathBuf>,
    #[arg(long = "annotations-val")]
    annotations_val: Option<PathBuf>,
    #[arg(long = "questions-test")]
    questions_test: Option<PathBuf>,
    /// Size of answer_list.json: the answers that are most often a question's
    /// multiple_choice_answer in the annotated splits (ties by name), as the reference's list.
    #[arg(long, default_value_t = 3128)]
    answers: usize,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct SplitsArgs {
    #[arg(long)]
    train: Option<PathBuf>,
    /// The dev split (written as val.json for NLVR2, ve_dev.json for SNLI-VE).
    #[arg(long)]
    dev: Option<PathBuf>,
    #[arg(long)]
    test: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    force: bool,
}

fn report(written: albef::data::prepare::Written) -> Result<()> {
    for (file, n) in written {
        println!("{n:>9} entries  {}", file.display());
    }
    Ok(())
}

fn prepare(cmd: PrepareCommand) -> Result<()> {
    use albef::data::prepare as p;
    match cmd {
        PrepareCommand::Flickr30k(a) => {
            report(p::flickr30k(&a.karpathy, &a.out, a.force)?)?;
            if let Ok(target) = std::fs::read_link(a.out.join("images")) {
                println!("images -> {} (linked)", target.display());
            }
            Ok(())
        }
        PrepareCommand::Coco(a) => report(p::coco(&a.karpathy, &a.out, a.force)?),
        PrepareCommand::Vqa(a) => {
            let mut splits = Vec::new();
            if let Some(q) = a.questions_train {
                splits.push(("train".to_string(), q, a.annotations_train));
            }
            if let Some(q) = a.questions_val {
                splits.push(("val".to_string(), q, a.annotations_val));
            }
            if let Some(q) = a.questions_test {
                splits.push(("test".to_string(), q, None));
            }
            if splits.is_empty() {
                anyhow::bail!("give at least one of --questions-train, --questions-val, --questions-test");
            }
            report(p::vqa(&splits, &a.out, a.answers, a.force)?)
        }
        PrepareCommand::Nlvr2(a) => report(p::nlvr2(&splits(a.train, a.dev, a.test, "val")?, &a.out, a.force)?),
        PrepareCommand::Refcoco(a) => {
            if !["refcoco", "refcoco+", "refcocog"].contains(&a.dataset.as_str()) {
                anyhow::bail!("--dataset must be refcoco, refcoco+ or refcocog, not {:?}", a.dataset);
            }
            match (a.refs, a.instances, a.parquet.is_empty()) {
                (Some(refs), Some(instances), true) => {
                    // refs(unc).p → refs(unc).json, and refcoco+'s as refs(unc+).json as the guide's layout has it.
                    let stem = refs.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                    let split_by = stem.trim_start_matches("refs(").trim_end_matches(')').to_string();
                    let name = if a.dataset == "refcoco+" { format!("{split_by}+") } else { split_by };
                    report(albef::data::refcoco::from_refer(&refs, &instances, &a.dataset, &name, &a.out, a.force)?)
                }
                (None, None, false) => {
                    report(albef::data::refcoco::from_parquet(&a.parquet, &a.dataset, &a.out, a.force)?)
                }
                _ => anyhow::bail!("give either --refs and --instances (REFER files) or --parquet FILES"),
            }
        }
        PrepareCommand::SnliVe(a) => report(p::snli_ve(&splits(a.train, a.dev, a.test, "dev")?, &a.out, a.force)?),
    }
}

fn splits(
    train: Option<PathBuf>,
    dev: Option<PathBuf>,
    test: Option<PathBuf>,
    dev_name: &str,
) -> Result<Vec<(String, PathBuf)>> {
    let out: Vec<(String, PathBuf)> = [("train", train), (dev_name, dev), ("test", test)]
        .into_iter()
        .filter_map(|(n, f)| f.map(|f| (n.to_string(), f)))
        .collect();
    if out.is_empty() {
        anyhow::bail!("give at least one of --train, --dev, --test");
    }
    Ok(out)
}

#[derive(Args)]
pub struct CheckArgs {
    /// Task YAML whose files to check.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The task the config is for (default: from the reference's config file names, e.g.
    /// Retrieval_flickr.yaml → retrieval, VE.yaml → ve).
    #[arg(long)]
    task: Option<albef::task::Task>,
    /// Or: a data folder in the standard layout (flickr30k, coco, vqa, nlvr2, snli_ve); each
    /// dataset present is checked against the shipped config that reads it.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Where the shipped configs are (with --root).
    #[arg(long, default_value = "configs")]
    configs: PathBuf,
}

#[derive(Args)]
pub struct ShardArgs {
    /// Pre-training JSON lists ([{"image": path, "caption": str | [str]}]), concatenated in order.
    #[arg(long, num_args = 1.., required = true)]
    json: Vec<PathBuf>,
    /// Folder the JSON's relative image paths are under (absolute paths are used as they are).
    #[arg(long = "image_root", alias = "image-root")]
    image_root: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    #[arg(long = "samples-per-shard", alias = "samples_per_shard", default_value_t = 10000)]
    samples_per_shard: usize,
    /// Replace existing shards.
    #[arg(long)]
    force: bool,
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

fn print_report(r: &albef::data::check::CheckReport) {
    for (file, n, images) in &r.files {
        if *images > 0 {
            println!("{n:>8} entries, {images} images  {}", file.display());
        } else {
            println!("{n:>8} entries  {}", file.display());
        }
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
}

fn check(a: CheckArgs) -> Result<()> {
    match (a.config, a.root) {
        (Some(config), None) => {
            let task = match a.task {
                Some(t) => t,
                None => albef::task::Task::of_reference_config(&config)?,
            };
            let r = albef::data::check::check_config(&config, task)?;
            print_report(&r);
            if !r.ok() {
                anyhow::bail!("the data for {} is incomplete", config.display());
            }
            println!("ok: everything {} needs is in place", config.display());
            Ok(())
        }
        (None, Some(root)) => {
            let results = albef::data::check::check_root(&root, &a.configs);
            if results.is_empty() {
                anyhow::bail!("{} holds none of flickr30k, coco, vqa, nlvr2, snli_ve", root.display());
            }
            let mut bad = Vec::new();
            for (name, result) in results {
                println!("== {name}");
                match result {
                    Ok(r) => {
                        print_report(&r);
                        if !r.ok() {
                            bad.push(name);
                        }
                    }
                    Err(e) => {
                        println!("  error: {e:#}");
                        bad.push(name);
                    }
                }
            }
            if !bad.is_empty() {
                anyhow::bail!("incomplete: {}", bad.join(", "));
            }
            println!("ok");
            Ok(())
        }
        _ => anyhow::bail!("give --config C or --root DIR"),
    }
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Check(a) => check(a),
        DataCommand::Shard(a) => {
            let samples = albef::data::pretrain::raw_entries(&a.json, a.image_root.as_deref())?;
            let n = albef::data::shards::write_shards(&samples, &a.out, a.samples_per_shard, a.force)?;
            println!("wrote {n} shards ({} samples) to {}", samples.len(), a.out.display());
            Ok(())
        }
        DataCommand::Prepare(c) => prepare(c),
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
                "wrote {}: {} train images ({} captions), {} val, {} test, pretrain.json, shards/, vocab.txt",
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
