//! `--accum-steps N`: N micro-batches, each a complete task step (its own in-batch negatives,
//! its own enqueue), then one AdamW step with the mean of their gradients.

mod common;

use albef::checkpoint::{load_into, read_checkpoint};
use albef::config::ScheduleConfig;
use albef::model::contrastive_model::Replay;
use albef::model::{ContrastiveModel, Objective};
use albef::nn::{Init, ParamStore};
use albef::train::optim::AdamW;
use albef::train::{train_epoch, LoopConfig, Losses};
use candle_core::{backprop::GradStore, Device, Tensor};
use common::*;

/// A constant learning rate, so that steps taken at different iterations are comparable.
fn loop_cfg(accum_steps: usize) -> LoopConfig {
    let schedule = ScheduleConfig {
        sched: "cosine".into(),
        lr: 0.01,
        epochs: 1,
        min_lr: 0.01,
        warmup_lr: 0.01,
        warmup_epochs: 0,
        decay_rate: None,
        cooldown_epochs: None,
    };
    LoopConfig { schedule, alpha: 0.0, warm_up: false, seed: 3, skip_nonfinite: 0, accum_steps, dist: None }
}

fn values(store: &ParamStore) -> Vec<Vec<f32>> {
    store.trainable().iter().map(|p| p.var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

/// A small non-quadratic model: loss_i = Σ (w ⊙ w − x_i)² · (1 + i).
fn toy_loss(w: &Tensor, i: usize) -> Tensor {
    let x = Tensor::new(&[0.3f32 * i as f32, -0.2, 1.0, 0.5 + i as f32], &Device::Cpu).unwrap();
    ((w.sqr().unwrap() - x).unwrap().sqr().unwrap().sum_all().unwrap() * (1.0 + i as f64)).unwrap()
}

fn toy_store() -> (ParamStore, Tensor) {
    let store = ParamStore::new(&Device::Cpu, 0);
    let w = store.root(true).get(4, "w", Init::Const(0.7)).unwrap();
    (store, w)
}

fn mean_of(opt: &AdamW, grads: Vec<GradStore>) -> GradStore {
    let n = grads.len();
    let mut sum = None;
    for g in grads {
        opt.accumulate(&mut sum, g).unwrap();
    }
    opt.scaled(&sum.unwrap(), 1.0 / n as f64).unwrap()
}

#[test]
fn accumulated_steps_equal_steps_with_the_averaged_gradient() {
    let batches = 5; // windows of 2: (0, 1), (2, 3), and a short last one (4)
    let (store, w) = toy_store();
    let mut opt = AdamW::new(&store, 0.01).unwrap();
    let mut skipped = 0;
    train_epoch(
        &loop_cfg(2),
        &mut opt,
        &mut skipped,
        0,
        (0..batches).map(Ok),
        batches,
        |i: usize, _, _| Ok::<Losses, anyhow::Error>(vec![("loss", toy_loss(&w, i))]),
        |_, _, _, _| Ok(()),
    )
    .unwrap();
    assert_eq!(opt.step, 3, "one optimizer step per window");

    let (by_hand, w2) = toy_store();
    let mut opt2 = AdamW::new(&by_hand, 0.01).unwrap();
    for window in [vec![0, 1], vec![2, 3], vec![4]] {
        let grads = window.iter().map(|&i| toy_loss(&w2, i).backward().unwrap()).collect();
        let mean = mean_of(&opt2, grads);
        opt2.step(&mean, 0.01).unwrap();
    }
    assert_eq!(values(&store), values(&by_hand));
    // And it is not the plain per-batch run.
    let (plain, w3) = toy_store();
    let mut opt3 = AdamW::new(&plain, 0.01).unwrap();
    train_epoch(
        &loop_cfg(1),
        &mut opt3,
        &mut 0,
        0,
        (0..batches).map(Ok),
        batches,
        |i: usize, _, _| Ok::<Losses, anyhow::Error>(vec![("loss", toy_loss(&w3, i))]),
        |_, _, _, _| Ok(()),
    )
    .unwrap();
    assert_eq!(opt3.step, 5);
    assert_ne!(values(&store), values(&plain));
}

fn retrieval_model() -> ContrastiveModel {
    let model = ContrastiveModel::new(&model_config("retrieval"), Objective::Retrieval, &Device::Cpu, 0).unwrap();
    let ckpt = read_checkpoint(&fixture_dir("retrieval").join("checkpoint.pth"), &Device::Cpu).unwrap();
    load_into(&model.store, &ckpt.tensors).unwrap();
    model
}

/// The fixture's batch of 4 as two micro-batches of 2: with `accum_steps: 2` the model ends
/// where the reference run with batch 2 would be after its two forwards (each micro-batch its
/// own negatives, EMA update and enqueue — the queue advanced by 2 twice), with one AdamW step
/// by the mean of the two gradients in place of the reference's two steps.
#[test]
fn contrastive_micro_batches_keep_their_own_negatives_and_enqueue() {
    let io = io("retrieval");
    let half = |t: &Tensor, k: usize| t.narrow(0, 2 * k, 2).unwrap();
    let micro = |k: usize| {
        (
            half(&io["image"], k),
            half(&io["train_input_ids"], k),
            half(&io["train_attention_mask"], k),
            half(&io["train_idx"], k),
        )
    };
    // In-batch negatives of a batch of 2: the other sample (when it shows another image).
    let replay = Replay { neg_image: vec![1, 0], neg_text: vec![1, 0], mlm_ids: None, mlm_labels: None };
    let step = |model: &ContrastiveModel, k: usize| -> Losses {
        let (image, ids, mask, idx) = micro(k);
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
        let l = model.forward_train(&image, &ids, &mask, Some(&idx), 0.4, Some(&replay), &mut rng, false).unwrap();
        vec![("loss_ita", l.ita), ("loss_itm", l.itm)]
    };

    let model = retrieval_model();
    let mut opt = AdamW::new(&model.store, 0.02).unwrap();
    train_epoch(
        &loop_cfg(2),
        &mut opt,
        &mut 0,
        0,
        (0..2).map(Ok),
        2,
        |k: usize, _, _| Ok(step(&model, k)),
        |_, _, _, _| Ok(()),
    )
    .unwrap();
    assert_eq!(opt.step, 1);

    let by_hand = retrieval_model();
    let mut opt2 = AdamW::new(&by_hand.store, 0.02).unwrap();
    let grads = (0..2)
        .map(|k| {
            let l = step(&by_hand, k);
            (&l[0].1 + &l[1].1).unwrap().backward().unwrap()
        })
        .collect();
    let mean = mean_of(&opt2, grads);
    opt2.step(&mean, 0.01).unwrap();

    assert_eq!(values(&model.store), values(&by_hand.store));
    let q = |m: &ContrastiveModel| m.queues.image.as_tensor().to_vec2::<f32>().unwrap();
    assert_eq!(q(&model), q(&by_hand));
    assert_eq!(model.queues.ptr.as_tensor().to_vec1::<i64>().unwrap(), [4], "two enqueues of 2");
    let idx_q = model.queues.idx.as_ref().unwrap().as_tensor().to_vec2::<i64>().unwrap();
    assert_eq!(
        &idx_q[0][..4],
        io["train_idx"].to_vec1::<i64>().unwrap().as_slice(),
        "idx queue holds both micro-batches"
    );
}
