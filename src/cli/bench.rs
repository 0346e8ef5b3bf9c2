//! `albef bench`: forward throughput of the full-size encoders (random weights) on this machine.
//! Each figure is printed with a ratio against a baseline measured in the same run: the same
//! work done with candle's plain `Tensor::matmul` on the same shapes (the floor of what the
//! model's matmuls cost), so the ratio shows the overhead of everything around the matmuls.

use albef::checkpoint::{save_pth, StateDict};
use albef::eval::retrieval::{score_matrices, EncodedSplit};
use albef::model::bert::{BertModel, CrossStates, Layout, Mode};
use albef::model::vit::VisionTransformer;
use albef::model::{BertConfig, ContrastiveModel, ModelConfig, Objective, VisionConfig, VqaModel};
use albef::nn::ParamStore;
use albef::nn::{profile, with_precision, Precision};
use albef::task::Task;
use albef::tasks::{load_checkpoint, save_model, TeacherInit};
use albef::train::optim::AdamW;
use albef::util::mem;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// Timed repetitions per measurement (after one warm-up).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Image encoder batch.
    #[arg(long, default_value_t = 8)]
    image_batch: usize,
    /// Fusion batch and text length.
    #[arg(long, default_value_t = 16)]
    text_batch: usize,
    #[arg(long, default_value_t = 30)]
    text_len: usize,
    #[arg(long, default_value_t = 384)]
    image_res: usize,
    /// Sections to run: throughput, vit, fusion, rerank, train, pretrain, vqa, mem, search (not by
    /// default: it writes a full-size checkpoint and a photo folder to a temporary folder), ann (not
    /// by default: builds HNSW graphs over `--ann-sizes` synthetic vectors).
    #[arg(long, value_delimiter = ',', default_value = "throughput,vit,fusion,rerank,train,pretrain,vqa,mem")]
    only: Vec<String>,
    /// Device of the throughput section (the other sections run on the CPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Precision of the throughput section.
    #[arg(long, default_value = "fp32")]
    precision: albef::nn::Precision,
    /// Model of the throughput section: `base` (ViT-B/16 + BERT-base, the paper's) or `tiny`
    /// (the demo's, for a quick run on a CPU).
    #[arg(long, default_value = "base")]
    model: String,
    /// Throughput section: retrieval training batch (the config's batch size: 32 on Flickr30K).
    #[arg(long, default_value_t = 32)]
    tp_train_batch: usize,
    /// Throughput section: images per encoding batch, and texts re-ranked per image.
    #[arg(long, default_value_t = 64)]
    tp_batch: usize,
    /// Throughput section: timed repetitions.
    #[arg(long, default_value_t = 3)]
    tp_reps: usize,
    /// Search section: the retrieval YAML that sizes the model (as `albef index --config`).
    #[arg(long, default_value = "./configs/Retrieval_flickr.yaml")]
    search_config: PathBuf,
    /// Search section: photos (640×480 JPEG) indexed for the throughput figure.
    #[arg(long, default_value_t = 32)]
    search_images: usize,
    /// Search section: index sizes (synthetic unit vectors) for the query latencies.
    #[arg(long, value_delimiter = ',', default_value = "10000,1000000")]
    search_sizes: Vec<usize>,
    /// ANN section: index sizes (random 256-d unit vectors) for `search --ann` against exact
    /// (building the graph over 10k took 336 s on this 2-core CPU; it grows a little faster
    /// than the size).
    #[arg(long, value_delimiter = ',', default_value = "10000")]
    ann_sizes: Vec<usize>,
    /// Search section: the ITM re-rank depth measured beside the plain ITC query.
    #[arg(long, default_value_t = 16)]
    search_rerank: usize,
    /// Where the memory section writes its two full-size checkpoints (about 1.9 GB each; removed
    /// afterwards).
    #[arg(long)]
    mem_dir: Option<PathBuf>,
    /// Internal: the memory section's child process (load this file, evaluate, print the peak).
    #[arg(long, hide = true)]
    mem_child: Option<PathBuf>,
    /// Retrieval training-step batch.
    #[arg(long, default_value_t = 4)]
    train_batch: usize,
    /// VQA questions per batch, answer-list size and k_test.
    #[arg(long, default_value_t = 4)]
    vqa_batch: usize,
    #[arg(long, default_value_t = 3128)]
    vqa_answers: usize,
    #[arg(long, default_value_t = 128)]
    vqa_k: usize,
    /// ITM re-rank candidates per image (k_test).
    #[arg(long, default_value_t = 32)]
    k_test: usize,
}

fn time<F: FnMut() -> Result<()>>(reps: usize, mut f: F) -> Result<f64> {
    f()?;
    let start = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    Ok(start.elapsed().as_secs_f64() / reps as f64)
}

/// Best and median of `reps` timed runs after one warm-up (the reference's `bench.py` reports
/// the best), with the time per op kind of the timed runs (`nn::profile`), per run.
struct Stats {
    best: f64,
    median: f64,
    per_kind: Vec<(profile::Kind, f64, f64)>,
}

fn time_stats<F: FnMut() -> Result<()>>(reps: usize, mut f: F) -> Result<Stats> {
    profile::enable(true);
    let result = (|| {
        f()?;
        profile::take();
        let mut runs = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            let start = Instant::now();
            f()?;
            runs.push(start.elapsed().as_secs_f64());
        }
        let n = runs.len() as f64;
        let per_kind = profile::take().into_iter().map(|(k, fw, bw)| (k, fw / n, bw / n)).collect();
        runs.sort_by(f64::total_cmp);
        Ok(Stats { best: runs[0], median: runs[runs.len() / 2], per_kind })
    })();
    profile::enable(false);
    result
}

impl Stats {
    fn summary(&self) -> String {
        format!("best {:.3} s, median {:.3} s", self.best, self.median)
    }

    /// "matmul 4.10 s, softmax 0.31 s, …, other 0.52 s" for the forward (`backward`: the
    /// backward) part of a run that took `total` seconds.
    fn split(&self, total: f64, backward: bool) -> String {
        let mut parts = Vec::new();
        let mut known = 0.0;
        // The optimizer has a line of its own.
        for &(k, fw, bw) in self.per_kind.iter().filter(|(k, _, _)| *k != profile::Kind::AdamW) {
            let t = if backward { bw } else { fw };
            if t > 0.0005 {
                parts.push(format!("{} {t:.2} s", k.name()));
                known += t;
            }
        }
        parts.push(format!("other {:.2} s", (total - known).max(0.0)));
        parts.join(", ")
    }
}

/// The dense matmuls of one transformer layer of width d, MLP width 4d, sequence n, batch b,
/// plus the two attention matmuls: the products the reference runs for the layer (candle's
/// matmul), a lower bound for its cost. albef's cross-attention does fewer (it goes through
/// the key and value weights when that is cheaper), so fusion can beat this floor.
fn matmul_floor(
    b: usize,
    n: usize,
    d: usize,
    heads: usize,
    kv_len: usize,
    cross: bool,
    dev: &Device,
) -> Result<Box<dyn FnMut() -> Result<()>>> {
    let x = Tensor::randn(0f32, 1.0, (b * n, d), dev)?;
    let w = Tensor::randn(0f32, 0.02, (d, d), dev)?;
    let w1 = Tensor::randn(0f32, 0.02, (d, 4 * d), dev)?;
    let w2 = Tensor::randn(0f32, 0.02, (4 * d, d), dev)?;
    let q = Tensor::randn(0f32, 1.0, (b, heads, n, d / heads), dev)?;
    let k = Tensor::randn(0f32, 1.0, (b, heads, d / heads, kv_len), dev)?;
    let v = Tensor::randn(0f32, 1.0, (b, heads, kv_len, d / heads), dev)?;
    let kv_x = Tensor::randn(0f32, 1.0, (b * kv_len, d), dev)?;
    let k_self = Tensor::randn(0f32, 1.0, (b, heads, d / heads, n), dev)?;
    let v_self = Tensor::randn(0f32, 1.0, (b, heads, n, d / heads), dev)?;
    Ok(Box::new(move || {
        for _ in 0..4 {
            x.matmul(&w)?;
        }
        if cross {
            x.matmul(&w)?;
            x.matmul(&w)?;
            kv_x.matmul(&w)?;
            kv_x.matmul(&w)?;
            q.matmul(&k)?.matmul(&v)?;
        }
        q.matmul(&k_self)?.matmul(&v_self)?;
        x.matmul(&w1)?.matmul(&w2)?;
        Ok(())
    }))
}

/// Token ids and mask of the reference bench's training batch: its captions cycle through four
/// of 10, 12, 11 and 12 word pieces ([CLS] and [SEP] included), padded to the longest of the
/// batch (`padding="longest"`), so the step here reads the same shapes.
fn reference_captions(b: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    const TOKENS: [usize; 4] = [10, 12, 11, 12];
    let lens: Vec<usize> = (0..b).map(|i| TOKENS[i % 4]).collect();
    let len = lens.iter().copied().max().unwrap_or(1);
    let ids = token_ids(b, len, dev)?;
    let mask: Vec<i64> = lens.iter().flat_map(|&n| (0..len).map(move |t| i64::from(t < n))).collect();
    let mask = Tensor::from_vec(mask, (b, len), dev)?;
    Ok(((ids * &mask)?, mask))
}

/// Random ITC-style inputs: `n` token rows of length `len` starting with [CLS].
fn token_ids(n: usize, len: usize, dev: &Device) -> Result<Tensor> {
    let ids = (0..n * len).map(|i| if i % len == 0 { 101i64 } else { 1000 + (i as i64 * 31) % 20000 }).collect();
    Ok(Tensor::from_vec(ids, (n, len), dev)?)
}

/// The memory section's child: builds the evaluation model, loads `path` through the task
/// loader, encodes and scores a batch, and prints the peak RSS of all that (one line, bytes).
fn mem_child(a: &BenchArgs, cfg: &ModelConfig, path: &Path) -> Result<()> {
    let dev = Device::Cpu;
    let mut cfg = cfg.clone();
    cfg.mode.inference = true;
    let model = ContrastiveModel::new(&cfg, Objective::Retrieval, &dev, 0)?;
    load_checkpoint(&model, Task::Retrieval, path, true, TeacherInit::FromLoaded)?;
    let images = Tensor::randn(0f32, 1.0, (a.image_batch, 3, a.image_res, a.image_res), &dev)?;
    let texts = a.k_test.max(1);
    let ids = token_ids(texts, a.text_len, &dev)?;
    let mask = Tensor::ones((texts, a.text_len), DType::I64, &dev)?;
    let (image_states, image_feat) = model.encode_image(&images)?;
    let (text_states, text_feat) = model.encode_text(&ids, &mask)?;
    let enc = EncodedSplit { image_states, image_feat, text_states, text_mask: mask, text_feat };
    score_matrices(&model, &enc, a.k_test.min(texts))?;
    let (_, peak) = mem::rss().context("no /proc/self/status: peak RSS is not measurable here")?;
    println!("{peak}");
    Ok(())
}

/// Peak RSS of load + evaluate of the full-size retrieval model (student + teacher, random
/// weights) saved as `.pth` and as safetensors, each in a fresh process.
fn mem_section(a: &BenchArgs, cfg: &ModelConfig) -> Result<()> {
    if mem::rss().is_none() {
        println!("memory: not measurable on this system (no /proc/self/status)");
        return Ok(());
    }
    let dir =
        a.mem_dir.clone().unwrap_or_else(std::env::temp_dir).join(format!("albef-bench-mem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (pth, st) = (dir.join("retrieval.pth"), dir.join("retrieval.safetensors"));
    let weights_bytes = {
        let model = ContrastiveModel::new(cfg, Objective::Retrieval, &Device::Cpu, 0)?;
        let tensors: StateDict = model.store.named_tensors().into_iter().collect();
        let student: usize = model.store.trainable().iter().map(|p| p.var.elem_count() * 4).sum();
        save_model(&model, Task::Retrieval, &st, &Default::default())?;
        save_pth(&tensors, &pth)?;
        student
    };
    let exe = std::env::current_exe()?;
    let result = (|| -> Result<()> {
        for (label, file) in [(".pth", &pth), ("safetensors", &st)] {
            let out = std::process::Command::new(&exe)
                .arg("bench")
                .args(["--image-batch", &a.image_batch.to_string(), "--image-res", &a.image_res.to_string()])
                .args(["--k-test", &a.k_test.to_string(), "--text-len", &a.text_len.to_string()])
                .arg("--mem-child")
                .arg(file)
                .output()?;
            if !out.status.success() {
                bail!("memory bench child failed on {}:\n{}", file.display(), String::from_utf8_lossy(&out.stderr));
            }
            let peak: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().context("memory bench child output")?;
            let size = std::fs::metadata(file)?.len();
            println!(
                "memory: load ({label}, {:.2} GB file, teacher skipped) + evaluate {} images @{} px, k_test {}: peak RSS {:.2} GB  (baseline: the student's fp32 weights, {:.2} GB; ratio {:.2}x)",
                size as f64 / 1e9,
                a.image_batch,
                a.image_res,
                a.k_test,
                peak as f64 / 1e9,
                weights_bytes as f64 / 1e9,
                peak as f64 / weights_bytes as f64
            );
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.only.iter().any(|o| o == "throughput") && a.mem_child.is_none() {
        let dev = super::device(&a.device)?;
        let cfg = match a.model.as_str() {
            "base" => ModelConfig {
                vision: VisionConfig { image_res: a.image_res, ..Default::default() },
                ..Default::default()
            },
            "tiny" => tiny_config(),
            other => bail!("unknown --model {other:?} (base, tiny)"),
        };
        let sizes = Sizes { train_batch: a.tp_train_batch, batch: a.tp_batch, text_len: a.text_len, reps: a.tp_reps };
        for f in throughput(&cfg, &dev, a.precision, &sizes)? {
            println!("{f}");
        }
        if a.only.len() == 1 {
            return Ok(());
        }
    }
    let dev = Device::Cpu;
    let mut cfg = ModelConfig::default();
    cfg.vision.image_res = a.image_res;
    if let Some(path) = &a.mem_child {
        return mem_child(&a, &cfg, path);
    }
    let tokens = cfg.vision.num_patches() + 1;
    let want = |s: &str| a.only.iter().any(|o| o == s);
    println!("threads: {}", candle_core::utils::get_num_threads());

    if want("vit") {
        let store = ParamStore::new(&dev, 0);
        let vit = VisionTransformer::new(&store.root(false), &cfg.vision)?;
        let image = Tensor::randn(0f32, 1.0, (a.image_batch, 3, a.image_res, a.image_res), &dev)?;
        let t_vit = time_stats(a.reps, || vit.forward(&image).map(|_| ()).map_err(Into::into))?;
        let mut floor = matmul_floor(a.image_batch, tokens, 768, 12, tokens, false, &dev)?;
        let t_floor = time_stats(a.reps, &mut floor)?.best * cfg.vision.depth as f64;
        println!(
            "image encoder ViT-B/16 @{} px, batch {}: {}, {:.2} images/s (best)  (matmul floor {:.3} s, ratio {:.2}x)",
            a.image_res,
            a.image_batch,
            t_vit.summary(),
            a.image_batch as f64 / t_vit.best,
            t_floor,
            t_vit.best / t_floor
        );
        println!("  time per op kind: {}", t_vit.split(t_vit.best, false));
    }

    if want("fusion") {
        let store = ParamStore::new(&dev, 0);
        let bert = BertModel::new(&store.root(false).pp("text_encoder"), &cfg.bert, Layout::Encoder)?;
        let text = Tensor::randn(0f32, 1.0, (a.text_batch, a.text_len, 768), &dev)?;
        let mask = Tensor::ones((a.text_batch, a.text_len), DType::I64, &dev)?;
        let img_states = Tensor::randn(0f32, 1.0, (a.text_batch, tokens, 768), &dev)?;
        let cross = [CrossStates::image(&img_states)];
        let t_fusion = time_stats(a.reps, || {
            bert.forward_embeds(&text, &mask, &cross, Mode::Fusion, false).map(|_| ()).map_err(Into::into)
        })?;
        let fusion_layers = cfg.bert.num_hidden_layers - cfg.bert.fusion_layer;
        let mut floor = matmul_floor(a.text_batch, a.text_len, 768, 12, tokens, true, &dev)?;
        let t_floor = time_stats(a.reps, &mut floor)?.best * fusion_layers as f64;
        println!(
            "fusion layers (6 x self+cross attention), batch {} x {} tokens vs {} image tokens: {}, {:.1} pairs/s (best)  (the reference's matmuls alone {:.3} s, ratio {:.2}x)",
            a.text_batch,
            a.text_len,
            tokens,
            t_fusion.summary(),
            a.text_batch as f64 / t_fusion.best,
            t_floor,
            t_fusion.best / t_floor
        );
        println!("  time per op kind: {}", t_fusion.split(t_fusion.best, false));
    }

    if want("rerank") || want("train") {
        let model = ContrastiveModel::new(&cfg, Objective::Retrieval, &dev, 0)?;
        let n_img = 2;
        let images = Tensor::randn(0f32, 1.0, (n_img, 3, a.image_res, a.image_res), &dev)?;
        let texts = a.k_test.max(a.train_batch);
        let ids = Tensor::from_vec(
            (0..texts * a.text_len)
                .map(|i| if i % a.text_len == 0 { 101i64 } else { 1000 + (i as i64 * 31) % 20000 })
                .collect::<Vec<_>>(),
            (texts, a.text_len),
            &dev,
        )?;
        let mask = Tensor::ones((texts, a.text_len), DType::I64, &dev)?;
        if want("rerank") {
            // Evaluation: encode, then ITM on the top-k texts of every image and the top-k images
            // of every text (here: all pairs in both directions).
            let (image_states, image_feat) = model.encode_image(&images)?;
            let (text_states, text_feat) = model.encode_text(&ids, &mask)?;
            let enc = EncodedSplit { image_states, image_feat, text_states, text_mask: mask.clone(), text_feat };
            let k = a.k_test.min(texts);
            let t = time(a.reps, || score_matrices(&model, &enc, k).map(|_| ()).map_err(Into::into))?;
            let pairs = (n_img * k + texts * n_img.min(k)) as f64;
            let fusion_only = time(a.reps, || {
                let img = enc.image_states.narrow(0, 0, 1)?.repeat((k, 1, 1))?;
                model
                    .fuse(&enc.text_states.narrow(0, 0, k)?, &enc.text_mask.narrow(0, 0, k)?, &img)
                    .map(|_| ())
                    .map_err(Into::into)
            })?;
            println!(
                "retrieval evaluation, ITM re-rank (k_test {k}): {:.1} pairs/s  (baseline: the reference's way, image states repeated per pair, {:.1} pairs/s; time ratio {:.2}x)",
                pairs / t,
                k as f64 / fusion_only,
                t / pairs / (fusion_only / k as f64)
            );
        }
        if want("train") {
            let b = a.train_batch;
            let image = Tensor::randn(0f32, 1.0, (b, 3, a.image_res, a.image_res), &dev)?;
            let (ids, mask) = reference_captions(b, &dev)?;
            let idx = Tensor::arange(0i64, b as i64, &dev)?;
            let mut rng = rand::rngs::StdRng::seed_from_u64(0);
            let mut optimizer = AdamW::new(&model.store, 0.02)?;
            // Forward (student, EMA, teacher, losses), backward and optimizer, per timed step.
            let mut parts = [0f64; 3];
            let mut steps = 0usize;
            let t_train = time_stats(a.reps, || {
                let t0 = Instant::now();
                let l = model.forward_train(&image, &ids, &mask, Some(&idx), 0.4, None, &mut rng, true)?;
                let loss = l.total()?;
                let t1 = Instant::now();
                profile::set_backward(true);
                let grads = loss.backward();
                profile::set_backward(false);
                let grads = grads?;
                let t2 = Instant::now();
                optimizer.step(&grads, 1e-5)?;
                if steps > 0 {
                    for (p, d) in parts.iter_mut().zip([t1 - t0, t2 - t1, t2.elapsed()]) {
                        *p += d.as_secs_f64();
                    }
                }
                steps += 1;
                Ok(())
            })?;
            let n = (steps - 1).max(1) as f64;
            let [fwd, bwd, opt] = parts.map(|p| p / n);
            let t_fwd = time(1, || model.encode_image(&image).map(|_| ()).map_err(Into::into))?;
            println!(
                "retrieval training step (ITC + ITM, teacher, backward, AdamW), batch {b} @{} px: {}, {:.3} images/s (best)  (baseline: the image encoder forward alone, {:.1} s, ratio {:.1}x)",
                a.image_res,
                t_train.summary(),
                b as f64 / t_train.best,
                t_fwd,
                t_train.best / t_fwd
            );
            println!("  forward (student, EMA, teacher, losses) {fwd:.2} s: {}", t_train.split(fwd, false));
            println!("  backward {bwd:.2} s: {}", t_train.split(bwd, true));
            println!("  optimizer {opt:.2} s (AdamW over {} tensors)", optimizer.vars().len());
        }
    }
    if want("mem") {
        mem_section(&a, &cfg)?;
    }
    if want("search") {
        search_section(&a)?;
    }
    if want("ann") {
        ann_section(&a)?;
    }
    if want("pretrain") {
        // Pre-training's own sizes: 256 px, captions of up to 25 tokens, the MLM head.
        let mut pcfg = cfg.clone();
        pcfg.vision.image_res = 256;
        let model = ContrastiveModel::new(&pcfg, Objective::Pretrain, &dev, 0)?;
        let (b, len) = (a.train_batch, 25);
        let image = Tensor::randn(0f32, 1.0, (b, 3, 256, 256), &dev)?;
        let ids = Tensor::from_vec(
            (0..b * len)
                .map(|i| if i % len == 0 { 101i64 } else { 1000 + (i as i64 * 31) % 20000 })
                .collect::<Vec<_>>(),
            (b, len),
            &dev,
        )?;
        let mask = Tensor::ones((b, len), DType::I64, &dev)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let mut optimizer = AdamW::new(&model.store, 0.02)?;
        let t_step = time(1, || {
            let (losses, _) = albef::tasks::pretrain::losses(&model, &image, &ids, &mask, 0.4, None, &mut rng, true)?;
            let mut total = losses[0].1.clone();
            for (_, l) in &losses[1..] {
                total = (total + l)?;
            }
            optimizer.step(&total.backward()?, 1e-4)?;
            Ok(())
        })?;
        let t_fwd = time(1, || model.encode_image(&image).map(|_| ()).map_err(Into::into))?;
        println!(
            "pre-training step (ITC + ITM + MLM, teacher, backward, AdamW), batch {b} @256 px: {:.1} s/step, {:.3} samples/s  (baseline: the image encoder forward alone, {:.1} s, ratio {:.1}x)",
            t_step,
            b as f64 / t_step,
            t_fwd,
            t_step / t_fwd
        );
    }
    if want("vqa") {
        let model = VqaModel::new(&cfg, &dev, 0)?;
        let b = a.vqa_batch;
        let image = Tensor::randn(0f32, 1.0, (b, 3, a.image_res, a.image_res), &dev)?;
        let q_len = 12;
        let q_ids = Tensor::from_vec(
            (0..b * q_len)
                .map(|i| if i % q_len == 0 { 101i64 } else { 1000 + (i as i64 * 37) % 20000 })
                .collect::<Vec<_>>(),
            (b, q_len),
            &dev,
        )?;
        let q_mask = Tensor::ones((b, q_len), DType::I64, &dev)?;
        // Answers of 1–3 word pieces + [SEP], padded to the longest (as the real list is).
        let a_len = 5;
        let mut ids = Vec::with_capacity(a.vqa_answers * a_len);
        for n in 0..a.vqa_answers {
            let words = 1 + n % 3;
            for t in 0..a_len {
                ids.push(match t {
                    0 => 101i64,
                    t if t <= words => 1000 + ((n * 7 + t * 13) % 25000) as i64,
                    t if t == words + 1 => 102,
                    _ => 0,
                });
            }
        }
        let answer_ids = Tensor::from_vec(ids, (a.vqa_answers, a_len), &dev)?;
        let answer_mask = answer_ids.ne(0i64)?.to_dtype(DType::I64)?;
        let t_rank = time(1, || {
            let q = model.question_states(&image, &q_ids, &q_mask)?;
            model.rank_answers(&q, &q_mask, &answer_ids, &answer_mask, a.vqa_k).map(|_| ()).map_err(Into::into)
        })?;
        let t_enc = time(1, || model.question_states(&image, &q_ids, &q_mask).map(|_| ()).map_err(Into::into))?;
        println!(
            "VQA answer ranking ({} answers, k_test {}), batch {b} @{} px: {:.2} questions/s  (baseline: the question encoder alone, image included, {:.2} questions/s; ratio {:.2}x)",
            a.vqa_answers,
            a.vqa_k,
            a.image_res,
            b as f64 / t_rank,
            b as f64 / t_enc,
            t_rank / t_enc
        );
    }
    Ok(())
}

/// The demo's small model (ViT 3×64 at 32 px, BERT 4×64), for quick runs on a CPU.
pub fn tiny_config() -> ModelConfig {
    let vision = VisionConfig {
        patch_size: 8,
        embed_dim: 64,
        depth: 3,
        num_heads: 4,
        mlp_ratio: 2.0,
        image_res: 32,
        ..Default::default()
    };
    let bert = BertConfig {
        vocab_size: 1000,
        hidden_size: 64,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        intermediate_size: 128,
        max_position_embeddings: 64,
        fusion_layer: 2,
        encoder_width: 64,
        ..Default::default()
    };
    ModelConfig { vision, bert, embed_dim: 64, queue_size: 256, init_std: 0.1, ..Default::default() }
}

/// Batch sizes of the throughput section.
pub struct Sizes {
    /// Retrieval training batch.
    pub train_batch: usize,
    /// Images per encoding batch; texts re-ranked per image.
    pub batch: usize,
    pub text_len: usize,
    pub reps: usize,
}

/// One measured figure of the throughput section.
pub struct Figure {
    pub what: String,
    pub per_s: f64,
    pub unit: &'static str,
    pub tflops: f64,
    /// Achieved TFLOP/s over the dense matmul's, measured in the same run.
    pub of_peak: f64,
}

impl std::fmt::Display for Figure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.unit == "peak" {
            return write!(f, "{}: {:.2} TFLOP/s", self.what, self.tflops);
        }
        write!(
            f,
            "{}: {:.1} {}/s, {:.3} TFLOP/s ({:.1}% of the dense matmul)",
            self.what,
            self.per_s,
            self.unit,
            self.tflops,
            100.0 * self.of_peak
        )
    }
}

/// Matmul FLOPs (multiply-adds ×2) of one transformer layer: `n` tokens of width `d`, MLP width
/// `mlp`, self-attention, and cross-attention to `kv` tokens of width `kv_width` when given.
fn layer_flops(n: usize, d: usize, mlp: usize, cross: Option<(usize, usize)>) -> f64 {
    let (n, d, mlp) = (n as f64, d as f64, mlp as f64);
    let mut f = 2.0 * n * d * 4.0 * d + 2.0 * 2.0 * n * d * mlp + 2.0 * 2.0 * n * n * d;
    if let Some((kv, w)) = cross {
        let (kv, w) = (kv as f64, w as f64);
        f += 2.0 * n * d * 2.0 * d + 2.0 * 2.0 * kv * w * d + 2.0 * 2.0 * n * kv * d;
    }
    f
}

/// Forward matmul FLOPs of the image encoder (one image), the text encoder's text-only layers
/// and the fusion layers (one text of `len` tokens against one image).
fn model_flops(cfg: &ModelConfig, len: usize) -> (f64, f64, f64) {
    let v = &cfg.vision;
    let tokens = v.num_patches() + 1;
    let patch = 2.0 * v.num_patches() as f64 * (3 * v.patch_size * v.patch_size) as f64 * v.embed_dim as f64;
    let image = patch + v.depth as f64 * layer_flops(tokens, v.embed_dim, v.mlp_hidden(), None);
    let b = &cfg.bert;
    let text = b.fusion_layer as f64 * layer_flops(len, b.hidden_size, b.intermediate_size, None);
    let fusion = (b.num_hidden_layers - b.fusion_layer) as f64
        * layer_flops(len, b.hidden_size, b.intermediate_size, Some((tokens, b.encoder_width)));
    (image, text, fusion)
}

fn timed<F: FnMut() -> Result<()>>(dev: &Device, reps: usize, mut f: F) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let start = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    dev.synchronize()?;
    Ok(start.elapsed().as_secs_f64() / reps.max(1) as f64)
}

/// Training samples/s (the retrieval step: ITC + ITM, teacher, backward, AdamW), evaluation
/// pairs/s (ITM re-rank of `batch` texts against an image), image encoding images/s, each with
/// the TFLOP/s its matmuls achieve and their share of a dense square matmul in the same precision
/// on the same device (the device's practical peak), all measured in this run.
pub fn throughput(cfg: &ModelConfig, dev: &Device, precision: Precision, s: &Sizes) -> Result<Vec<Figure>> {
    with_precision(precision, || throughput_inner(cfg, dev, precision, s))
}

fn throughput_inner(cfg: &ModelConfig, dev: &Device, precision: Precision, s: &Sizes) -> Result<Vec<Figure>> {
    let mut out = Vec::new();
    // The peak: a dense n×n×n matmul in the section's precision.
    let n = if dev.is_cpu() { 1024 } else { 8192 };
    let dtype = match precision {
        Precision::Fp32 => DType::F32,
        Precision::Bf16 => DType::BF16,
    };
    let x = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let y = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let t = timed(dev, s.reps, || x.matmul(&y).map(|_| ()).map_err(Into::into))?;
    let peak = 2.0 * (n as f64).powi(3) / t / 1e12;
    out.push(Figure {
        what: format!("dense {precision} matmul {n}x{n}x{n} on {dev:?}"),
        per_s: 0.0,
        unit: "peak",
        tflops: peak,
        of_peak: 1.0,
    });
    let figure = |what: String, per_s: f64, unit, flops_each: f64| {
        let tflops = per_s * flops_each / 1e12;
        Figure { what, per_s, unit, tflops, of_peak: tflops / peak }
    };
    let res = cfg.vision.image_res;
    let (f_image, f_text, f_fusion) = model_flops(cfg, s.text_len);
    let model = ContrastiveModel::new(cfg, Objective::Retrieval, dev, 0)?;
    let vocab = cfg.bert.vocab_size as i64;
    let ids_of = |rows: usize| -> Result<Tensor> {
        let v = (0..rows * s.text_len)
            .map(|i| if i % s.text_len == 0 { 101.min(vocab - 1) } else { (1000 + (i as i64 * 31) % 20000) % vocab })
            .collect();
        Ok(Tensor::from_vec(v, (rows, s.text_len), dev)?)
    };

    // Image encoding.
    let images = Tensor::randn(0f32, 1.0, (s.batch, 3, res, res), dev)?;
    let t = timed(dev, s.reps, || model.encode_image(&images).map(|_| ()).map_err(Into::into))?;
    out.push(figure(format!("image encoding, batch {} @{res} px", s.batch), s.batch as f64 / t, "images", f_image));

    // Evaluation: ITM of `batch` texts against one image (the re-rank of one image's top-k).
    let ids = ids_of(s.batch)?;
    let mask = Tensor::ones((s.batch, s.text_len), DType::I64, dev)?;
    let (image_states, _) = model.encode_image(&images.narrow(0, 0, 1)?)?;
    let (text_states, _) = model.encode_text(&ids, &mask)?;
    let t = timed(dev, s.reps, || {
        let fused = model.fuse(&text_states, &mask, &image_states.repeat((s.batch, 1, 1))?)?;
        model.itm_logits(&fused).map(|_| ()).map_err(Into::into)
    })?;
    out.push(figure(
        format!("evaluation ITM re-rank, {} texts x {} tokens per image", s.batch, s.text_len),
        s.batch as f64 / t,
        "pairs",
        f_fusion,
    ));

    // Training: the retrieval step at the config's batch size. Its matmuls: student image + text
    // + fusion of B positives and 2B negatives, forward and backward (×3), and the teacher's
    // image + text forward (×1).
    let b = s.train_batch;
    let image = Tensor::randn(0f32, 1.0, (b, 3, res, res), dev)?;
    let (ids, mask) = (ids_of(b)?, Tensor::ones((b, s.text_len), DType::I64, dev)?);
    let idx = Tensor::arange(0i64, b as i64, dev)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut optimizer = AdamW::new(&model.store, 0.02)?;
    let t = timed(dev, s.reps, || {
        let l = model.forward_train(&image, &ids, &mask, Some(&idx), 0.4, None, &mut rng, true)?;
        optimizer.step(&l.total()?.backward()?, 1e-5)?;
        Ok(())
    })?;
    let per_sample = 3.0 * (f_image + f_text + 3.0 * f_fusion) + (f_image + f_text);
    out.push(figure(format!("retrieval training step, batch {b} @{res} px"), b as f64 / t, "samples", per_sample));
    Ok(out)
}

/// A WordPiece vocabulary of bert-base-uncased's size and special tokens (the search section
/// times the text encoder, not the tokenizer, so its word pieces need not be real).
fn placeholder_vocab(size: usize) -> String {
    let mut v: Vec<String> = vec!["[PAD]".into()];
    v.extend((1..100).map(|i| format!("[unused{i}]")));
    v.extend(["[UNK]", "[CLS]", "[SEP]", "[MASK]"].map(String::from));
    v.extend(["a", "dog", "running", "on", "the", "beach"].map(String::from));
    let mut i = 0;
    while v.len() < size {
        v.push(format!("w{i}"));
        i += 1;
    }
    v.join("\n")
}

/// `albef search --ann` against the exact scan on random 256-d unit vectors (ALBEF's ITC size;
/// no cluster structure, the hard case for a graph index): graph build time, latency of the top
/// 10 for both, and recall@10 (the share of the exact top 10 that ANN returns) over 100 queries.
fn ann_section(a: &BenchArgs) -> Result<()> {
    use albef::tasks::search::{top_k, Ann};
    use rand::Rng;
    let (dim, queries) = (256, 100);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut unit = |n: usize| {
        let mut v: Vec<f32> = (0..n * dim).map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal)).collect();
        for row in v.chunks_mut(dim) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x /= norm);
        }
        v
    };
    for &n in &a.ann_sizes {
        let features = unit(n);
        let qs = unit(queries);
        let index =
            albef::tasks::search::Index { meta: Default::default(), paths: vec![String::new(); n], dim, features };
        let start = Instant::now();
        let ann = Ann::build(&index.features, dim, 10);
        let build = start.elapsed().as_secs_f64();
        let (mut t_exact, mut t_ann, mut found) = (0.0, 0.0, 0usize);
        for q in qs.chunks(dim) {
            let start = Instant::now();
            let exact = top_k(&index.scores(q), 10);
            t_exact += start.elapsed().as_secs_f64();
            let start = Instant::now();
            let approx = ann.top_k(q, 10);
            t_ann += start.elapsed().as_secs_f64();
            found += approx.iter().filter(|r| exact.contains(r)).count();
        }
        println!(
            "albef search --ann over {n} vectors ({dim}-d), top 10: recall@10 {:.3} over {queries} queries; {:.2} ms/query  (baseline: the exact scan + top-k, {:.2} ms/query; ratio {:.3}x); graph built in {build:.1} s",
            found as f64 / (10 * queries) as f64,
            1e3 * t_ann / queries as f64,
            1e3 * t_exact / queries as f64,
            t_ann / t_exact
        );
    }
    Ok(())
}

/// `albef index` and `albef search` through their own code, on the full-size model (random
/// weights): index throughput beside the image encoder alone, then ITC query latency over
/// synthetic indexes of each `--search-sizes` (beside a plain matmul of the query against the
/// matrix) and with the ITM re-rank of the top `--search-rerank`.
fn search_section(a: &BenchArgs) -> Result<()> {
    use albef::tasks::search::{index, IndexOptions, ModelFiles, Query, SearchOptions, Searcher};
    use rand::Rng;
    let dev = Device::Cpu;
    let dir = std::env::temp_dir().join(format!("albef-bench-search-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("photos"))?;
    let result = (|| -> Result<()> {
        let mut cfg = albef::config::model_config_from_file(&a.search_config)?;
        cfg.mode.inference = true;
        let vocab = dir.join("vocab.txt");
        std::fs::write(&vocab, placeholder_vocab(cfg.bert.vocab_size))?;
        let checkpoint = dir.join("retrieval.safetensors");
        {
            let model = ContrastiveModel::new(&cfg, Objective::Retrieval, &dev, 0)?;
            save_model(&model, Task::Retrieval, &checkpoint, &Default::default())?;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for i in 0..a.search_images {
            let img = image::RgbImage::from_fn(640, 480, |x, y| {
                image::Rgb([(x / 3 + i as u32 * 17) as u8, (y / 2) as u8, rng.random::<u8>() / 4 + 96])
            });
            img.save(dir.join("photos").join(format!("{i:05}.jpg")))?;
        }
        let model =
            ModelFiles { checkpoint, config: a.search_config.clone(), text_encoder: vocab, device: dev.clone() };
        let idx = dir.join("index.sqlite");
        let opts = IndexOptions { model, images: dir.join("photos"), index: idx.clone(), batch_size: a.image_batch };
        let s = index(&opts)?;
        let searcher = Searcher::open(&SearchOptions {
            index: idx,
            checkpoint: None,
            config: None,
            text_encoder: None,
            device: dev.clone(),
            top: 10,
            rerank: None,
        })?;
        let res = cfg.vision.image_res;
        let batch = Tensor::randn(0f32, 1.0, (a.image_batch, 3, res, res), &dev)?;
        let t_vit = time(1, || searcher.encoder.model.encode_image(&batch).map(|_| ()).map_err(Into::into))?;
        println!(
            "albef index, {} JPEG photos 640x480 @{res} px, batch {}: {:.2} images/s (read, hash, decode, transform, encode, SQLite)  (baseline: the image encoder alone, {:.2} images/s; ratio {:.2}x)",
            s.encoded,
            a.image_batch,
            s.encoded as f64 / s.seconds,
            a.image_batch as f64 / t_vit,
            (s.seconds / s.encoded as f64) / (t_vit / a.image_batch as f64)
        );

        // Synthetic indexes: random unit vectors, every row naming one of the real photos (the
        // re-rank reads its top-k files).
        let mut searcher = searcher;
        let photos = searcher.index.paths.clone();
        let dim = searcher.index.dim;
        let query = Query::Text("a dog running on the beach".into());
        for &n in &a.search_sizes {
            let normal = rand_distr::StandardNormal;
            let mut features: Vec<f32> = (0..n * dim).map(|_| rng.sample::<f32, _>(normal)).collect();
            for row in features.chunks_mut(dim) {
                let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
                row.iter_mut().for_each(|v| *v /= norm);
            }
            let matrix = Tensor::from_slice(&features, (n, dim), &dev)?;
            searcher.index.features = features;
            searcher.index.paths = (0..n).map(|i| photos[i % photos.len()].clone()).collect();
            let q = Tensor::randn(0f32, 1.0, (dim, 1), &dev)?;
            let t_floor = time(a.reps, || matrix.matmul(&q).map(|_| ()).map_err(Into::into))?;
            let t_itc = time(a.reps, || searcher.search(&query, 10, None).map(|_| ()))?;
            let unit = vec![1.0 / (dim as f32).sqrt(); dim];
            let t_scan = time(a.reps, || {
                albef::tasks::search::top_k(&searcher.index.scores(&unit), 10);
                Ok(())
            })?;
            let t_rerank = time(1, || searcher.search(&query, 10, Some(a.search_rerank)).map(|_| ()))?;
            println!(
                "albef search over {n} vectors ({dim}-d), top 10: ITC {:.1} ms/query, of which the exact scan + top-k {:.1} ms  (baseline: the scan as one candle matmul, {:.1} ms; ratio {:.2}x); with --rerank {}: {:.0} ms/query",
                1e3 * t_itc,
                1e3 * t_scan,
                1e3 * t_floor,
                t_scan / t_floor,
                a.search_rerank,
                1e3 * t_rerank
            );
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
