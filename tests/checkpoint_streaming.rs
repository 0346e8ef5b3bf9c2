//! The streaming loader (names from the pickle / safetensors header, one tensor read at a time
//! straight into its parameter) against the whole-file path: candle's own readers materialise
//! the state dict, the remap runs on it, `load_into` copies it. Parameters must be bit-identical.

mod common;

use albef::checkpoint::{load_into, remap, save_safetensors, CheckpointFile, FileFormat, StateDict, TensorMeta};
use albef::model::ModelConfig;
use albef::nn::StoreMode;
use albef::task::Task;
use albef::tasks::{build_model, load_checkpoint, TeacherInit};
use candle_core::{DType, Device};
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("albef-stream-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// The whole-file state dict, read with candle's readers (aliases resolved as albef writes them).
fn whole_file(path: &Path) -> StateDict {
    if path.extension().is_some_and(|e| e == "safetensors") {
        let mut sd: StateDict = candle_core::safetensors::load(path, &Device::Cpu).unwrap().into_iter().collect();
        let bytes = std::fs::read(path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        if let Some(aliases) = meta.metadata().as_ref().and_then(|m| m.get("aliases")) {
            let aliases: BTreeMap<String, String> = serde_json::from_str(aliases).unwrap();
            for (alias, target) in aliases {
                let t = sd[&target].clone();
                sd.insert(alias, t);
            }
        }
        sd
    } else {
        let wrapped = candle_core::pickle::read_all_with_key(path, Some("model"));
        let tensors = wrapped.unwrap_or_else(|_| candle_core::pickle::read_all_with_key(path, None).unwrap());
        tensors.into_iter().collect()
    }
}

/// The model's tensors as raw bytes by name.
fn bytes(store: &albef::nn::ParamStore) -> BTreeMap<String, Vec<u8>> {
    store
        .named_tensors()
        .into_iter()
        .map(|(name, t)| {
            let t = t.flatten_all().unwrap();
            let b = match t.dtype() {
                DType::I64 => t.to_vec1::<i64>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
                _ => t
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            };
            (name, b)
        })
        .collect()
}

/// Loads `path` into `task`'s model both ways and asserts bit-identical parameters.
fn assert_streaming_matches(task: Task, cfg: &ModelConfig, path: &Path, evaluate: bool) {
    let dev = Device::Cpu;
    let eager = build_model(task, cfg, &dev, 3).unwrap();
    let (sd, _) = remap(task, whole_file(path), evaluate, cfg.bert.fusion_layer);
    let eager_report = load_into(eager.store(), &sd).unwrap();
    if eager_report.teacher_missing(eager.store()) {
        eager.copy_teacher().unwrap();
    }
    let streamed = build_model(task, cfg, &dev, 3).unwrap();
    let report = load_checkpoint(streamed.as_ref(), task, path, evaluate, TeacherInit::FromLoaded).unwrap();
    assert_eq!(report.loaded, eager_report.loaded, "{}", path.display());
    assert_eq!(report.missing, eager_report.missing);
    assert_eq!(report.unexpected, eager_report.unexpected);
    assert_eq!(report.interpolated, eager_report.interpolated);
    let (a, b) = (bytes(eager.store()), bytes(streamed.store()));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, want) in &a {
        assert!(&b[name] == want, "{}: {name} differs between the streaming and whole-file paths", path.display());
    }
}

#[test]
fn wrapped_pth_streams_bit_identically() {
    let path = fixture_dir("pretrain").join("checkpoint.pth");
    assert_eq!(CheckpointFile::open(&path).unwrap().format, FileFormat::Pth { wrapped: true });
    // Retrieval remap (bert. stripped, MLM heads unexpected), student and teacher.
    assert_streaming_matches(Task::Retrieval, &model_config("pretrain"), &path, false);
    // With the position embedding interpolated (3×3 → 4×4 patches).
    let mut cfg = model_config("pretrain");
    cfg.vision.image_res = 64;
    assert_streaming_matches(Task::Retrieval, &cfg, &path, false);
    // The VQA decoder remap, which reads one file tensor into several model tensors.
    let mut cfg = model_config("pretrain");
    cfg.decoder_layers = cfg.bert.num_hidden_layers - cfg.bert.fusion_layer;
    assert_streaming_matches(Task::Vqa, &cfg, &path, false);
}

#[test]
fn raw_pth_streams_bit_identically() {
    let path = fixture_dir("ve_raw.pth");
    assert_eq!(CheckpointFile::open(&path).unwrap().format, FileFormat::Pth { wrapped: false });
    assert_streaming_matches(Task::Ve, &model_config("ve"), &path, true);
    assert_streaming_matches(Task::Nlvr, &model_config("nlvr"), &fixture_dir("nlvr").join("checkpoint.pth"), false);
}

#[test]
fn safetensors_stream_bit_identically_with_aliases() {
    // The pretrain fixture as safetensors, every teacher tensor stored once as an alias of its
    // student twin (as a file written right after `copy_params()` may be).
    let sd = whole_file(&fixture_dir("pretrain").join("checkpoint.pth"));
    let mut stored = StateDict::new();
    let mut aliases = BTreeMap::new();
    for (name, t) in sd {
        let (head, rest) = name.split_once('.').unwrap_or((&name, ""));
        match head.strip_suffix("_m") {
            Some(online) if !rest.is_empty() => {
                aliases.insert(name.clone(), format!("{online}.{rest}"));
            }
            _ => {
                stored.insert(name, t);
            }
        }
    }
    let meta = BTreeMap::from([("aliases".to_string(), serde_json::to_string(&aliases).unwrap())]);
    let path = tmp("pretrain_aliased.safetensors");
    save_safetensors(&stored, &meta, &path).unwrap();
    let file = CheckpointFile::open(&path).unwrap();
    assert_eq!(file.format, FileFormat::Safetensors);
    let key = "visual_encoder_m.pos_embed";
    assert_eq!(file.tensors()[key], TensorMeta { dtype: DType::F32, shape: vec![1, 10, 32] });
    assert_streaming_matches(Task::Retrieval, &model_config("pretrain"), &path, false);
    // A plain safetensors file (no aliases), in task layout.
    let path = fixture_dir("ve").join("weights.safetensors");
    assert_streaming_matches(Task::Ve, &model_config("ve"), &path, true);
}

#[test]
fn evaluation_model_has_no_teacher_and_the_same_student() {
    let path = fixture_dir("pretrain").join("checkpoint.pth");
    let full = build_model(Task::Retrieval, &model_config("pretrain"), &Device::Cpu, 0).unwrap();
    load_checkpoint(full.as_ref(), Task::Retrieval, &path, true, TeacherInit::FromLoaded).unwrap();
    let mut cfg = model_config("pretrain");
    cfg.mode.inference = true;
    let eval = build_model(Task::Retrieval, &cfg, &Device::Cpu, 0).unwrap();
    assert!(eval.ema().is_none());
    let report = load_checkpoint(eval.as_ref(), Task::Retrieval, &path, true, TeacherInit::FromLoaded).unwrap();
    // Teacher tensors are skipped with a note, not reported as unexpected.
    assert!(report.unexpected.iter().all(|k| !k.split('.').next().unwrap().ends_with("_m")), "{report}");
    assert!(report.notes.iter().any(|n| n.contains("momentum (teacher) tensors not read")), "{report}");
    let (a, b) = (bytes(full.store()), bytes(eval.store()));
    assert!(b.keys().all(|k| !k.split('.').next().unwrap().ends_with("_m")));
    for (name, got) in &b {
        assert!(&a[name] == got, "{name}");
    }
}

#[test]
fn placeholder_model_reports_like_a_real_load() {
    let path = fixture_dir("pretrain").join("checkpoint.pth");
    let mut cfg = model_config("pretrain");
    cfg.vision.image_res = 64;
    let real = build_model(Task::Retrieval, &cfg, &Device::Cpu, 0).unwrap();
    let want = load_checkpoint(real.as_ref(), Task::Retrieval, &path, false, TeacherInit::FromLoaded).unwrap();
    cfg.mode = StoreMode { inference: false, placeholders: true };
    let dry = build_model(Task::Retrieval, &cfg, &Device::Cpu, 0).unwrap();
    let got = load_checkpoint(dry.as_ref(), Task::Retrieval, &path, false, TeacherInit::FromLoaded).unwrap();
    assert_eq!(got.to_string(), want.to_string());
    // Nothing was written into the placeholders.
    let pos = dry.store().get("visual_encoder.pos_embed").unwrap();
    assert_eq!(pos.as_tensor().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn pth_written_by_albef_reads_back_exactly() {
    let sd = whole_file(&fixture_dir("pretrain").join("checkpoint.pth"));
    let path = tmp("pretrain_rewritten.pth");
    albef::checkpoint::save_pth(&sd, &path).unwrap();
    let file = CheckpointFile::open(&path).unwrap();
    assert_eq!(file.format, FileFormat::Pth { wrapped: true });
    assert_eq!(file.tensors().keys().collect::<Vec<_>>(), sd.keys().collect::<Vec<_>>());
    let back = whole_file(&path);
    for (name, want) in &sd {
        assert_eq!(back[name].dtype(), want.dtype(), "{name}");
        assert_eq!(back[name].dims(), want.dims(), "{name}");
        let diff = (back[name].to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert_eq!(diff, 0.0, "{name}");
    }
    assert_streaming_matches(Task::Retrieval, &model_config("pretrain"), &path, false);
}
