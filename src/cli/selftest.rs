//! `albef selftest`: the checks a GPU session runs in its few minutes, from one binary. The
//! fixture parity checks (the recorded reference training steps, embedded below), the fused ops
//! against their composed forms, a tiny training run, and the throughput bench, on the chosen
//! device and precisions. The same command on the CPU tests everything but the device kernels.
//!
//! Tolerances: fp32 within 1e-4 (relative, as the fixture tests); bf16 within 1e-2 on losses and
//! 2e-2 on the whole gradient (‖g − g_ref‖/‖g_ref‖): 8 significant bits make each matmul operand
//! 2⁻⁹ off at most, a few such roundings compound over the layers of the fixture models (see
//! `tests/precision.rs`, where the measured errors are 1.7e-3 and 4.4e-3).

use albef::checkpoint::{load_into, read_checkpoint};
use albef::model::contrastive_model::Replay;
use albef::model::{BertConfig, ContrastiveModel, ModelConfig, Objective, VisionConfig};
use albef::nn::{with_precision, LayerNorm, Precision};
use albef::tasks::demo::{run as demo, DemoOptions};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use clap::Args;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct SelftestArgs {
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Precisions to check: fp32, bf16, or both (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "fp32,bf16")]
    precision: Vec<Precision>,
    /// Where the tiny training run writes (default: a temporary folder, removed afterwards).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Skip the tiny training run (seconds on a GPU, about a minute on two CPU cores).
    #[arg(long)]
    no_train: bool,
    /// Skip the bench.
    #[arg(long)]
    no_bench: bool,
    /// Model of the bench: base (default on CUDA) or tiny (default on the CPU).
    #[arg(long)]
    bench_model: Option<String>,
}

/// A recorded set: its name and its files (name, contents).
type FixtureSet = (&'static str, [(&'static str, &'static [u8]); 4]);

/// The recorded sets (outputs of the official PyTorch code on tiny random-weight models).
const SETS: [FixtureSet; 2] = [
    (
        "retrieval",
        [
            ("checkpoint.pth", include_bytes!("../../tests/fixtures/retrieval/checkpoint.pth")),
            ("io.safetensors", include_bytes!("../../tests/fixtures/retrieval/io.safetensors")),
            ("manifest.json", include_bytes!("../../tests/fixtures/retrieval/manifest.json")),
            ("config.json", include_bytes!("../../tests/fixtures/retrieval/config.json")),
        ],
    ),
    (
        "pretrain",
        [
            ("checkpoint.pth", include_bytes!("../../tests/fixtures/pretrain/checkpoint.pth")),
            ("io.safetensors", include_bytes!("../../tests/fixtures/pretrain/io.safetensors")),
            ("manifest.json", include_bytes!("../../tests/fixtures/pretrain/manifest.json")),
            ("config.json", include_bytes!("../../tests/fixtures/pretrain/config.json")),
        ],
    ),
];

/// Pass/fail lines, counted.
#[derive(Default)]
struct Checks {
    passed: usize,
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, what: &str, err: f64, tol: f64) {
        let ok = err <= tol; // NaN fails
        println!("  [{}] {what}: error {err:.2e} (tolerance {tol:.0e})", if ok { "ok" } else { "FAIL" });
        if ok {
            self.passed += 1;
        } else {
            self.failed.push(format!("{what}: {err:.3e} > {tol:e}"));
        }
    }
}

fn model_config(v: &serde_json::Value) -> Result<ModelConfig> {
    let bert: BertConfig = serde_json::from_value(v["bert_config"].clone())?;
    let (vit, task) = (&v["vit"], &v["task_config"]);
    let u = |x: &serde_json::Value| x.as_u64().map(|n| n as usize).context("fixture config: expected a number");
    let vision = VisionConfig {
        patch_size: u(&vit["patch_size"])?,
        embed_dim: u(&vit["embed_dim"])?,
        depth: u(&vit["depth"])?,
        num_heads: u(&vit["num_heads"])?,
        mlp_ratio: vit["mlp_ratio"].as_f64().context("mlp_ratio")?,
        layer_norm_eps: vit["layer_norm_eps"].as_f64().context("layer_norm_eps")?,
        image_res: u(&task["image_res"])?,
    };
    Ok(ModelConfig {
        vision,
        bert,
        embed_dim: u(&task["embed_dim"])?,
        temp: task["temp"].as_f64().context("temp")?,
        queue_size: u(&task["queue_size"])?,
        momentum: task["momentum"].as_f64().context("momentum")?,
        distill: task["distill"].as_bool().context("distill")?,
        ..ModelConfig::default()
    })
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// ‖a − b‖ / ‖b‖.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (flat(a)?, flat(b)?);
    let d: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    Ok((d / n.max(1e-30)).sqrt())
}

/// |got − want| / max(|want|, 1), as the fixture tests define "within".
fn scalar_err(got: &Tensor, want: f64) -> Result<f64> {
    let g = got.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
    Ok((g - want).abs() / want.abs().max(1.0))
}

/// One recorded training step (recorded negatives and masks) on `dev`, compared with the
/// reference's losses and gradients.
fn fixture_step(dir: &Path, set: &str, dev: &Device, p: Precision, checks: &mut Checks) -> Result<()> {
    let dir = dir.join(set);
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json"))?)?;
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
    let io: HashMap<String, Tensor> = candle_core::safetensors::load(dir.join("io.safetensors"), dev)?;
    let scalar = |k: &str| manifest["scalars"][k]["value"].as_f64().with_context(|| format!("{set}: no scalar {k}"));
    let objective = if set == "pretrain" { Objective::Pretrain } else { Objective::Retrieval };
    let model = ContrastiveModel::new(&model_config(&config)?, objective, dev, 0)?;
    load_into(&model.store, &read_checkpoint(&dir.join("checkpoint.pth"), dev)?.tensors)?;
    let idx = |k: &str| -> Result<Vec<usize>> { Ok(io[k].to_vec1::<i64>()?.into_iter().map(|x| x as usize).collect()) };
    let get = |k: &str| io.get(k).with_context(|| format!("{set}: no array {k}"));
    let replay = Replay {
        neg_image: idx("train_neg_image_idx")?,
        neg_text: idx("train_neg_text_idx")?,
        mlm_ids: io.get("train_mlm_input_ids").cloned(),
        mlm_labels: io.get("train_mlm_labels").cloned(),
    };
    let (ids, mask, img_idx) = match objective {
        Objective::Pretrain => (get("input_ids")?, get("attention_mask")?, None),
        Objective::Retrieval => (get("train_input_ids")?, get("train_attention_mask")?, Some(get("train_idx")?)),
    };
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let (loss_tol, grad_tol) = match p {
        Precision::Fp32 => (1e-4, 1e-4),
        Precision::Bf16 => (1e-2, 2e-2),
    };
    let losses = with_precision(p, || {
        model
            .forward_train(get("image")?, ids, mask, img_idx, scalar("train_alpha")?, Some(&replay), &mut rng, false)
            .map_err(anyhow::Error::from)
    })?;
    let mut named = vec![("ita", losses.ita.clone()), ("itm", losses.itm.clone())];
    if let Some(m) = &losses.mlm {
        named.push(("mlm", m.clone()));
    }
    for (name, l) in &named {
        checks.check(
            &format!("{set} {p} loss_{name}"),
            scalar_err(l, scalar(&format!("train_loss_{name}"))?)?,
            loss_tol,
        );
    }
    let total = losses.total()?;
    let grads = with_precision(p, || total.backward())?;
    // Every recorded full gradient, as one vector, and the total norm.
    let (mut diff, mut norm) = (0f64, 0f64);
    for (key, want) in &io {
        let Some(name) = key.strip_prefix("grad.") else { continue };
        let var = model.store.get(name).with_context(|| format!("{set}: no parameter {name}"))?;
        let got = grads.get(&var).with_context(|| format!("{set}: no gradient for {name}"))?;
        let (g, w) = (flat(got)?, flat(want)?);
        diff += g.iter().zip(&w).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
        norm += w.iter().map(|b| (*b as f64).powi(2)).sum::<f64>();
    }
    checks.check(&format!("{set} {p} recorded gradients (relative)"), (diff / norm).sqrt(), grad_tol);
    let mut total_sq = 0f64;
    for name in manifest["grad_norms"].as_object().context("grad_norms")?.keys() {
        let var = model.store.get(name).with_context(|| format!("{set}: no parameter {name}"))?;
        if let Some(g) = grads.get(&var) {
            total_sq += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
    }
    let want = scalar("grad_total_norm")?;
    checks.check(&format!("{set} {p} gradient total norm"), (total_sq.sqrt() - want).abs() / want, grad_tol);
    Ok(())
}

/// softmax (with an additive mask of −10000 and −∞), log-softmax and LayerNorm on `dev` (the
/// device's kernels where it has them) against their composed forms on the CPU in f32: values
/// and input gradients, for f32 and bf16 inputs (which these ops widen to f32).
fn fused_ops(dev: &Device, checks: &mut Checks) -> Result<()> {
    let cpu = Device::Cpu;
    let x = Tensor::randn(0f32, 3.0, (4, 6, 33), &cpu)?;
    let mask: Vec<f32> = (0..4 * 6 * 33)
        .map(|i| {
            if i % 33 == 32 {
                -10000.0
            } else if i % 7 == 3 {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let masked = (&x + Tensor::from_vec(mask, (4, 6, 33), &cpu)?)?;
    let r = Tensor::randn(0f32, 1.0, (4, 6, 33), &cpu)?;
    let ln_cpu =
        LayerNorm { weight: Tensor::randn(1f32, 0.1, 33, &cpu)?, bias: Tensor::randn(0f32, 0.1, 33, &cpu)?, eps: 1e-6 };
    let ln_dev = LayerNorm { weight: ln_cpu.weight.to_device(dev)?, bias: ln_cpu.bias.to_device(dev)?, eps: 1e-6 };
    type Op<'a> = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + 'a>;
    let cases: Vec<(&str, &Tensor, Op, Op)> = vec![
        ("softmax (masked)", &masked, Box::new(albef::nn::softmax), Box::new(albef::nn::softmax_composed)),
        (
            "log-softmax",
            &x,
            Box::new(albef::nn::log_softmax),
            Box::new(|t: &Tensor| albef::nn::softmax_composed(t)?.log()),
        ),
        ("layer norm", &x, Box::new(|t: &Tensor| ln_dev.forward(t)), Box::new(|t: &Tensor| ln_cpu.forward_composed(t))),
    ];
    for (name, input, on_dev, composed) in cases {
        for dtype in [DType::F32, DType::BF16] {
            let v = Var::from_tensor(&input.to_device(dev)?.to_dtype(dtype)?)?;
            let y = on_dev(v.as_tensor())?;
            let g = (y.to_dtype(DType::F32)? * r.to_device(dev)?)?.sum_all()?.backward()?;
            // The reference: the composed op on the same (rounded) input, in f32 on the CPU.
            let vc = Var::from_tensor(&input.to_dtype(dtype)?.to_dtype(DType::F32)?)?;
            let yc = composed(vc.as_tensor())?;
            let gc = (&yc * &r)?.sum_all()?.backward()?;
            // Values where the composed one is finite (log-softmax of a masked entry is −∞).
            let (a, b) = (flat(&y)?, flat(&yc)?);
            let err = a
                .iter()
                .zip(&b)
                .filter(|(_, w)| w.is_finite())
                .map(|(g, w)| ((g - w) / w.abs().max(1.0)).abs() as f64)
                .fold(0.0, f64::max);
            let tol = 1e-5;
            checks.check(&format!("{name} {dtype:?} forward"), err, tol);
            let gd = g.get(&v).context("no gradient")?;
            // A bf16 input gets its gradient back in bf16 (8 bits: 2⁻⁸ relative rounding).
            let tol = if dtype == DType::F32 { 1e-4 } else { 1e-2 };
            checks.check(
                &format!("{name} {dtype:?} backward (relative)"),
                rel_err(gd, gc.get(&vc).context("no gradient")?)?,
                tol,
            );
        }
    }
    Ok(())
}

/// Training on the device: (1) 12 AdamW steps of the retrieval fixture model on its batch
/// (dropout on, sampled negatives) must lower the ITC + ITM loss by a fifth; (2) the demo's model
/// through the whole task path (synthetic data, loader, harness, fit, evaluation) for 2 epochs
/// must give finite losses and metrics. (Its loss is no falling-loss check in so few epochs: the
/// queue fills with harder negatives and α ramps up, both raising the loss.)
fn tiny_training(dir: &Path, out: &Path, dev: &Device, p: Precision, checks: &mut Checks) -> Result<()> {
    let set = dir.join("retrieval");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(set.join("config.json"))?)?;
    let io: HashMap<String, Tensor> = candle_core::safetensors::load(set.join("io.safetensors"), dev)?;
    let model = ContrastiveModel::new(&model_config(&config)?, Objective::Retrieval, dev, 0)?;
    load_into(&model.store, &read_checkpoint(&set.join("checkpoint.pth"), dev)?.tensors)?;
    let mut optimizer = albef::train::optim::AdamW::new(&model.store, 0.02)?;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    let get = |k: &str| io.get(k).with_context(|| format!("retrieval: no array {k}"));
    let mut totals = Vec::new();
    with_precision(p, || -> Result<()> {
        for _ in 0..12 {
            let l = model.forward_train(
                get("image")?,
                get("train_input_ids")?,
                get("train_attention_mask")?,
                Some(get("train_idx")?),
                0.4,
                None,
                &mut rng,
                true,
            )?;
            let total = l.total()?;
            totals.push(total.to_scalar::<f32>()? as f64);
            optimizer.step(&total.backward()?, 1e-3)?;
        }
        Ok(())
    })?;
    println!("  fixture model, 12 steps ({p}): ITC+ITM {totals:.3?}");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    checks.check(
        &format!("training {p}: loss(last 3 steps) / loss(first 3)"),
        mean(&totals[9..]) / mean(&totals[..3]),
        0.8,
    );

    let demo_dir = out.join(format!("demo-{p}"));
    let opts = DemoOptions {
        output_dir: demo_dir.clone(),
        train_images: 160,
        test_images: 20,
        epochs: 2,
        batch_size: 16,
        vqa_epochs: 0,
        device: dev.clone(),
        precision: p,
        ..Default::default()
    };
    let start = Instant::now();
    let summary = demo(&opts)?;
    let log = std::fs::read_to_string(demo_dir.join("log.txt"))?;
    let losses: Vec<f64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r.get("epoch").is_some())
        .filter_map(|r| Some(r["train_loss_ita"].as_f64()? + r["train_loss_itm"].as_f64()?))
        .collect();
    let r_mean = summary.test.get("r_mean").copied().unwrap_or(f64::NAN);
    println!(
        "  demo model, 2 epochs on 160 synthetic images ({p}, {:.1} s): mean ITC+ITM per epoch {losses:.3?}; test r_mean {r_mean:.1}",
        start.elapsed().as_secs_f64()
    );
    let finite = losses.len() == 2 && losses.iter().all(|l| l.is_finite()) && r_mean.is_finite();
    checks.check(
        &format!("demo run {p}: finite losses and metrics (0 = yes)"),
        if finite { 0.0 } else { f64::NAN },
        0.0,
    );
    Ok(())
}

pub fn run(a: SelftestArgs) -> Result<()> {
    let start = Instant::now();
    let dev = super::device(&a.device)?;
    println!(
        "albef selftest on {:?}, precisions {:?}",
        dev,
        a.precision.iter().map(|p| p.to_string()).collect::<Vec<_>>()
    );
    let tmp = std::env::temp_dir().join(format!("albef-selftest-{}", std::process::id()));
    let out = a.out.clone().unwrap_or_else(|| tmp.clone());
    let result = (|| -> Result<Checks> {
        let mut checks = Checks::default();
        for (set, files) in SETS {
            std::fs::create_dir_all(tmp.join(set))?;
            for (name, bytes) in files {
                std::fs::write(tmp.join(set).join(name), bytes)?;
            }
        }
        println!("fixture parity (the reference's recorded training steps):");
        for &p in &a.precision {
            for (set, _) in SETS {
                fixture_step(&tmp, set, &dev, p, &mut checks)?;
            }
        }
        println!("fused ops on the device against their composed forms on the CPU (f32):");
        fused_ops(&dev, &mut checks)?;
        if !a.no_train {
            for &p in &a.precision {
                tiny_training(&tmp, &out, &dev, p, &mut checks)?;
            }
        }
        if !a.no_bench {
            let model =
                a.bench_model.clone().unwrap_or_else(|| if dev.is_cpu() { "tiny".into() } else { "base".into() });
            let (cfg, sizes) = match model.as_str() {
                "base" => {
                    (ModelConfig::default(), super::bench::Sizes { train_batch: 32, batch: 128, text_len: 30, reps: 3 })
                }
                "tiny" => (
                    super::bench::tiny_config(),
                    super::bench::Sizes { train_batch: 16, batch: 32, text_len: 16, reps: 3 },
                ),
                other => bail!("unknown --bench-model {other:?} (base, tiny)"),
            };
            for &p in &a.precision {
                println!("bench ({model} model, {p}):");
                for f in super::bench::throughput(&cfg, &dev, p, &sizes)? {
                    println!("  {f}");
                }
            }
        }
        Ok(checks)
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    let checks = result?;
    println!(
        "selftest: {} checks passed, {} failed, {:.1} s",
        checks.passed,
        checks.failed.len(),
        start.elapsed().as_secs_f64()
    );
    if !checks.failed.is_empty() {
        bail!("selftest failed:\n  {}", checks.failed.join("\n  "));
    }
    Ok(())
}
