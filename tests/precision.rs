//! bf16 mixed precision on the CPU: one recorded training step against fp32, and training that
//! lowers the losses.
//!
//! Tolerances. bf16 keeps 8 significant bits: rounding an operand moves it by at most 2⁻⁹
//! (0.2%) relative. A matmul of rounded operands with f32 accumulation has a relative error of
//! about that size per entry, and the errors of successive layers add up, partly cancelling; the
//! fixture model has 3 ViT blocks and 4 BERT layers (plus the fusion pass over them), so the
//! losses, computed in f32 from those activations, are held to 1% relative, and the whole
//! gradient (‖g_bf16 − g_fp32‖ / ‖g_fp32‖) to 2%: the backward repeats the forward's matmuls
//! twice more in bf16 (and small entries of a gradient carry far larger relative errors than the
//! whole vector, so no per-entry bound is meaningful). Measured on this machine: loss_ita
//! 1.7e-3, loss_itm 6e-5, gradient 4.4e-3 (`--nocapture` prints them).

mod common;

use albef::checkpoint::{load_into, read_checkpoint};
use albef::model::contrastive_model::Replay;
use albef::model::{ContrastiveModel, Objective};
use albef::nn::{with_precision, Precision};
use albef::train::optim::AdamW;
use candle_core::{Device, Tensor};
use common::*;
use rand::SeedableRng;

fn retrieval_model() -> ContrastiveModel {
    let model = ContrastiveModel::new(&model_config("retrieval"), Objective::Retrieval, &Device::Cpu, 0).unwrap();
    let ckpt = read_checkpoint(&fixture_dir("retrieval").join("checkpoint.pth"), &Device::Cpu).unwrap();
    load_into(&model.store, &ckpt.tensors).unwrap();
    model
}

/// The recorded retrieval step (recorded negatives): (ITA, ITM) losses and every gradient.
fn recorded_step(p: Precision) -> (f64, f64, Vec<(String, Tensor)>) {
    let io = io("retrieval");
    let model = retrieval_model();
    let idx = |t: &Tensor| t.to_vec1::<i64>().unwrap().into_iter().map(|x| x as usize).collect();
    let replay = Replay {
        neg_image: idx(&io["train_neg_image_idx"]),
        neg_text: idx(&io["train_neg_text_idx"]),
        mlm_ids: None,
        mlm_labels: None,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    with_precision(p, || {
        let l = model
            .forward_train(
                &io["image"],
                &io["train_input_ids"],
                &io["train_attention_mask"],
                Some(&io["train_idx"]),
                scalar("retrieval", "train_alpha"),
                Some(&replay),
                &mut rng,
                false,
            )
            .unwrap();
        let grads = l.total().unwrap().backward().unwrap();
        let g = model
            .store
            .trainable()
            .into_iter()
            .filter_map(|p| grads.get(&p.var).map(|g| (p.name.clone(), g.clone())))
            .collect();
        let s = |t: &Tensor| t.to_scalar::<f32>().unwrap() as f64;
        (s(&l.ita), s(&l.itm), g)
    })
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn fp32_stays_the_reference_step() {
    let (ita, itm, _) = recorded_step(Precision::Fp32);
    assert_scalar("loss_ita", ita, scalar("retrieval", "train_loss_ita"), 1e-5);
    assert_scalar("loss_itm", itm, scalar("retrieval", "train_loss_itm"), 1e-5);
}

#[test]
fn a_bf16_step_matches_fp32_within_bf16_rounding() {
    let (ita32, itm32, g32) = recorded_step(Precision::Fp32);
    let (ita16, itm16, g16) = recorded_step(Precision::Bf16);
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
    println!("bf16 vs fp32: loss_ita {:.3e}, loss_itm {:.3e} relative", rel(ita16, ita32), rel(itm16, itm32));
    assert!(rel(ita16, ita32) < 1e-2, "loss_ita {ita16} vs {ita32}");
    assert!(rel(itm16, itm32) < 1e-2, "loss_itm {itm16} vs {itm32}");
    // Gradients are f32 (the master weights'), and exist for the same parameters.
    assert_eq!(g16.len(), g32.len());
    let (mut diff, mut norm) = (0f64, 0f64);
    for ((n16, a), (n32, b)) in g16.iter().zip(&g32) {
        assert_eq!(n16, n32);
        assert_eq!(a.dtype(), candle_core::DType::F32, "{n16}: gradient dtype");
        for (x, y) in flat(a).iter().zip(flat(b)) {
            diff += ((x - y) as f64).powi(2);
            norm += (y as f64).powi(2);
        }
    }
    let err = (diff / norm).sqrt();
    println!("bf16 vs fp32: whole gradient relative error {err:.3e}");
    assert!(err < 2e-2, "gradient relative error {err}");
    // And the step really ran in bf16: the losses differ from fp32's.
    assert_ne!(ita16, ita32, "bf16 gave fp32's exact loss: the matmuls did not run in bf16");
}

/// Training steps on the fixture's batch in bf16 (dropout on, sampled negatives, AdamW on the f32
/// master weights) lower the ITC + ITM loss.
#[test]
fn losses_fall_when_training_in_bf16() {
    let io = io("retrieval");
    let model = retrieval_model();
    let mut optimizer = AdamW::new(&model.store, 0.02).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut totals = Vec::new();
    with_precision(Precision::Bf16, || {
        for _ in 0..12 {
            let l = model
                .forward_train(
                    &io["image"],
                    &io["train_input_ids"],
                    &io["train_attention_mask"],
                    Some(&io["train_idx"]),
                    0.4,
                    None,
                    &mut rng,
                    true,
                )
                .unwrap();
            let total = l.total().unwrap();
            totals.push(total.to_scalar::<f32>().unwrap());
            optimizer.step(&total.backward().unwrap(), 1e-3).unwrap();
        }
    });
    println!("bf16 training losses: {totals:?}");
    let first: f32 = totals[..3].iter().sum::<f32>() / 3.0;
    let last: f32 = totals[totals.len() - 3..].iter().sum::<f32>() / 3.0;
    assert!(totals.iter().all(|t| t.is_finite()));
    assert!(last < 0.8 * first, "losses did not fall: {totals:?}");
    assert!(model.store.all_finite().unwrap());
}
