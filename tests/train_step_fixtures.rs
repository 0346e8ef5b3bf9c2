//! The recorded training step of each fixture set, replayed with its recorded masks and negative
//! choices: losses within 1e-5, gradients and per-parameter gradient norms within 1e-4 relative.

mod common;

use albef::checkpoint::{load_into, read_checkpoint};
use albef::model::contrastive_model::Replay;
use albef::model::{ClassifierKind, ClassifierModel, ContrastiveModel, Objective, VqaModel};
use albef::nn::ParamStore;
use candle_core::{backprop::GradStore, Device, Tensor};
use common::*;
use rand::SeedableRng;

fn load(store: &ParamStore, set: &str) {
    let ckpt = read_checkpoint(&fixture_dir(set).join("checkpoint.pth"), &Device::Cpu).unwrap();
    load_into(store, &ckpt.tensors).unwrap();
}

fn idx_vec(t: &Tensor) -> Vec<usize> {
    t.to_vec1::<i64>().unwrap().into_iter().map(|x| x as usize).collect()
}

/// Compares the recorded full gradients (`grad.*` arrays), every per-parameter gradient norm of
/// the manifest, and the total norm.
fn check_grads(set: &str, store: &ParamStore, grads: &GradStore) {
    let io = io(set);
    let m = manifest(set);
    let grad_of = |name: &str| -> Tensor {
        let var = store.get(name).unwrap_or_else(|| panic!("{set}: no parameter {name}"));
        grads.get(&var).unwrap_or_else(|| panic!("{set}: no gradient for {name}")).clone()
    };
    let mut full = 0;
    for (key, want) in &io {
        if let Some(name) = key.strip_prefix("grad.") {
            assert_rel(&format!("{set} grad {name}"), &grad_of(name), want, 1e-4);
            full += 1;
        }
    }
    // VE and NLVR2 record norms only.
    let expected_full = m["arrays"].as_object().unwrap().keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(full, expected_full, "{set}: recorded gradients compared");
    let norms = m["grad_norms"].as_object().unwrap();
    let mut total = 0f64;
    for (name, want) in norms {
        let g = grad_of(name);
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        total += norm;
        let want = want.as_f64().unwrap();
        let got = norm.sqrt();
        assert!((got - want).abs() <= 1e-4 * want.abs() + 1e-9, "{set}: grad norm of {name}: got {got}, want {want}");
    }
    // Every trainable parameter of ours appears in the reference's list (none silently extra).
    for p in store.trainable() {
        assert!(norms.contains_key(&p.name), "{set}: trainable {} has no recorded gradient norm", p.name);
    }
    assert_scalar(&format!("{set} grad_total_norm"), total.sqrt(), scalar(set, "grad_total_norm"), 1e-4);
}

#[test]
fn pretrain_step() {
    let io = io("pretrain");
    let model = ContrastiveModel::new(&model_config("pretrain"), Objective::Pretrain, &Device::Cpu, 0).unwrap();
    load(&model.store, "pretrain");
    assert_close("queue before", &model.queues.image.as_tensor().clone(), &io["train_image_queue_before"], 0.0);
    let replay = Replay {
        neg_image: idx_vec(&io["train_neg_image_idx"]),
        neg_text: idx_vec(&io["train_neg_text_idx"]),
        mlm_ids: Some(io["train_mlm_input_ids"].clone()),
        mlm_labels: Some(io["train_mlm_labels"].clone()),
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let alpha = scalar("pretrain", "train_alpha");
    let losses = model
        .forward_train(
            &io["image"],
            &io["input_ids"],
            &io["attention_mask"],
            None,
            alpha,
            Some(&replay),
            &mut rng,
            false,
        )
        .unwrap();
    let get = |t: &Tensor| t.to_scalar::<f32>().unwrap() as f64;
    assert_scalar("loss_ita", get(&losses.ita), scalar("pretrain", "train_loss_ita"), 1e-5);
    assert_scalar("loss_itm", get(&losses.itm), scalar("pretrain", "train_loss_itm"), 1e-5);
    assert_scalar("loss_mlm", get(losses.mlm.as_ref().unwrap()), scalar("pretrain", "train_loss_mlm"), 1e-5);
    let total = losses.total().unwrap();
    assert_scalar("loss_total", get(&total), scalar("pretrain", "train_loss_total"), 1e-5);
    assert_close("image_queue after", &model.queues.image.as_tensor().clone(), &io["train_image_queue_after"], 1e-5);
    assert_close("text_queue after", &model.queues.text.as_tensor().clone(), &io["train_text_queue_after"], 1e-5);
    check_grads("pretrain", &model.store, &total.backward().unwrap());
}

#[test]
fn retrieval_step() {
    let io = io("retrieval");
    let model = ContrastiveModel::new(&model_config("retrieval"), Objective::Retrieval, &Device::Cpu, 0).unwrap();
    load(&model.store, "retrieval");
    let replay = Replay {
        neg_image: idx_vec(&io["train_neg_image_idx"]),
        neg_text: idx_vec(&io["train_neg_text_idx"]),
        mlm_ids: None,
        mlm_labels: None,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let alpha = scalar("retrieval", "train_alpha");
    let losses = model
        .forward_train(
            &io["image"],
            &io["train_input_ids"],
            &io["train_attention_mask"],
            Some(&io["train_idx"]),
            alpha,
            Some(&replay),
            &mut rng,
            false,
        )
        .unwrap();
    let get = |t: &Tensor| t.to_scalar::<f32>().unwrap() as f64;
    assert_scalar("loss_ita", get(&losses.ita), scalar("retrieval", "train_loss_ita"), 1e-5);
    assert_scalar("loss_itm", get(&losses.itm), scalar("retrieval", "train_loss_itm"), 1e-5);
    assert_close("image_queue after", &model.queues.image.as_tensor().clone(), &io["train_image_queue_after"], 1e-5);
    let idx_q = model.queues.idx.as_ref().unwrap().as_tensor().to_vec2::<i64>().unwrap();
    assert_eq!(idx_q, io["train_idx_queue_after"].to_vec2::<i64>().unwrap(), "idx_queue after");
    check_grads("retrieval", &model.store, &losses.total().unwrap().backward().unwrap());
}

#[test]
fn vqa_step() {
    let io = io("vqa");
    let model = VqaModel::new(&model_config("vqa"), &Device::Cpu, 0).unwrap();
    load(&model.store, "vqa");
    let counts = idx_vec(&io["train_k"]);
    let loss = model
        .forward_train(
            &io["image"],
            &io["question_ids"],
            &io["question_mask"],
            &io["train_answer_ids"],
            &io["train_answer_mask"],
            &io["train_weights"],
            &counts,
            scalar("vqa", "train_alpha"),
            false,
        )
        .unwrap();
    assert_scalar("vqa loss", loss.to_scalar::<f32>().unwrap() as f64, scalar("vqa", "train_loss"), 1e-5);
    check_grads("vqa", &model.store, &loss.backward().unwrap());
}

fn classifier_step(set: &str, kind: ClassifierKind, image: Tensor) {
    let io = io(set);
    let model = ClassifierModel::new(&model_config(set), kind, &Device::Cpu, 0).unwrap();
    load(&model.store, set);
    let loss = model
        .forward_train(
            &image,
            &io["input_ids"],
            &io["attention_mask"],
            &io["targets"],
            scalar(set, "train_alpha"),
            false,
        )
        .unwrap();
    assert_scalar(&format!("{set} loss"), loss.to_scalar::<f32>().unwrap() as f64, scalar(set, "train_loss"), 1e-5);
    check_grads(set, &model.store, &loss.backward().unwrap());
}

#[test]
fn ve_step() {
    classifier_step("ve", ClassifierKind::VisualEntailment, io("ve")["image"].clone());
}

#[test]
fn nlvr_step() {
    let io = io("nlvr");
    classifier_step("nlvr", ClassifierKind::Nlvr2, Tensor::cat(&[&io["image0"], &io["image1"]], 0).unwrap());
}

/// The same recorded step through `albef pretrain`'s code: its model builder, the task's
/// checkpoint loading, and its loss function (with the recorded masks and negatives).
#[test]
fn pretrain_step_through_the_task() {
    use albef::tasks::harness::TaskSpec;
    use albef::tasks::pretrain::{losses, Pretrain};
    use albef::tasks::{load_checkpoint, TeacherInit};
    let io = io("pretrain");
    let model = Pretrain::build_model(&model_config("pretrain"), &Device::Cpu, 0).unwrap();
    let ckpt = fixture_dir("pretrain").join("checkpoint.pth");
    load_checkpoint(&model, albef::task::Task::Pretrain, &ckpt, false, TeacherInit::FromLoaded).unwrap();
    let replay = Replay {
        neg_image: idx_vec(&io["train_neg_image_idx"]),
        neg_text: idx_vec(&io["train_neg_text_idx"]),
        mlm_ids: Some(io["train_mlm_input_ids"].clone()),
        mlm_labels: Some(io["train_mlm_labels"].clone()),
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let alpha = scalar("pretrain", "train_alpha");
    let (l, (_, masked)) =
        losses(&model, &io["image"], &io["input_ids"], &io["attention_mask"], alpha, Some(&replay), &mut rng, false)
            .unwrap();
    let labels = io["train_mlm_labels"].flatten_all().unwrap().to_vec1::<i64>().unwrap();
    assert_eq!(masked, labels.iter().filter(|&&x| x >= 0).count(), "MLM accuracy counts the masked tokens");
    let names: Vec<&str> = l.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["loss_mlm", "loss_ita", "loss_itm"], "the reference's log names");
    let mut total: Option<Tensor> = None;
    for (name, t) in &l {
        let want = scalar("pretrain", &format!("train_{name}"));
        assert_scalar(name, t.to_scalar::<f32>().unwrap() as f64, want, 1e-5);
        total = Some(match total {
            None => t.clone(),
            Some(s) => (s + t).unwrap(),
        });
    }
    let total = total.unwrap();
    assert_scalar("loss_total", total.to_scalar::<f32>().unwrap() as f64, scalar("pretrain", "train_loss_total"), 1e-5);
    check_grads("pretrain", &model.store, &total.backward().unwrap());
}
