//! Grounding (Grounding.py) and Grad-CAM pictures (visualization.ipynb) on tiny models: the
//! attention gradient against finite differences, the map against the reference's formula
//! written out, the batch-length quirk, the `itc` mode, checkpoint loading, `albef grounding`
//! end to end on a small RefCOCO-style layout the test writes, and `albef gradcam` on a
//! 640×480 image.

mod common;

use albef::checkpoint::read_checkpoint;
use albef::eval::grounding::{
    attention_and_gradient, choose_box, compute_iou, gradcam_maps, upsample, Attn, GradcamMode,
};
use albef::model::{ContrastiveModel, ModelConfig, Objective};
use albef::task::Task;
use albef::tasks::grounding::{run, GradcamSettings, GroundingOptions};
use albef::tasks::{load_checkpoint, save_model, RunOptions, TeacherInit};
use candle_core::{DType, Device, IndexOp, Tensor};
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn fixture_model(file: &Path) -> ContrastiveModel {
    let model = ContrastiveModel::new(&model_config("retrieval"), Objective::Retrieval, &Device::Cpu, 0).unwrap();
    load_checkpoint(&model, Task::Grounding, file, true, TeacherInit::FromLoaded).unwrap();
    model
}

/// Two texts of different lengths (the second padded) and two fixture images.
fn batch() -> (Tensor, Tensor, Tensor) {
    let io = io("retrieval");
    let image = io["image"].i(0..2).unwrap();
    let ids = Tensor::new(&[[101i64, 5, 9, 22, 7, 31], [101, 13, 40, 8, 0, 0]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1i64, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    (image, ids, mask)
}

/// A seeded standard-normal tensor.
fn random(shape: &candle_core::Shape, seed: u64) -> Tensor {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.elem_count()).map(|_| rand_distr::StandardNormal.sample(&mut rng)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
}

/// The objective Grad-CAM differentiates, with `delta` added to the probed probabilities.
fn objective(
    model: &ContrastiveModel,
    (image, ids, mask): &(Tensor, Tensor, Tensor),
    mode: GradcamMode,
    block: usize,
    delta: &Tensor,
) -> f64 {
    let v = match mode {
        GradcamMode::Itm => {
            let (logits, _) = model.itm_probe(image, ids, mask, block, Some(delta)).unwrap();
            logits.narrow(1, 1, 1).unwrap().sum_all().unwrap()
        }
        GradcamMode::Itc => model.itc_probe(image, ids, mask, block, Some(delta)).unwrap().0.sum_all().unwrap(),
    };
    v.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Central differences of the objective along random directions and along single entries
/// (the largest gradients) agree with the gradient the backward pass gives.
fn check_gradient(model: &ContrastiveModel, mode: GradcamMode, block: usize) -> Attn {
    let inputs = batch();
    let attn = attention_and_gradient(model, &inputs.0, &inputs.1, &inputs.2, mode, block).unwrap();
    let shape = attn.probs.shape().clone();
    let g = flat(&attn.grads);
    assert!(g.iter().any(|v| v.abs() > 1e-6), "{mode:?}: gradient is all zero");
    let eps = 1e-3;
    let fd = |dir: &Tensor| {
        let plus = objective(model, &inputs, mode, block, &(dir * eps).unwrap());
        let minus = objective(model, &inputs, mode, block, &(dir * -eps).unwrap());
        (plus - minus) / (2.0 * eps)
    };
    for seed in 0..3u64 {
        let dir = random(&shape, seed);
        let analytic: f64 = g.iter().zip(flat(&dir)).map(|(a, b)| *a as f64 * b as f64).sum();
        let numeric = fd(&dir);
        assert!((numeric - analytic).abs() <= 2e-3 * analytic.abs().max(1.0), "{mode:?}: fd {numeric} vs {analytic}");
    }
    let mut order: Vec<usize> = (0..g.len()).collect();
    order.sort_by(|&a, &b| g[b].abs().partial_cmp(&g[a].abs()).unwrap());
    for &i in order.iter().take(3) {
        let mut e = vec![0f32; g.len()];
        e[i] = 1.0;
        let numeric = fd(&Tensor::from_vec(e, &shape, &Device::Cpu).unwrap());
        assert!(
            (numeric - g[i] as f64).abs() <= 2e-3 * (g[i].abs() as f64).max(1.0),
            "{mode:?} entry {i}: {numeric} vs {}",
            g[i]
        );
    }
    attn
}

#[test]
fn itm_gradient_matches_finite_differences_and_the_map_is_the_reference_formula() {
    let model = fixture_model(&fixture_dir("retrieval_raw.pth"));
    let (_, _, mask) = batch();
    for block in [2, 3] {
        let attn = check_gradient(&model, GradcamMode::Itm, block);
        // Grounding.py, written out: cams[..., 1:] · mask, clamp(grads[..., 1:], 0) · mask, mean over
        // heads, then over all L positions.
        let (b, h, l, k) = attn.probs.dims4().unwrap();
        let (pa, pg, m) = (flat(&attn.probs), flat(&attn.grads), flat(&mask));
        let got = flat(&gradcam_maps(&attn, &mask, GradcamMode::Itm).unwrap());
        assert_eq!(got.len(), b * (k - 1));
        for bi in 0..b {
            let want: Vec<f64> = (1..k)
                .map(|c| {
                    let mut s = 0f64;
                    for t in 0..l {
                        for hi in 0..h {
                            let i = ((bi * h + hi) * l + t) * k + c;
                            let mt = m[bi * l + t] as f64;
                            s += pa[i] as f64 * mt * (pg[i].max(0.0) as f64) * mt;
                        }
                    }
                    s / (h * l) as f64
                })
                .collect();
            let max = want.iter().cloned().fold(0f64, f64::max);
            assert!(max > 0.0, "block {block}: an all-zero map");
            for (c, w) in want.iter().enumerate() {
                let g = got[bi * (k - 1) + c] as f64;
                assert!((g - w).abs() <= 1e-5 * max, "block {block}, row {bi}, cell {c}: {g} vs {w}");
            }
        }
    }
}

#[test]
fn itc_mode_gradient_and_map() {
    let model = fixture_model(&fixture_dir("retrieval_raw.pth"));
    let (_, _, mask) = batch();
    for block in [0, 1] {
        let attn = check_gradient(&model, GradcamMode::Itc, block);
        let (b, h, n, _) = attn.probs.dims4().unwrap();
        let (pa, pg) = (flat(&attn.probs), flat(&attn.grads));
        let got = flat(&gradcam_maps(&attn, &mask, GradcamMode::Itc).unwrap());
        for bi in 0..b {
            for c in 1..n {
                // cam[:, :, 0, 1:] · clamp(grad[:, :, 0, 1:], 0), mean over heads.
                let want: f64 = (0..h)
                    .map(|hi| {
                        let i = ((bi * h + hi) * n) * n + c;
                        pa[i] as f64 * pg[i].max(0.0) as f64
                    })
                    .sum::<f64>()
                    / h as f64;
                let g = got[bi * (n - 1) + c - 1] as f64;
                assert!((g - want).abs() <= 1e-6 * want.abs().max(1e-3), "itc block {block}: {g} vs {want}");
            }
        }
    }
}

#[test]
fn a_map_depends_on_the_padded_length_of_its_batch() {
    let model = fixture_model(&fixture_dir("retrieval_raw.pth"));
    let io = io("retrieval");
    let expr = [101i64, 5, 9];
    let alone_ids = Tensor::new(&[expr], &Device::Cpu).unwrap();
    let alone_mask = Tensor::ones((1, 3), DType::I64, &Device::Cpu).unwrap();
    let alone_img = io["image"].i(0..1).unwrap();
    let a = attention_and_gradient(&model, &alone_img, &alone_ids, &alone_mask, GradcamMode::Itm, 2).unwrap();
    let alone = flat(&gradcam_maps(&a, &alone_mask, GradcamMode::Itm).unwrap());
    // The same expression on the same image beside a 6-token one: padded to 6.
    let ids = Tensor::new(&[[101i64, 5, 9, 0, 0, 0], [101, 13, 40, 8, 22, 7]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1i64, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
    let img = Tensor::cat(&[&alone_img, &io["image"].i(1..2).unwrap()], 0).unwrap();
    let b = attention_and_gradient(&model, &img, &ids, &mask, GradcamMode::Itm, 2).unwrap();
    let batched = flat(&gradcam_maps(&b, &mask, GradcamMode::Itm).unwrap());
    let max = alone.iter().cloned().fold(0f32, f32::max);
    let mut differs = false;
    for (c, &x) in alone.iter().enumerate() {
        let y = batched[c];
        differs |= (x - y).abs() > 1e-3 * max;
        // As in the reference: the mean runs over all 6 positions, so the map is 3/6 of the
        // unpadded one.
        assert!((y - x * 3.0 / 6.0).abs() <= 1e-4 * max, "cell {c}: {y} vs {x}·3/6");
    }
    assert!(differs, "the batch's padded length changes the map");
}

#[test]
fn the_released_and_our_checkpoint_layouts_load() {
    let io = io("retrieval");
    let dev = Device::Cpu;
    // refcoco.pth is a raw state dict, albef's files wrapped ones: the probed forward reproduces
    // the reference's ITM logits from both.
    for file in [fixture_dir("retrieval_raw.pth"), fixture_dir("retrieval").join("checkpoint.pth")] {
        let model = ContrastiveModel::new(&model_config("retrieval"), Objective::Retrieval, &dev, 0).unwrap();
        let report = load_checkpoint(&model, Task::Grounding, &file, true, TeacherInit::FromLoaded).unwrap();
        assert!(report.missing.is_empty() && report.unexpected.is_empty(), "{}: {report}", file.display());
        for i in 0..2 {
            let (logits, _) = model
                .itm_probe(
                    &io["image"].i(i..i + 1).unwrap(),
                    &io["input_ids"].i(i..i + 1).unwrap(),
                    &io["attention_mask"].i(i..i + 1).unwrap(),
                    2,
                    None,
                )
                .unwrap();
            assert_close(
                "itm logits (probed)",
                &logits.squeeze(0).unwrap(),
                &io["itm_logits"].i((i, i)).unwrap(),
                1e-5,
            );
        }
    }
    // ALBEF.pth-style: the `bert.` remap with the reference's key report.
    let model = ContrastiveModel::new(&model_config("pretrain"), Objective::Retrieval, &dev, 0).unwrap();
    let report = load_checkpoint(
        &model,
        Task::Grounding,
        &fixture_dir("pretrain").join("checkpoint.pth"),
        false,
        TeacherInit::FromLoaded,
    )
    .unwrap();
    assert_eq!(report.missing, vec!["idx_queue".to_string()], "{report}");
    assert_eq!(report.unexpected.len(), 14, "{report}");
    // Ours, tagged grounding (and a retrieval one is accepted too).
    let dir = tmp("ours");
    for task in [Task::Grounding, Task::Retrieval] {
        let path = dir.join(format!("{task}.safetensors"));
        save_model(&model, task, &path, &Default::default()).unwrap();
        let fresh = ContrastiveModel::new(&model_config("pretrain"), Objective::Retrieval, &dev, 1).unwrap();
        let r = load_checkpoint(&fresh, Task::Grounding, &path, true, TeacherInit::FromLoaded).unwrap();
        assert!(r.missing.is_empty(), "{r}");
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("albef-grounding-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_json(path: &Path, v: &Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_string(v).unwrap()).unwrap();
}

/// A RefCOCO+-style layout: COCO-like images of different sizes, REFER refs (JSON here) with
/// `instances.json`, expression files, proposals with fractional boxes and boxes leaving the
/// image, and `cocos.json`.
struct Layout {
    dir: PathBuf,
}

const SIZES: [(u32, u32); 6] = [(64, 48), (50, 40), (40, 60), (64, 64), (48, 36), (56, 42)];

impl Layout {
    fn new(name: &str) -> Self {
        let dir = tmp(name);
        let data = dir.join("data");
        let mut images = Vec::new();
        let mut anns = Vec::new();
        let mut refs = Vec::new();
        let (mut train, mut val, mut test) = (Vec::new(), Vec::new(), Vec::new());
        let mut dets = serde_json::Map::new();
        let words = ["red square", "blue circle", "green triangle on the left", "small yellow square"];
        for (i, &(w, h)) in SIZES.iter().enumerate() {
            let id = 100 + i as i64;
            let file = format!("COCO_train2014_{id:012}.png");
            let mut img = image::RgbImage::from_pixel(w, h, image::Rgb([40, 40, 40]));
            let (bx, by, bw, bh) = (w / 4 + i as u32, h / 3, w / 3, h / 3);
            for y in by..by + bh {
                for x in bx..bx + bw {
                    img.put_pixel(x, y, image::Rgb([200, (30 * i) as u8, 60]));
                }
            }
            std::fs::create_dir_all(data.join("coco/train2014")).unwrap();
            img.save(data.join("coco/train2014").join(&file)).unwrap();
            images.push(json!({"id": id, "file_name": file, "width": w, "height": h}));
            let gt = [bx as f64 + 0.3, by as f64, bw as f64, bh as f64 - 0.5];
            anns.push(json!({"id": 1000 + i, "image_id": id, "bbox": gt, "category_id": 1}));
            dets.insert(
                id.to_string(),
                json!([
                    [0.0, 0.0, w as f64 / 2.0, h as f64 / 2.0, 0.9],
                    [gt[0] - 1.5, gt[1] + 0.7, gt[2] + 1.0, gt[3], 0.8],
                    [w as f64 - 5.5, h as f64 - 6.2, 20.0, 20.0, 0.7],
                    [2.5, 3.5, 0.4, 5.0, 0.6],
                    [gt[0] - 1.5, gt[1] + 0.7, gt[2] + 1.0, gt[3], 0.5],
                ]),
            );
            let split = ["train", "val", "val", "testA", "testB", "testB"][i];
            let ref_id = 500 + i as i64;
            let sentences: Vec<Value> =
                (0..2).map(|s| json!({"sent": words[(i + s) % 4], "sent_id": i * 10 + s, "tokens": []})).collect();
            refs.push(json!({"ref_id": ref_id, "ann_id": 1000 + i, "image_id": id, "split": split,
                             "category_id": 1, "sentences": sentences}));
            for s in &sentences {
                let e = json!({"image": format!("train2014/{file}"), "text": s["sent"], "ref_id": ref_id,
                               "image_id": id, "bbox": gt});
                match split {
                    "val" => val.push(e),
                    "train" => train.push(e),
                    _ => test.push(e),
                }
            }
            // Every image also trains (the reference's train file is all train refs).
            if split != "train" {
                train.push(json!({"image": format!("train2014/{file}"), "text": words[i % 4], "ref_id": 900 + i}));
            }
        }
        write_json(&data.join("refcoco+_train.json"), &Value::Array(train));
        write_json(&data.join("refcoco+_val.json"), &Value::Array(val));
        write_json(&data.join("refcoco+_test.json"), &Value::Array(test));
        write_json(&data.join("refcoco+/refs(unc+).json"), &Value::Array(refs));
        write_json(
            &data.join("refcoco+/instances.json"),
            &json!({"images": images, "annotations": anns, "categories": []}),
        );
        write_json(&data.join("refcoco+/dets.json"), &Value::Object(dets));
        write_json(&data.join("refcoco+/cocos.json"), &json!({}));
        let vocab: Vec<String> = albef::data::synth::vocab();
        std::fs::write(data.join("vocab.txt"), vocab.join("\n") + "\n").unwrap();
        std::fs::write(
            dir.join("bert.json"),
            format!(
                r#"{{"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64,
                "max_position_embeddings": 40, "vocab_size": {}, "fusion_layer": 1, "encoder_width": 32}}"#,
                vocab.len()
            ),
        )
        .unwrap();
        let d = dir.display();
        let config = format!(
            "train_file: ['{d}/data/refcoco+_train.json']\ntest_file: ['{d}/data/refcoco+_val.json', '{d}/data/refcoco+_test.json']\n\
             refcoco_data: '{d}/data'\ndet_file: '{d}/data/refcoco+/dets.json'\ncoco_file: '{d}/data/refcoco+/cocos.json'\n\
             image_root: '{d}/data/coco/'\nbert_config: '{d}/bert.json'\nimage_res: 32\nbatch_size: 4\n\
             queue_size: 8\nmomentum: 0.9\nvision_width: 32\nembed_dim: 16\ntemp: 0.07\nalpha: 0.4\ndistill: True\nwarm_up: True\n\
             init_std: 0.1\nvision: {{patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2}}\n\
             optimizer: {{opt: adamW, lr: 1e-3, weight_decay: 0.02}}\n\
             schedular: {{sched: cosine, lr: 1e-3, epochs: 1, min_lr: 1e-4, decay_rate: 1, warmup_lr: 1e-3, warmup_epochs: 1, cooldown_epochs: 0}}\n"
        );
        std::fs::write(dir.join("Grounding.yaml"), config).unwrap();
        Self { dir }
    }

    fn options(&self, out: &str, evaluate: bool) -> GroundingOptions {
        let run = RunOptions {
            evaluate,
            seed: 3,
            workers: Some(2),
            ..RunOptions::new(self.dir.join("Grounding.yaml"), self.dir.join(out), self.dir.join("data/vocab.txt"))
        };
        GroundingOptions { run, gradcam: GradcamSettings { mode: GradcamMode::Itm, block_num: 1, save_maps: true } }
    }
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn grounding_evaluates_trains_and_writes_the_reference_files() {
    let layout = Layout::new("task");
    let eval = layout.options("eval", true);
    let metrics = run(&eval).unwrap();
    let out = &eval.run.output_dir;
    assert_eq!(read(&out.join("metrics.json")), metrics);
    let preds = read(&out.join("predictions.json"));
    let preds = preds.as_array().unwrap();
    // val: 2 refs × 2 sentences, testA 1 × 2, testB 2 × 2, in loader order (val file, test file).
    assert_eq!(preds.len(), 10);
    assert_eq!(metrics["n"], json!({"val": 4, "testA": 2, "testB": 4}));
    let mut correct = json!({"val": 0, "testA": 0, "testB": 0});
    for p in preds {
        for key in ["ref_id", "split", "text", "chosen_box", "iou", "correct"] {
            assert!(p.get(key).is_some(), "prediction lacks {key}: {p}");
        }
        if p["correct"].as_bool().unwrap() {
            let s = p["split"].as_str().unwrap();
            correct[s] = json!(correct[s].as_u64().unwrap() + 1);
        }
    }
    assert_eq!(metrics["n_correct"], correct);
    for (s, n) in [("val", 4.0), ("testA", 2.0), ("testB", 4.0)] {
        assert_eq!(metrics[format!("{s}_d")].as_f64().unwrap(), correct[s].as_f64().unwrap() / n);
    }
    // log.txt as the reference's --evaluate: val_d, testA_d, testB_d, epoch.
    let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
    let rec: Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    let keys: Vec<&str> = rec.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["val_d", "testA_d", "testB_d", "epoch"]);

    // gradcam.safetensors: the maps before upsampling, [N, 4, 4]; ranking them again with the
    // REFER sizes and proposals gives the recorded boxes and IoUs.
    let maps = read_checkpoint(&out.join("gradcam.safetensors"), &Device::Cpu).unwrap();
    let m = &maps.tensors["maps"];
    assert_eq!(m.dims(), &[10, 4, 4]);
    let m = m.to_vec3::<f32>().unwrap();
    let dets = read(&layout.dir.join("data/refcoco+/dets.json"));
    let refs = read(&layout.dir.join("data/refcoco+/refs(unc+).json"));
    let inst = read(&layout.dir.join("data/refcoco+/instances.json"));
    for (i, p) in preds.iter().enumerate() {
        let r = refs.as_array().unwrap().iter().find(|r| r["ref_id"] == p["ref_id"]).unwrap();
        let k = (r["image_id"].as_i64().unwrap() - 100) as usize;
        let (w, h) = (SIZES[k].0 as usize, SIZES[k].1 as usize);
        let boxes: Vec<[f64; 4]> = dets[r["image_id"].to_string()]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                let d: Vec<f64> = d.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
                [d[0], d[1], d[2], d[3]]
            })
            .collect();
        let flat: Vec<f32> = m[i].iter().flatten().copied().collect();
        assert!(flat.iter().all(|v| *v >= 0.0) && flat.iter().any(|v| *v > 0.0), "map {i}: {flat:?}");
        let up = upsample(&flat, 4, 4, h, w);
        let pick = choose_box(&up, h, w, &boxes).expect("a positive map picks a box");
        assert_eq!(p["chosen_box"], json!(boxes[pick]), "prediction {i}");
        let bbox: Vec<f64> =
            inst["annotations"][k]["bbox"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let iou = compute_iou(&[bbox[0], bbox[1], bbox[2], bbox[3]], &boxes[pick]);
        assert_eq!(p["iou"].as_f64().unwrap(), iou);
        assert_eq!(p["correct"].as_bool().unwrap(), iou >= 0.5);
        // The duplicate proposal (index 4) never wins over its first copy (index 1).
        assert_ne!(pick, 4);
    }

    // The REFER pickle, as the reference reads it, gives the same evaluation.
    let refs_value = read(&layout.dir.join("data/refcoco+/refs(unc+).json"));
    let pickle = serde_pickle::to_vec(&refs_value, serde_pickle::SerOptions::new()).unwrap();
    std::fs::write(layout.dir.join("data/refcoco+/refs(unc).p"), pickle).unwrap();
    std::fs::remove_file(layout.dir.join("data/refcoco+/refs(unc+).json")).unwrap();
    let again = layout.options("eval_pickle", true);
    assert_eq!(run(&again).unwrap(), metrics);
    assert_eq!(read(&again.run.output_dir.join("predictions.json")), read(&out.join("predictions.json")));

    // Training: one epoch, checkpoint_best by val_d, the reference's log keys; evaluating the
    // best checkpoint reproduces the final predictions.
    let train = layout.options("train", false);
    let m = run(&train).unwrap();
    let out = &train.run.output_dir;
    assert!(out.join("checkpoint_best.safetensors").is_file());
    let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
    let rec: Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    for key in ["train_lr", "train_loss_ita", "train_loss_itm", "val_d", "testA_d", "testB_d", "epoch"] {
        assert!(rec.get(key).is_some(), "log.txt lacks {key}: {rec}");
    }
    assert_eq!(m["best_epoch"], json!(0));
    assert_eq!(m["val_d"], rec["val_d"]);
    let mut best = layout.options("eval_best", true);
    best.run.checkpoint = Some(out.join("checkpoint_best.safetensors"));
    run(&best).unwrap();
    assert_eq!(read(&best.run.output_dir.join("predictions.json")), read(&out.join("predictions.json")));

    // data check reads the same files.
    let report = albef::data::check::check_config(&layout.dir.join("Grounding.yaml"), Task::Grounding).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.images, SIZES.len());
}

#[test]
fn grounding_input_errors_name_what_is_wrong() {
    let layout = Layout::new("bad");
    let dets_path = layout.dir.join("data/refcoco+/dets.json");
    let mut dets = read(&dets_path);
    dets.as_object_mut().unwrap().remove("104");
    write_json(&dets_path, &dets);
    let opts = layout.options("out", true);
    let e = format!("{:#}", run(&opts).unwrap_err());
    assert!(e.contains("image 104") && e.contains("dets.json") && e.contains("refcoco+_test.json"), "{e}");
    assert!(!opts.run.output_dir.exists(), "nothing written for bad input");
    let e = format!(
        "{:#}",
        albef::data::check::check_config(&layout.dir.join("Grounding.yaml"), Task::Grounding).unwrap_err()
    );
    assert!(e.contains("image 104"), "{e}");

    let mut wrong = layout.options("out2", true);
    wrong.gradcam.block_num = 3;
    let e = format!("{:#}", run(&wrong).unwrap_err());
    assert!(e.contains("--block_num 3") && e.contains("1..=2"), "{e}");
    std::fs::remove_file(layout.dir.join("data/refcoco+/refs(unc+).json")).unwrap();
    let e = format!("{:#}", run(&layout.options("out3", true)).unwrap_err());
    assert!(e.contains("refs(unc).p"), "{e}");
}

#[test]
fn gradcam_pictures_of_a_photo_sized_image() {
    let layout = Layout::new("pictures");
    let dir = &layout.dir;
    // A 640×480 "photo": a gradient with two coloured objects.
    let mut img = image::RgbImage::from_fn(640, 480, |x, y| image::Rgb([(x / 3) as u8, (y / 2) as u8, 120]));
    for y in 100..260 {
        for x in 80..300 {
            img.put_pixel(x, y, image::Rgb([220, 30, 30]));
        }
    }
    for y in 300..420 {
        for x in 400..560 {
            img.put_pixel(x, y, image::Rgb([30, 30, 220]));
        }
    }
    let photo = dir.join("photo.png");
    img.save(&photo).unwrap();
    let cfg: ModelConfig = albef::config::model_config_from_file(&dir.join("Grounding.yaml")).unwrap();
    let model = ContrastiveModel::new(&cfg, Objective::Retrieval, &Device::Cpu, 7).unwrap();
    let ckpt = dir.join("model.safetensors");
    save_model(&model, Task::Grounding, &ckpt, &Default::default()).unwrap();
    write_json(&dir.join("pairs.json"), &json!([["photo.png", "blue square"]]));
    let mut pairs = vec![(photo.clone(), "a red square".to_string())];
    pairs.extend(albef::tasks::gradcam::read_pairs(&dir.join("pairs.json")).unwrap());
    let opts = albef::tasks::gradcam::GradcamOptions {
        config: dir.join("Grounding.yaml"),
        checkpoint: ckpt,
        text_encoder: dir.join("data/vocab.txt"),
        output_dir: dir.join("pictures"),
        pairs,
        // Not the last layer: there only the [CLS] row reaches the ITM logit.
        block_num: 1,
        blur: true,
        device: Device::Cpu,
    };
    let index = albef::tasks::gradcam::run(&opts).unwrap();
    let index = index.as_array().unwrap();
    assert_eq!(index.len(), 2);
    let out = &opts.output_dir;
    let first = &index[0];
    assert_eq!(first["tokens"], json!(["[CLS]", "a", "red", "square"]));
    let words = first["words"].as_array().unwrap();
    assert_eq!(words.len(), 3, "one picture per word piece after [CLS]");
    assert!(words.iter().all(|w| out.join(w["png"].as_str().unwrap()).is_file()));
    let maps = read_checkpoint(&out.join(first["maps"].as_str().unwrap()), &Device::Cpu).unwrap();
    let word_maps = maps.tensors["words"].to_vec3::<f32>().unwrap();
    // Pictures of non-zero maps (a word piece whose gradient is nowhere positive has none).
    let mut names = vec![first["expression_png"].as_str().unwrap()];
    for w in words {
        let t = w["index"].as_u64().unwrap() as usize;
        if word_maps[t].iter().flatten().any(|v| *v > 0.0) {
            names.push(w["png"].as_str().unwrap());
        }
    }
    for name in names {
        let pic = image::open(out.join(name)).unwrap().to_rgb8();
        assert_eq!(pic.dimensions(), (640, 480), "{name}");
        // A heat map: blended, so not the photo itself, and somewhere the map's hot end (red).
        assert!(pic.as_raw() != img.as_raw(), "{name} is the plain image");
        let changed = pic.pixels().zip(img.pixels()).filter(|(a, b)| a != b).count();
        assert!(changed > 640 * 480 / 2, "{name}: only {changed} pixels changed");
    }
    let fig = image::open(out.join(first["figure_png"].as_str().unwrap())).unwrap().to_rgb8();
    // Image + expression + 3 words = 5 tiles: 4 columns × 2 rows of 320-wide tiles.
    assert!(fig.width() > 4 * 320 && fig.height() > 2 * 240, "{:?}", fig.dimensions());
    assert_eq!(maps.tensors["words"].dims(), &[4, 4, 4]);
    assert_eq!(maps.tensors["expression"].dims(), &[4, 4]);
    // The expression map is the mean of the word-piece maps ([CLS] included), as Grounding.py's.
    let words_mean = maps.tensors["words"].mean(0).unwrap();
    assert_close("expression = mean of token maps", &words_mean, &maps.tensors["expression"], 1e-6);
    assert!(out.join("gradcam.json").is_file());
    assert!(out.join("01_figure.png").is_file());
}
