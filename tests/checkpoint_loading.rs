//! Checkpoint reading, the reference's remaps, key reports and error messages.

mod common;

use albef::checkpoint::{classify, load_into, read_checkpoint, CheckpointKind, FileFormat};
use albef::model::{ClassifierKind, ClassifierModel};
use albef::task::Task;
use albef::tasks::{build_model, load_checkpoint, save_model, TeacherInit};
use candle_core::{Device, IndexOp};
use common::*;
use std::collections::BTreeMap;

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("albef-ckpt-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn values(store: &albef::nn::ParamStore, name: &str) -> Vec<f32> {
    store.get(name).unwrap_or_else(|| panic!("no {name}")).as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn raw_state_dict_pth_loads_like_the_wrapped_one() {
    // tests/fixtures/ve_raw.pth = ve/checkpoint.pth without the {'model': …} wrapper
    // (tools/make_raw_pth.py), the container of the released fine-tuned files.
    let dev = Device::Cpu;
    let raw = read_checkpoint(&fixture_dir("ve_raw.pth"), &dev).unwrap();
    assert_eq!(raw.format, FileFormat::Pth { wrapped: false });
    let wrapped = read_checkpoint(&fixture_dir("ve").join("checkpoint.pth"), &dev).unwrap();
    assert_eq!(wrapped.format, FileFormat::Pth { wrapped: true });
    assert_eq!(raw.tensors.keys().collect::<Vec<_>>(), wrapped.tensors.keys().collect::<Vec<_>>());
    let cfg = model_config("ve");
    let m = ClassifierModel::new(&cfg, ClassifierKind::VisualEntailment, &dev, 0).unwrap();
    let report = load_checkpoint(&m, Task::Ve, &fixture_dir("ve_raw.pth"), true, TeacherInit::FromLoaded).unwrap();
    assert!(report.missing.is_empty() && report.unexpected.is_empty(), "{report}");
    let io = io("ve");
    let logits = m.logits(&io["image"], &io["input_ids"], &io["attention_mask"]).unwrap();
    assert_close("ve logits from raw .pth", &logits, &io["logits"], 1e-5);
}

#[test]
fn kinds_are_detected() {
    let dev = Device::Cpu;
    let kind = |set: &str| classify(&read_checkpoint(&fixture_dir(set).join("checkpoint.pth"), &dev).unwrap());
    assert_eq!(kind("pretrain"), CheckpointKind::Pretraining { with_teacher: true });
    assert_eq!(kind("retrieval"), CheckpointKind::FineTuned { task: Some(Task::Retrieval), with_teacher: true });
    assert_eq!(kind("vqa"), CheckpointKind::FineTuned { task: Some(Task::Vqa), with_teacher: true });
    assert_eq!(kind("ve"), CheckpointKind::FineTuned { task: Some(Task::Ve), with_teacher: true });
    assert_eq!(kind("nlvr"), CheckpointKind::FineTuned { task: Some(Task::Nlvr), with_teacher: true });
}

#[test]
fn retrieval_from_pretraining_checkpoint_reports_like_the_reference() {
    let cfg = model_config("pretrain");
    let model = build_model(Task::Retrieval, &cfg, &Device::Cpu, 0).unwrap();
    let path = fixture_dir("pretrain").join("checkpoint.pth");
    let report = load_checkpoint(model.as_ref(), Task::Retrieval, &path, false, TeacherInit::FromLoaded).unwrap();
    // §2.4: missing only idx_queue; unexpected the MLM heads of student and teacher (7 + 7).
    assert_eq!(report.missing, vec!["idx_queue".to_string()]);
    assert_eq!(report.unexpected.len(), 14, "{:?}", report.unexpected);
    assert!(report.unexpected.iter().all(|k| k.contains(".cls.predictions.")));
    let ckpt = read_checkpoint(&path, &Device::Cpu).unwrap();
    let want = ckpt.tensors["text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(values(model.store(), "text_encoder.encoder.layer.3.crossattention.self.key.weight"), want);
}

#[test]
fn vqa_decoder_is_initialised_from_the_fusion_layers() {
    let mut cfg = model_config("pretrain");
    cfg.decoder_layers = cfg.bert.num_hidden_layers - cfg.bert.fusion_layer;
    let model = build_model(Task::Vqa, &cfg, &Device::Cpu, 0).unwrap();
    let path = fixture_dir("pretrain").join("checkpoint.pth");
    let report = load_checkpoint(model.as_ref(), Task::Vqa, &path, false, TeacherInit::FromLoaded).unwrap();
    assert!(report.missing.is_empty(), "missing {:?}", report.missing);
    let ckpt = read_checkpoint(&path, &Device::Cpu).unwrap();
    let f = cfg.bert.fusion_layer;
    for (decoder_layer, encoder_layer) in [(0, f), (1, f + 1)] {
        for suffix in ["crossattention.self.key.weight", "attention.output.dense.bias", "output.LayerNorm.weight"] {
            let want = ckpt.tensors[&format!("text_encoder.bert.encoder.layer.{encoder_layer}.{suffix}")]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(
                values(model.store(), &format!("text_decoder.bert.encoder.layer.{decoder_layer}.{suffix}")),
                want,
                "decoder {decoder_layer} {suffix}"
            );
            let want_m = ckpt.tensors[&format!("text_encoder_m.bert.encoder.layer.{encoder_layer}.{suffix}")]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(
                values(model.store(), &format!("text_decoder_m.bert.encoder.layer.{decoder_layer}.{suffix}")),
                want_m
            );
        }
    }
    let want = ckpt.tensors["text_encoder.cls.predictions.transform.dense.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(values(model.store(), "text_decoder.cls.predictions.transform.dense.weight"), want);
    // Under --evaluate the file is loaded as is: a pre-training file then fills no decoder.
    let model = build_model(Task::Vqa, &cfg, &Device::Cpu, 0).unwrap();
    let report = load_checkpoint(model.as_ref(), Task::Vqa, &path, true, TeacherInit::FromLoaded).unwrap();
    assert!(report.missing.iter().any(|k| k.starts_with("text_decoder.")));
}

#[test]
fn nlvr_teacher_quirk_and_its_fix() {
    let cfg = model_config("nlvr");
    // A checkpoint without teacher keys, as the TA checkpoint is.
    let ckpt = read_checkpoint(&fixture_dir("nlvr").join("checkpoint.pth"), &Device::Cpu).unwrap();
    let student: albef::checkpoint::StateDict =
        ckpt.tensors.into_iter().filter(|(k, _)| !k.split('.').next().unwrap().ends_with("_m")).collect();
    let path = tmp("nlvr_no_teacher.safetensors");
    albef::checkpoint::save_safetensors(&student, &BTreeMap::new(), &path).unwrap();
    let head = "cls_head.0.weight";
    for (policy, equal) in [(TeacherInit::Reference, false), (TeacherInit::FromLoaded, true)] {
        let model = build_model(Task::Nlvr, &cfg, &Device::Cpu, 7).unwrap();
        let report = load_checkpoint(model.as_ref(), Task::Nlvr, &path, false, policy).unwrap();
        assert!(report.teacher_missing(model.store()));
        assert_eq!(values(model.store(), head) == values(model.store(), "cls_head_m.0.weight"), equal, "{policy:?}");
    }
}

#[test]
fn our_safetensors_round_trip_and_are_recognised() {
    let cfg = model_config("ve");
    let model = build_model(Task::Ve, &cfg, &Device::Cpu, 0).unwrap();
    load_checkpoint(model.as_ref(), Task::Ve, &fixture_dir("ve").join("checkpoint.pth"), true, TeacherInit::FromLoaded)
        .unwrap();
    let path = tmp("ve_ours.safetensors");
    save_model(model.as_ref(), Task::Ve, &path, &BTreeMap::new()).unwrap();
    let ckpt = read_checkpoint(&path, &Device::Cpu).unwrap();
    assert_eq!(classify(&ckpt), CheckpointKind::Ours { task: Task::Ve });
    let again = build_model(Task::Ve, &cfg, &Device::Cpu, 99).unwrap();
    let report = load_into(again.store(), &ckpt.tensors).unwrap();
    assert!(report.missing.is_empty() && report.unexpected.is_empty(), "{report}");
    for name in
        ["text_encoder.encoder.layer.3.crossattention.self.key.weight", "cls_head.2.bias", "visual_encoder_m.pos_embed"]
    {
        assert_eq!(values(again.store(), name), values(model.store(), name), "{name}");
    }
}

#[test]
fn pos_embed_is_interpolated_on_load() {
    let mut cfg = model_config("retrieval");
    cfg.vision.image_res = 64; // 4×4 patches instead of 3×3
    let model = build_model(Task::Retrieval, &cfg, &Device::Cpu, 0).unwrap();
    let report = load_checkpoint(
        model.as_ref(),
        Task::Retrieval,
        &fixture_dir("retrieval").join("checkpoint.pth"),
        false,
        TeacherInit::FromLoaded,
    )
    .unwrap();
    let keys: Vec<&str> = report.interpolated.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(keys, ["visual_encoder.pos_embed", "visual_encoder_m.pos_embed"]);
    assert_eq!((report.interpolated[0].1, report.interpolated[0].2), (10, 17));
    let ckpt = read_checkpoint(&fixture_dir("retrieval").join("checkpoint.pth"), &Device::Cpu).unwrap();
    let cls_want = ckpt.tensors["visual_encoder.pos_embed"].i((0, 0)).unwrap().to_vec1::<f32>().unwrap();
    let got =
        model.store().get("visual_encoder.pos_embed").unwrap().as_tensor().i((0, 0)).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got, cls_want, "cls position embedding kept");
}

#[test]
fn bad_files_give_errors_naming_the_file() {
    let dev = Device::Cpu;
    let empty = tmp("empty.pth");
    std::fs::write(&empty, b"").unwrap();
    let e = read_checkpoint(&empty, &dev).unwrap_err().to_string();
    assert!(e.contains("empty.pth") && e.contains("empty"), "{e}");

    let bytes = std::fs::read(fixture_dir("ve").join("checkpoint.pth")).unwrap();
    let truncated = tmp("truncated.pth");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let e = read_checkpoint(&truncated, &dev).unwrap_err().to_string();
    assert!(e.contains("truncated.pth") && e.contains("truncated or corrupt"), "{e}");

    let st = std::fs::read(fixture_dir("ve").join("weights.safetensors")).unwrap();
    let truncated_st = tmp("truncated.safetensors");
    std::fs::write(&truncated_st, &st[..st.len() - 100]).unwrap();
    let e = read_checkpoint(&truncated_st, &dev).unwrap_err().to_string();
    assert!(e.contains("truncated.safetensors"), "{e}");

    let text = tmp("notes.txt");
    std::fs::write(&text, b"hello world, not a model").unwrap();
    let e = read_checkpoint(&text, &dev).unwrap_err().to_string();
    assert!(e.contains("notes.txt") && e.contains("neither"), "{e}");

    let e = read_checkpoint(&tmp("does-not-exist.pth"), &dev).unwrap_err().to_string();
    assert!(e.contains("does-not-exist.pth"), "{e}");
}

#[test]
fn shape_mismatch_names_key_and_shapes() {
    let mut cfg = model_config("ve");
    cfg.bert.intermediate_size = 48;
    let model = build_model(Task::Ve, &cfg, &Device::Cpu, 0).unwrap();
    let err = load_checkpoint(
        model.as_ref(),
        Task::Ve,
        &fixture_dir("ve").join("checkpoint.pth"),
        true,
        TeacherInit::FromLoaded,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("intermediate.dense.weight") && err.contains("[64, 32]") && err.contains("[48, 32]"), "{err}");
}

#[test]
fn wrong_task_checkpoint_is_explained() {
    let cfg = model_config("ve");
    let model = build_model(Task::Ve, &cfg, &Device::Cpu, 0).unwrap();
    let err = load_checkpoint(
        model.as_ref(),
        Task::Ve,
        &fixture_dir("vqa").join("checkpoint.pth"),
        false,
        TeacherInit::FromLoaded,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("fine-tuned Vqa checkpoint"), "{err}");
}

#[test]
fn our_checkpoint_of_another_task_is_refused() {
    let cfg = model_config("ve");
    let model = build_model(Task::Ve, &cfg, &Device::Cpu, 0).unwrap();
    let path = tmp("ve_ours_for_retrieval.safetensors");
    save_model(model.as_ref(), Task::Ve, &path, &BTreeMap::new()).unwrap();
    let retrieval = build_model(Task::Retrieval, &cfg, &Device::Cpu, 0).unwrap();
    let err = load_checkpoint(retrieval.as_ref(), Task::Retrieval, &path, false, TeacherInit::FromLoaded)
        .unwrap_err()
        .to_string();
    assert!(err.contains("albef checkpoint (task ve)") && err.contains("cannot initialise a Retrieval model"), "{err}");
    // Its own task still loads it.
    load_checkpoint(model.as_ref(), Task::Ve, &path, false, TeacherInit::FromLoaded).unwrap();
}
