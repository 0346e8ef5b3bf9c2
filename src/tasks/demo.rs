//! `albef demo`: the whole system on a laptop with nothing downloaded. Generates the synthetic
//! shapes data, trains a small ALBEF from random weights with the retrieval objective (ITC + ITM
//! with momentum distillation), evaluates it, and writes a report.

use crate::checkpoint::read_checkpoint;
use crate::data::synth::{generate, vocab_size, SynthConfig};
use crate::report::{line_chart, metrics_table, Axis, Chart, Line};
use crate::tasks::retrieval::{run as run_retrieval, RetrievalOptions};
use crate::tasks::RunOptions;
use crate::train::run::{read_step_losses, LOG, STEP_LOSSES};
use crate::util::write_atomic;
use crate::util::Metrics;
use anyhow::{Context, Result};
use candle_core::Device;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub output_dir: PathBuf,
    pub seed: u64,
    pub train_images: usize,
    pub test_images: usize,
    pub epochs: usize,
    /// Shapes per image, at most (1–3); more makes captions longer and retrieval harder.
    pub max_shapes: usize,
    pub batch_size: usize,
    /// Epochs of the VQA part (0 skips it).
    pub vqa_epochs: usize,
    pub workers: Option<usize>,
    pub device: Device,
    pub precision: crate::nn::Precision,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("output/demo"),
            seed: 42,
            train_images: 2000,
            test_images: 100,
            epochs: 10,
            max_shapes: 2,
            batch_size: 32,
            vqa_epochs: 4,
            workers: None,
            device: Device::Cpu,
            precision: crate::nn::Precision::Fp32,
        }
    }
}

/// What the demo measured.
#[derive(Clone, Debug)]
pub struct DemoSummary {
    /// VQA accuracy on the synthetic test questions, when the VQA part ran.
    pub vqa: Option<Metrics>,
    pub test: Metrics,
    pub val: Metrics,
    pub seconds: f64,
    pub report: PathBuf,
}

const BERT_CONFIG: &str = r#"{
  "hidden_size": 64,
  "num_hidden_layers": 4,
  "num_attention_heads": 4,
  "intermediate_size": 128,
  "hidden_dropout_prob": 0.1,
  "attention_probs_dropout_prob": 0.1,
  "layer_norm_eps": 1e-12,
  "max_position_embeddings": 64,
  "type_vocab_size": 2,
  "vocab_size": VOCAB,
  "pad_token_id": 0,
  "fusion_layer": 2,
  "encoder_width": 64
}
"#;

fn task_config(data: &Path, out: &Path, epochs: usize, batch: usize) -> String {
    let (d, o) = (data.display(), out.display());
    format!(
        "# albef demo: retrieval on synthetic shapes, a small ALBEF trained from random weights.\n\
train_file: ['{d}/retrieval_train.json']\nval_file: '{d}/retrieval_val.json'\ntest_file: '{d}/retrieval_test.json'\nimage_root: '{d}/'\n\
bert_config: '{o}/config_bert.json'\n\n\
image_res: 32\nbatch_size_train: {batch}\nbatch_size_test: 64\n\n\
queue_size: 256\nmomentum: 0.99\nvision_width: 64\nembed_dim: 64\ntemp: 0.07\nk_test: 16\n\n\
alpha: 0.4\ndistill: True\nwarm_up: True\n\n\
optimizer: {{opt: adamW, lr: 1e-3, weight_decay: 0.02}}\n\
schedular: {{sched: cosine, lr: 1e-3, epochs: {epochs}, min_lr: 1e-5, decay_rate: 1, warmup_lr: 1e-3, warmup_epochs: 1, cooldown_epochs: 0}}\n\n\
# albef extensions: the image encoder's size; a larger random-init std (a model this small\n\
# barely tells its inputs apart at the reference's 0.02); no flips or crops (captions say \"left of\").\n\
vision: {{patch_size: 8, embed_dim: 64, depth: 3, num_heads: 4, mlp_ratio: 2}}\ninit_std: 0.1\ntrain_transform: resize\n"
    )
}

fn vqa_config(data: &Path, out: &Path, epochs: usize, batch: usize) -> String {
    let (d, o) = (data.display(), out.display());
    format!(
        "# albef demo: VQA on synthetic shapes (colour, count and yes/no questions).\n\
train_file: ['{d}/vqa_train.json']\ntest_file: ['{d}/vqa_test.json']\nanswer_list: '{d}/answer_list.json'\n\
vqa_root: '{d}/'\nvg_root: '{d}/'\nbert_config: '{o}/config_bert.json'\n\n\
image_res: 32\nbatch_size_train: {batch}\nbatch_size_test: 64\nk_test: 8\n\n\
alpha: 0.4\ndistill: True\nwarm_up: True\neos: '[SEP]'\nmomentum: 0.99\n\n\
optimizer: {{opt: adamW, lr: 1e-3, weight_decay: 0.02}}\n\
schedular: {{sched: cosine, lr: 1e-3, epochs: {epochs}, min_lr: 1e-5, decay_rate: 1, warmup_lr: 1e-3, warmup_epochs: 1, cooldown_epochs: 0}}\n\n\
vision: {{patch_size: 8, embed_dim: 64, depth: 3, num_heads: 4, mlp_ratio: 2}}\ninit_std: 0.1\ndecoder_layers: 2\n"
    )
}

/// Generates the data unless `dir` already holds the same generation.
fn ensure_data(dir: &Path, cfg: &SynthConfig) -> Result<()> {
    let marker = dir.join("synth.json");
    let want = serde_json::json!({"seed": cfg.seed, "train": cfg.train, "val": cfg.val, "test": cfg.test, "image_size": cfg.image_size, "max_shapes": cfg.max_shapes, "version": 1});
    if let Ok(text) = std::fs::read_to_string(&marker) {
        if serde_json::from_str::<Value>(&text).ok().as_ref() == Some(&want) {
            eprintln!("reusing synthetic data in {}", dir.display());
            return Ok(());
        }
    }
    eprintln!(
        "generating synthetic data in {} ({} train, {} val, {} test images)",
        dir.display(),
        cfg.train,
        cfg.val,
        cfg.test
    );
    generate(dir, cfg)?;
    write_atomic(&marker, want.to_string().as_bytes())
}

pub fn run(opts: &DemoOptions) -> Result<DemoSummary> {
    let start = Instant::now();
    std::fs::create_dir_all(&opts.output_dir)
        .with_context(|| format!("cannot create {}", opts.output_dir.display()))?;
    let out = opts.output_dir.canonicalize()?;
    let data = out.join("data");
    let synth = SynthConfig {
        seed: opts.seed,
        train: opts.train_images,
        val: opts.test_images,
        test: opts.test_images,
        image_size: 64,
        max_shapes: opts.max_shapes.clamp(1, 3),
    };
    ensure_data(&data, &synth)?;
    write_atomic(&out.join("config_bert.json"), BERT_CONFIG.replace("VOCAB", &vocab_size().to_string()).as_bytes())?;
    let config = out.join("demo_config.yaml");
    let config_text = task_config(&data, &out, opts.epochs, opts.batch_size);
    write_atomic(&config, config_text.as_bytes())?;
    // A fresh run each time: old logs would mix with the new ones.
    for stale in [LOG, STEP_LOSSES, "metrics.json"] {
        let _ = std::fs::remove_file(out.join(stale));
    }
    let run = |config: PathBuf, output_dir: PathBuf| RunOptions {
        seed: opts.seed,
        workers: opts.workers,
        device: opts.device.clone(),
        overrides: crate::config::Overrides { precision: Some(opts.precision), ..Default::default() },
        ..RunOptions::new(config, output_dir, data.join("vocab.txt"))
    };
    let metrics = run_retrieval(&RetrievalOptions { run: run(config, out.clone()), save_scores: true })?;
    let parse = |v: &Value| -> Result<Metrics> { Ok(serde_json::from_value(v.clone())?) };
    let (val, test) = (parse(&metrics["val"])?, parse(&metrics["test"])?);
    // VQA, from random weights too, in its own folder.
    let vqa = if opts.vqa_epochs > 0 {
        let vqa_out = out.join("vqa");
        std::fs::create_dir_all(&vqa_out)?;
        let _ = std::fs::remove_file(vqa_out.join(LOG));
        let _ = std::fs::remove_file(vqa_out.join(STEP_LOSSES));
        let vqa_config_path = vqa_out.join("demo_vqa_config.yaml");
        write_atomic(&vqa_config_path, vqa_config(&data, &out, opts.vqa_epochs, opts.batch_size).as_bytes())?;
        let m = crate::tasks::vqa::run(&run(vqa_config_path, vqa_out))?;
        Some(parse(&m["test"])?)
    } else {
        None
    };
    let seconds = start.elapsed().as_secs_f64();
    let report = write_report(&out, &data, &config_text, &val, &test, vqa.as_ref(), seconds)?;
    Ok(DemoSummary { vqa, test, val, seconds, report })
}

/// `curves.png`: per epoch of `log.txt`, the mean training losses and the validation r_mean.
fn write_curves(out: &Path) -> Result<()> {
    let log_path = out.join(LOG);
    let log = std::fs::read_to_string(&log_path).with_context(|| format!("cannot read {}", log_path.display()))?;
    let epochs: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r.get("epoch").is_some())
        .collect();
    let series = |key: &str| -> Vec<(f64, f64)> {
        epochs.iter().filter_map(|r| Some((r["epoch"].as_f64()?, r.get(key)?.as_f64()?))).collect()
    };
    let losses = [("train_loss_ita", "ITC loss"), ("train_loss_itm", "ITM loss")];
    let chart = Chart {
        title: "albef demo: retrieval training".into(),
        x_label: "epoch".into(),
        left: Axis {
            label: "mean training loss".into(),
            lines: losses.iter().map(|(key, label)| Line { label: label.to_string(), points: series(key) }).collect(),
            range: None,
        },
        right: Some(Axis {
            label: "val r_mean (%)".into(),
            lines: vec![Line { label: "val r_mean".into(), points: series("val_r_mean") }],
            range: Some((0.0, 100.0)),
        }),
        integer_x: true,
    };
    line_chart(&chart, &out.join("curves.png"))
}

/// `loss_per_step.png`: every loss of every optimizer step (`losses.jsonl`), against the epoch
/// (step `i` of an `n`-step epoch `e` at `e + (i + 1) / n`).
fn write_step_losses(out: &Path) -> Result<()> {
    let records = read_step_losses(&out.join(STEP_LOSSES))?;
    let mut steps_per_epoch: std::collections::BTreeMap<u64, u64> = Default::default();
    for r in &records {
        let (e, i) = (r["epoch"].as_u64().unwrap_or(0), r["iter"].as_u64().unwrap_or(0));
        let n = steps_per_epoch.entry(e).or_default();
        *n = (*n).max(i + 1);
    }
    let x = |r: &serde_json::Map<String, Value>| {
        let (e, i) = (r["epoch"].as_u64().unwrap_or(0), r["iter"].as_u64().unwrap_or(0));
        e as f64 + (i + 1) as f64 / steps_per_epoch[&e] as f64
    };
    let losses = [("loss_ita", "ITC loss"), ("loss_itm", "ITM loss")];
    let lines = losses
        .iter()
        .map(|(key, label)| Line {
            label: label.to_string(),
            points: records.iter().filter_map(|r| Some((x(r), r.get(*key)?.as_f64()?))).collect(),
        })
        .collect();
    let chart = Chart {
        title: format!("albef demo: training loss per step ({} steps)", records.len()),
        x_label: "epoch".into(),
        left: Axis { label: "loss".into(), lines, range: None },
        right: None,
        integer_x: false,
    };
    line_chart(&chart, &out.join("loss_per_step.png"))
}

fn write_report(
    out: &Path,
    data: &Path,
    config_text: &str,
    val: &Metrics,
    test: &Metrics,
    vqa: Option<&Metrics>,
    seconds: f64,
) -> Result<PathBuf> {
    write_curves(out)?;
    write_step_losses(out)?;

    // Examples: the first test images with their top captions.
    let scores = read_checkpoint(&out.join("scores_test.safetensors"), &Device::Cpu)?;
    let i2t = scores.tensors["score_i2t"].to_vec2::<f32>()?;
    let split: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(data.join("retrieval_test.json"))?)?;
    let texts: Vec<(usize, String)> = split
        .iter()
        .enumerate()
        .flat_map(|(i, e)| {
            e["caption"].as_array().into_iter().flatten().map(move |c| (i, c.as_str().unwrap_or("").to_string()))
        })
        .collect();
    std::fs::create_dir_all(out.join("examples"))?;
    let mut examples = String::new();
    for (i, entry) in split.iter().enumerate().take(4) {
        let image = entry["image"].as_str().unwrap_or("");
        let name = Path::new(image).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        std::fs::copy(data.join(image), out.join("examples").join(&name))?;
        let top = crate::util::topk_indices(&i2t[i], 3);
        examples.push_str(&format!("![test image {i}](examples/{name})\n\n"));
        for (rank, t) in top.iter().enumerate() {
            let (owner, caption) = &texts[*t];
            let mark = if *owner == i { "✓" } else { "✗" };
            examples.push_str(&format!("{}. {mark} {caption}\n", rank + 1));
        }
        examples.push('\n');
    }
    let table = metrics_table(&[("val (best epoch)", val), ("test", test)]);
    let vqa_section = match vqa {
        Some(m) => format!(
            "## VQA\n\nThe same small model as a VQA model (a 2-layer answer decoder), trained from random weights on \
colour, count and yes/no questions about the same images, answers ranked over the {}-answer list: VQA accuracy \
**{:.2}%** on {} test questions (`vqa/vqa_result.json`).\n\n",
            crate::data::synth::answer_list().len(),
            m["vqa_acc"],
            m["questions"]
        ),
        None => String::new(),
    };
    let report = format!(
        "# albef demo\n\nA small ALBEF (ViT 64-wide, 3 blocks, patch 8 at 32 px; BERT 64-wide, 2 text + 2 fusion layers) trained \
from random weights for image-text retrieval on synthetic shapes, with ITC + ITM and momentum distillation, on the CPU, in \
{seconds:.0} s.\n\n## Results (R@K in %, 100 test images, {} captions)\n\n{table}\nChance R@1 is 1% image-to-text and 1% text-to-image.\n\n\
{vqa_section}## Training curves\n\n![curves](curves.png)\n\nPer epoch (`log.txt`): the mean training losses (left axis) and the validation r_mean (right axis, %).\n\n\
![loss per step](loss_per_step.png)\n\nPer optimizer step (`losses.jsonl`): each training loss.\n\n\
## Examples: top-3 retrieved captions (✓ = a caption of this image)\n\n{examples}## Config\n\n```yaml\n{config_text}```\n",
        texts.len()
    );
    let path = out.join("report.md");
    write_atomic(&path, report.as_bytes())?;
    Ok(path)
}
