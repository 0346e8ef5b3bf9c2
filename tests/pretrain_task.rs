//! `albef pretrain`: MLM masking statistics, initialisation from BERT / DeiT files in their
//! download layouts, tar shards (dirty ones included), and the chain pre-training → zero-shot
//! retrieval on the synthetic corpus, from JSON lists and from shards.

mod common;

use albef::checkpoint::init::{init_text_from_bert, init_vision_from_deit};
use albef::checkpoint::{interpolate_pos_embed, save_safetensors, StateDict};
use albef::data::loader::{BatchSource, LoaderConfig};
use albef::data::pretrain::{raw_entries, shard_sample, CaptionSample};
use albef::data::shards::{resolve_shards, write_shards, ShardCorpus, ShardSet, StreamOptions};
use albef::data::synth::{generate, SynthConfig};
use albef::model::contrastive_model::mask_tokens;
use albef::model::{ContrastiveModel, Objective};
use albef::task::Task;
use albef::tasks::pretrain::{run, PretrainOptions};
use albef::tasks::RunOptions;
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("albef-pretrain-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn mlm_masking_statistics() {
    // 4,000 captions of 40 tokens: [CLS], words, then padding of varying length.
    let (rows, len, vocab) = (4000usize, 40usize, 30522usize);
    let mut ids = Vec::with_capacity(rows * len);
    for r in 0..rows {
        let words = 5 + r % 30;
        for j in 0..len {
            ids.push(match j {
                0 => 101,
                j if j <= words => 1000 + ((r * 31 + j * 7) % 20000) as i64,
                _ => 0,
            });
        }
    }
    let t = Tensor::from_vec(ids.clone(), (rows, len), &Device::Cpu).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (masked, labels) = mask_tokens(&t, vocab, 0.15, &mut rng).unwrap();
    let masked = masked.flatten_all().unwrap().to_vec1::<i64>().unwrap();
    let labels = labels.flatten_all().unwrap().to_vec1::<i64>().unwrap();
    let eligible = ids.iter().filter(|&&x| x != 0 && x != 101).count();
    let (mut chosen, mut to_mask, mut random, mut kept) = (0usize, 0usize, 0usize, 0usize);
    for ((&orig, &m), &l) in ids.iter().zip(&masked).zip(&labels) {
        if orig == 0 || orig == 101 {
            assert_eq!(l, -100, "[CLS] and [PAD] are never chosen");
            assert_eq!(m, orig, "[CLS] and [PAD] are never changed");
            continue;
        }
        if l == -100 {
            assert_eq!(m, orig, "tokens not chosen are unchanged");
            continue;
        }
        assert_eq!(l, orig, "the label is the original token");
        chosen += 1;
        if m == 103 {
            to_mask += 1;
        } else if m == orig {
            kept += 1;
        } else {
            assert!((0..vocab as i64).contains(&m));
            random += 1;
        }
    }
    let share = |a: usize, b: usize| a as f64 / b as f64;
    // ~86,000 eligible tokens: the standard error of 15% is 0.12 points; 5σ bounds.
    let p = share(chosen, eligible);
    assert!((p - 0.15).abs() < 0.006, "chosen share {p}");
    let (m, r, k) = (share(to_mask, chosen), share(random, chosen), share(kept, chosen));
    assert!((m - 0.8).abs() < 0.02, "[MASK] share {m}");
    assert!((r - 0.1).abs() < 0.015, "random share {r}");
    assert!((k - 0.1).abs() < 0.015, "unchanged share {k}");
}

fn small_model(seed: u64) -> ContrastiveModel {
    ContrastiveModel::new(&common::model_config("pretrain"), Objective::Pretrain, &Device::Cpu, seed).unwrap()
}

/// A Hugging Face BertForMaskedLM folder from a model's own weights: HF names (old-style
/// gamma/beta for the LayerNorms), no cross-attention, plus the pooler and NSP head.
fn write_bert_folder(dir: &Path, from: &ContrastiveModel, hidden: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut sd = StateDict::new();
    for (name, t) in from.store.named_tensors() {
        let Some(rest) = name.strip_prefix("text_encoder.") else { continue };
        if rest.contains("crossattention") {
            continue;
        }
        sd.insert(rest.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"), t);
    }
    let dev = Device::Cpu;
    sd.insert(
        "bert.pooler.dense.weight".into(),
        Tensor::zeros((hidden, hidden), candle_core::DType::F32, &dev).unwrap(),
    );
    sd.insert("cls.seq_relationship.weight".into(), Tensor::zeros((2, hidden), candle_core::DType::F32, &dev).unwrap());
    save_safetensors(&sd, &Default::default(), &dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        format!(r#"{{"hidden_size": {hidden}, "num_hidden_layers": 4, "vocab_size": 4096, "model_type": "bert"}}"#),
    )
    .unwrap();
}

#[test]
fn text_encoder_from_a_bert_folder() {
    let dir = temp("bert");
    let source = small_model(1);
    write_bert_folder(&dir.join("bert"), &source, 32);
    let model = small_model(2);
    let fresh: Vec<(String, Tensor)> =
        model.store.named_tensors().into_iter().map(|(n, t)| (n, t.copy().unwrap())).collect();
    let report = init_text_from_bert(&model.store, &dir.join("bert")).unwrap();
    let text = report.to_string();
    // Everything BERT has is loaded; the cross-attention of the 2 fusion layers stays fresh.
    assert!(!report.missing.is_empty());
    assert!(
        report.missing.iter().all(|k| k.contains("crossattention") && k.starts_with("text_encoder.bert.")),
        "{text}"
    );
    assert_eq!(report.missing.len(), 2 * 10, "{text}");
    assert!(report.unexpected.contains(&"bert.pooler.dense.weight".to_string()), "{text}");
    assert!(report.unexpected.contains(&"cls.seq_relationship.weight".to_string()), "{text}");
    let src: std::collections::HashMap<String, Tensor> = source.store.named_tensors().into_iter().collect();
    for (name, before) in &fresh {
        let now = model.store.get(name).unwrap().as_tensor().clone();
        if name.starts_with("text_encoder.") && !name.contains("crossattention") {
            assert_eq!(values(&now), values(&src[name]), "{name} comes from the BERT file");
        } else {
            assert_eq!(values(&now), values(before), "{name} is not touched");
        }
    }
    // The MLM decoder is tied to the loaded word embeddings.
    let tied = model.store.get("text_encoder.cls.predictions.decoder.weight").unwrap();
    assert_eq!(values(tied.as_tensor()), values(&src["text_encoder.bert.embeddings.word_embeddings.weight"]));

    // A BERT of another width (as bert-large against bert-base) is refused, shapes named.
    let wide = ContrastiveModel::new(
        &{
            let mut c = common::model_config("pretrain");
            c.bert.hidden_size = 48;
            c.bert.intermediate_size = 96;
            c
        },
        Objective::Pretrain,
        &Device::Cpu,
        3,
    )
    .unwrap();
    write_bert_folder(&dir.join("wide"), &wide, 48);
    let e = format!("{:#}", init_text_from_bert(&model.store, &dir.join("wide")).unwrap_err());
    assert!(e.contains("hidden_size 48") && e.contains("shape mismatch"), "{e}");
    assert!(e.contains("word_embeddings.weight: file [4096, 48], model [4096, 32]"), "{e}");
    let e = init_text_from_bert(&model.store, &dir).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");
}

/// A DeiT-style `{'model': …}` .pth of the small ViT's shapes at a 2×2 grid (5 tokens, as 197
/// is 1 + 14×14), with a classification head.
fn write_deit(path: &Path, from: &ContrastiveModel, width: usize) -> Vec<(String, Tensor)> {
    let dev = Device::Cpu;
    let mut tensors = Vec::new();
    for (name, t) in from.store.named_tensors() {
        let Some(rest) = name.strip_prefix("visual_encoder.") else { continue };
        let t = if rest == "pos_embed" { Tensor::randn(0f32, 1.0, (1, 5, width), &dev).unwrap() } else { t };
        tensors.push((rest.to_string(), t));
    }
    tensors.push(("head.weight".into(), Tensor::randn(0f32, 1.0, (10, width), &dev).unwrap()));
    tensors.push(("head.bias".into(), Tensor::zeros(10, candle_core::DType::F32, &dev).unwrap()));
    common::write_pth(path, &tensors, Some("model"));
    tensors
}

#[test]
fn image_encoder_from_a_deit_file() {
    let dir = temp("deit");
    let source = small_model(4);
    let written = write_deit(&dir.join("deit.pth"), &source, 32);
    let model = small_model(5);
    let text_before =
        values(model.store.get("text_encoder.bert.embeddings.word_embeddings.weight").unwrap().as_tensor());
    let report = init_vision_from_deit(&model.store, &dir.join("deit.pth")).unwrap();
    let text = report.to_string();
    assert!(report.missing.is_empty(), "every ViT tensor is in DeiT: {text}");
    assert_eq!(report.unexpected, ["head.bias", "head.weight"], "{text}");
    assert_eq!(report.interpolated, [("visual_encoder.pos_embed".to_string(), 5, 10)], "{text}");
    for (name, t) in &written {
        if name.starts_with("head") {
            continue;
        }
        let now = model.store.get(&format!("visual_encoder.{name}")).unwrap().as_tensor().clone();
        let want = if name == "pos_embed" { interpolate_pos_embed(t, 9, 1).unwrap() } else { t.clone() };
        assert_eq!(values(&now), values(&want), "{name}");
    }
    let unchanged = values(model.store.get("text_encoder.bert.embeddings.word_embeddings.weight").unwrap().as_tensor());
    assert_eq!(unchanged, text_before, "the text encoder is not touched");

    // A ViT of another width (a ViT-L against ViT-B) is refused, shapes named.
    let wide = {
        let mut c = common::model_config("pretrain");
        c.vision.embed_dim = 48;
        c.bert.encoder_width = 48;
        ContrastiveModel::new(&c, Objective::Pretrain, &Device::Cpu, 6).unwrap()
    };
    write_deit(&dir.join("wide.pth"), &wide, 48);
    let e = init_vision_from_deit(&model.store, &dir.join("wide.pth")).unwrap_err().to_string();
    assert!(e.contains("wide.pth") && e.contains("image encoder"), "{e}");
    assert!(e.contains("visual_encoder.blocks.0.attn.proj.weight: file [48, 48], model [32, 32]"), "{e}");
}

fn synth(dir: &Path, train: usize, eval: usize) {
    let cfg = SynthConfig { seed: 5, train, val: eval, test: eval, image_size: 32, max_shapes: 1 };
    generate(&dir.join("data"), &cfg).unwrap();
    std::fs::write(
        dir.join("bert.json"),
        r#"{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "max_position_embeddings": 40, "vocab_size": 150, "fusion_layer": 1, "encoder_width": 32}"#,
    )
    .unwrap();
}

const MODEL: &str = "bert_config: '{d}/bert.json'\nimage_res: 32\nvision_width: 32\nembed_dim: 16\ntemp: 0.07\n\
    queue_size: 32\nmomentum: 0.9\nalpha: 0.4\ninit_std: 0.1\n\
    vision: {patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2, mlp_ratio: 2}\n";

fn write_pretrain_config(dir: &Path, name: &str, data: &str, epochs: usize, extra: &str) -> PathBuf {
    let d = dir.display().to_string();
    let text = format!(
        "{data}\n{}batch_size: 16\nmlm_probability: 0.15\ninit_bert: False\ntrain_transform: resize\n\
         optimizer: {{opt: adamW, lr: 1e-3, weight_decay: 0.02}}\n\
         schedular: {{sched: cosine, lr: 1e-3, epochs: {epochs}, min_lr: 1e-4, decay_rate: 1, warmup_lr: 1e-3, warmup_epochs: 1, cooldown_epochs: 0}}\n{extra}",
        MODEL.replace("{d}", &d)
    )
    .replace("{d}", &d);
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn log_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("log.txt")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn options(dir: &Path, config: &Path, out: &str) -> PretrainOptions {
    let run =
        RunOptions { seed: 3, workers: Some(2), ..RunOptions::new(config, dir.join(out), dir.join("data/vocab.txt")) };
    PretrainOptions { run, init_deit: None }
}

/// Pre-training from random weights on the synthetic corpus: the JSON list and its shards give
/// the same losses unshuffled; MLM accuracy rises; the checkpoint loads into every task as
/// `ALBEF.pth` does, and `albef retrieval --evaluate` scores it. (Beating chance zero-shot needs
/// minutes of training, more than a test takes: see the README's figure.)
#[test]
fn pretrain_then_every_task_loads_the_checkpoint() {
    let dir = temp("e2e");
    synth(&dir, 240, 16);
    let json = write_pretrain_config(
        &dir,
        "json.yaml",
        "train_file: ['{d}/data/pretrain.json']\nimage_root: '{d}/data'",
        4,
        "shuffle: False\n",
    );
    let shards = write_pretrain_config(
        &dir,
        "shards.yaml",
        "train_shards: '{d}/data/shards/{000000..000001}.tar'",
        1,
        "shuffle: False\n",
    );
    let a = options(&dir, &json, "json");
    let metrics = run(&a).unwrap();
    assert_eq!(metrics["epochs"], 4);
    let b = options(&dir, &shards, "shards");
    run(&b).unwrap();
    let (la, lb) = (log_lines(&a.run.output_dir), log_lines(&b.run.output_dir));
    for key in ["train_loss_mlm", "train_loss_ita", "train_loss_itm", "train_mlm_acc", "train_lr"] {
        assert!(la[0][key].as_f64().is_some(), "log.txt lacks {key}");
        assert_eq!(la[0][key], lb[0][key], "epoch 0 {key}: JSON list and shards");
    }
    assert_eq!(lb[0]["train_images_skipped"], 0.0);
    assert_eq!(lb[0]["train_samples"], 240.0);
    let acc: Vec<f64> = la.iter().map(|r| r["train_mlm_acc"].as_f64().unwrap()).collect();
    assert!(acc[3] > acc[0] + 10.0, "MLM accuracy per epoch: {acc:?}");

    // Every task takes the checkpoint with the reference's remaps, as it takes ALBEF.pth.
    let ckpt = a.run.output_dir.join("checkpoint_last.safetensors");
    let mut cfg = albef::config::model_config_from_file(&json).unwrap();
    // The reference's 6-layer decoder and 18-layer NLVR2 encoder, for this 1-fusion-layer BERT.
    (cfg.decoder_layers, cfg.nlvr_layers) = (1, 3);
    for task in [Task::Retrieval, Task::Grounding, Task::Vqa, Task::Ve, Task::NlvrPretrain, Task::Pretrain] {
        let model = albef::tasks::build_model(task, &cfg, &Device::Cpu, 0).unwrap();
        let report =
            albef::tasks::load_checkpoint(model.as_ref(), task, &ckpt, false, albef::tasks::default_teacher_init(task))
                .unwrap();
        let text = report.to_string();
        assert!(report.unexpected.iter().all(|k| !k.starts_with("optimizer.")), "{task}: {text}");
        match task {
            Task::Retrieval | Task::Grounding => {
                assert_eq!(report.missing, ["idx_queue"], "{task}: {text}");
                assert!(report.unexpected.iter().all(|k| k.contains(".cls.")), "{task}: {text}");
            }
            Task::Pretrain => assert!(report.missing.is_empty() && report.unexpected.is_empty(), "{text}"),
            Task::Vqa => assert!(report.missing.is_empty(), "{task}: {text}"),
            Task::Ve => assert!(report.missing.iter().all(|k| k.starts_with("cls_head")), "{task}: {text}"),
            _ => assert!(report.missing.iter().all(|k| k.starts_with("ta_head")), "{task}: {text}"),
        }
    }
    let model = albef::tasks::build_model(Task::Nlvr, &cfg, &Device::Cpu, 0).unwrap();
    let e =
        albef::tasks::load_checkpoint(model.as_ref(), Task::Nlvr, &ckpt, false, albef::tasks::TeacherInit::Reference)
            .unwrap_err()
            .to_string();
    assert!(e.contains("text-assignment"), "{e}");

    // Zero-shot retrieval with it through the retrieval command.
    let d = dir.display();
    let ret = dir.join("retrieval.yaml");
    std::fs::write(
        &ret,
        format!(
            "val_file: '{d}/data/retrieval_val.json'\ntest_file: '{d}/data/retrieval_test.json'\nimage_root: '{d}/data'\n\
             batch_size_test: 16\nk_test: 4\ndistill: True\n{}",
            MODEL.replace("{d}", &d.to_string())
        ),
    )
    .unwrap();
    let run_opts = RunOptions {
        evaluate: true,
        checkpoint: Some(a.run.output_dir.join("checkpoint_best.safetensors")),
        workers: Some(2),
        ..RunOptions::new(&ret, dir.join("zs"), dir.join("data/vocab.txt"))
    };
    let m =
        albef::tasks::retrieval::run(&albef::tasks::retrieval::RetrievalOptions { run: run_opts, save_scores: false })
            .unwrap();
    let r_mean = m["test"]["r_mean"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&r_mean), "{m}");
}

fn shard_corpus(set: ShardSet, max_skipped: f64) -> ShardCorpus<CaptionSample> {
    let options = StreamOptions { shuffle: false, max_skipped_fraction: max_skipped, ..StreamOptions::default() };
    ShardCorpus::new(set, options, Arc::new(|raw, rng| shard_sample(raw, 32, false, rng)))
}

fn all_batches(corpus: &ShardCorpus<CaptionSample>, batch: usize) -> anyhow::Result<usize> {
    let cfg = LoaderConfig { workers: 2, ..LoaderConfig::train(batch, 1) };
    let stream = corpus.stream(&cfg);
    let mut n = 0;
    for b in stream.batches(0)? {
        n += b?.len();
    }
    Ok(n)
}

#[test]
fn dirty_shards() {
    let dir = temp("dirty");
    synth(&dir, 40, 2);
    let samples = raw_entries(&[dir.join("data/pretrain.json")], Some(&dir.join("data"))).unwrap();
    let out = dir.join("shards");
    assert_eq!(write_shards(&samples, &out, 10, false).unwrap(), 4);
    let e = write_shards(&samples, &out, 10, false).unwrap_err().to_string();
    assert!(e.contains("--force"), "existing shards are not replaced: {e}");
    let config = dir.join("c.yaml");
    std::fs::write(&config, "").unwrap();
    let pattern = format!("{}/{{000000..000003}}.tar", out.display());

    // Clean: every sample, in full batches (drop_last).
    let set = ShardSet::open(resolve_shards(&config, &[&pattern]).unwrap()).unwrap();
    assert_eq!(set.counts, [10, 10, 10, 10]);
    assert_eq!(all_batches(&shard_corpus(set, 0.0), 4).unwrap(), 40);

    // A corrupt image: skipped and counted, or the run stops when the share is too high.
    let tar1 = out.join("000001.tar");
    let clean = std::fs::read(&tar1).unwrap();
    let mut bytes = clean.clone();
    let png = bytes.windows(4).position(|w| w == b"\x89PNG").unwrap();
    bytes[png + 16..png + 40].fill(0xAB);
    std::fs::write(&tar1, &bytes).unwrap();
    let corpus = shard_corpus(ShardSet::open(resolve_shards(&config, &[&pattern]).unwrap()).unwrap(), 0.1);
    assert_eq!(all_batches(&corpus, 1).unwrap(), 39);
    let c = corpus.counters.take();
    assert_eq!((c.samples, c.skipped), (40, 1));
    let strict = shard_corpus(ShardSet::open(resolve_shards(&config, &[&pattern]).unwrap()).unwrap(), 0.0);
    let e = all_batches(&strict, 1).unwrap_err().to_string();
    assert!(e.contains("1 of 40 samples") && e.contains("max_skipped_fraction 0"), "{e}");
    std::fs::write(&tar1, &clean).unwrap();

    // A truncated tar: its complete samples are used, the shard is counted as damaged.
    let tar3 = out.join("000003.tar");
    let full = std::fs::read(&tar3).unwrap();
    std::fs::write(&tar3, &full[..full.len() / 2]).unwrap();
    std::fs::remove_file(out.join("000003_stats.json")).unwrap();
    let set = ShardSet::open(resolve_shards(&config, &[&pattern]).unwrap()).unwrap();
    assert!(set.counts[3] < 10, "counted up to the cut: {:?}", set.counts);
    let corpus = shard_corpus(set, 0.0);
    let n = all_batches(&corpus, 1).unwrap();
    assert!((30..40).contains(&n), "{n} samples");
    assert_eq!(corpus.counters.take().damaged_shards, 1);

    // A missing shard is named before anything runs.
    std::fs::remove_file(out.join("000002.tar")).unwrap();
    let e = resolve_shards(&config, &[&pattern]).unwrap_err().to_string();
    assert!(e.contains("000002.tar") && e.contains("missing"), "{e}");
}

#[test]
fn data_check_reads_json_lists_and_shards() {
    let dir = temp("check");
    synth(&dir, 20, 2);
    let d = dir.display();
    let json = dir.join("json.yaml");
    std::fs::write(&json, format!("train_file: ['{d}/data/pretrain.json']\nimage_root: '{d}/data'\nbatch_size: 4\n"))
        .unwrap();
    let r = albef::data::check::check_config(&json, Task::Pretrain).unwrap();
    assert!(r.ok() && r.images == 20, "{r:?}");
    let samples = raw_entries(&[dir.join("data/pretrain.json")], Some(&dir.join("data"))).unwrap();
    write_shards(&samples, &dir.join("shards"), 10, false).unwrap();
    let tar = dir.join("shards/000001.tar");
    let mut bytes = std::fs::read(&tar).unwrap();
    let png = bytes.windows(4).position(|w| w == b"\x89PNG").unwrap();
    bytes[png + 16..png + 40].fill(0xAB);
    std::fs::write(&tar, &bytes).unwrap();
    let shards = dir.join("shards.yaml");
    std::fs::write(&shards, format!("train_shards: '{d}/shards/{{000000..000001}}.tar'\nbatch_size: 4\n")).unwrap();
    let r = albef::data::check::check_config(&shards, Task::Pretrain).unwrap();
    assert_eq!((r.images, r.broken.len()), (20, 1), "{r:?}");
    assert!(r.broken[0].contains("000001.tar") && r.broken[0].contains("sample 000000010"), "{:?}", r.broken);
}
