//! Image-text contrastive (ITC) and image-text matching (ITM) losses, shared by the
//! pre-training and retrieval (grounding) models.

use super::bert::{BertModel, CrossStates, Mode};
use super::heads::cls;
use super::momentum::Queues;
use crate::nn::{cross_entropy, log_softmax, softmax, Linear};
use candle_core::{DType, Result, Tensor, D};
use rand::Rng;

/// Where ITM negatives come from: sampled from the similarity softmax, or given (to replay a
/// recorded step).
pub enum Negatives<'a, R: Rng> {
    Sample(&'a mut R),
    Given { image: Vec<usize>, text: Vec<usize> },
}

/// Features an ITC step needs. `*_m` are the teacher's, already L2-normalised.
pub struct ItcInputs<'a> {
    pub image_feat: &'a Tensor,
    pub text_feat: &'a Tensor,
    pub image_feat_m: &'a Tensor,
    pub text_feat_m: &'a Tensor,
    pub temp: &'a Tensor,
    /// (B, B+Q) ground-truth target distribution (identity, or the idx positives).
    pub targets: &'a Tensor,
    /// Distillation weight, `None` when the model does not distil.
    pub alpha: Option<f64>,
}

pub struct ItcOutput {
    pub loss: Tensor,
    /// Online-query vs momentum-key logits (B, B+Q), used to weight hard negatives.
    pub sim_i2t: Tensor,
    pub sim_t2i: Tensor,
}

/// ITC with momentum distillation (§3.1): online queries against momentum features + queue.
pub fn itc(inp: &ItcInputs, queues: &Queues) -> Result<ItcOutput> {
    let temp = inp.temp;
    let image_all = Tensor::cat(&[&inp.image_feat_m.t()?, &queues.image.as_tensor().detach()], 1)?;
    let text_all = Tensor::cat(&[&inp.text_feat_m.t()?, &queues.text.as_tensor().detach()], 1)?;
    let (tgt_i2t, tgt_t2i) = match inp.alpha {
        Some(alpha) => {
            let t = temp.detach();
            let sim_i2t_m = inp.image_feat_m.matmul(&text_all)?.broadcast_div(&t)?;
            let sim_t2i_m = inp.text_feat_m.matmul(&image_all)?.broadcast_div(&t)?;
            let mix = |sim: &Tensor| -> Result<Tensor> { (softmax(sim)? * alpha)? + (inp.targets * (1.0 - alpha))? };
            (mix(&sim_i2t_m)?, mix(&sim_t2i_m)?)
        }
        None => (inp.targets.clone(), inp.targets.clone()),
    };
    let sim_i2t = inp.image_feat.matmul(&text_all)?.broadcast_div(temp)?;
    let sim_t2i = inp.text_feat.matmul(&image_all)?.broadcast_div(temp)?;
    let l_i2t = log_softmax(&sim_i2t)?.mul(&tgt_i2t)?.sum(D::Minus1)?.mean_all()?.neg()?;
    let l_t2i = log_softmax(&sim_t2i)?.mul(&tgt_t2i)?.sum(D::Minus1)?.mean_all()?.neg()?;
    Ok(ItcOutput { loss: ((l_i2t + l_t2i)? * 0.5)?, sim_i2t, sim_t2i })
}

/// Negative-sampling weights from the in-batch part of the similarities: softmax over the first
/// B columns, then zero every pair that may not be a negative (`forbidden[i][j]`).
pub fn negative_weights(sim: &Tensor, forbidden: &dyn Fn(usize, usize) -> bool) -> Result<Vec<Vec<f32>>> {
    let b = sim.dim(0)?;
    let w = softmax(&sim.narrow(1, 0, b)?.detach())?.to_vec2::<f32>()?;
    Ok(w.into_iter()
        .enumerate()
        .map(|(i, row)| row.into_iter().enumerate().map(|(j, v)| if forbidden(i, j) { 0.0 } else { v }).collect())
        .collect())
}

/// `torch.multinomial(w, 1)` for one row. A row with no valid negative (every sample shares one
/// image, where the reference crashes) falls back to a uniform choice among the other rows.
pub fn sample_index<R: Rng>(weights: &[f32], own: usize, rng: &mut R) -> usize {
    let total: f64 = weights.iter().map(|&w| w.max(0.0) as f64).sum();
    if total > 0.0 && total.is_finite() {
        let mut u = rng.random::<f64>() * total;
        for (j, &w) in weights.iter().enumerate() {
            u -= w.max(0.0) as f64;
            if u < 0.0 {
                return j;
            }
        }
        return weights.iter().rposition(|&w| w > 0.0).unwrap_or(own);
    }
    let n = weights.len();
    if n <= 1 {
        return own;
    }
    let j = rng.random_range(0..n - 1);
    if j >= own {
        j + 1
    } else {
        j
    }
}

/// ITM with hard negatives (§3.2). Returns (loss, logits (3B, 2)).
#[allow(clippy::too_many_arguments)]
pub fn itm<R: Rng>(
    bert: &BertModel,
    itm_head: &Linear,
    text_embeds: &Tensor,
    text_mask: &Tensor,
    image_embeds: &Tensor,
    weights_i2t: &[Vec<f32>],
    weights_t2i: &[Vec<f32>],
    negatives: Negatives<R>,
    train: bool,
) -> Result<(Tensor, Tensor, Vec<usize>, Vec<usize>)> {
    let b = text_embeds.dim(0)?;
    let dev = text_embeds.device();
    let output_pos =
        bert.forward_embeds(text_embeds, text_mask, &[CrossStates::image(image_embeds)], Mode::Fusion, train)?;
    let (neg_img, neg_txt) = match negatives {
        Negatives::Given { image, text } => (image, text),
        Negatives::Sample(rng) => {
            // Same order as the reference: first an image for every text, then a text for every image.
            let img: Vec<usize> = (0..b).map(|i| sample_index(&weights_t2i[i], i, rng)).collect();
            let txt: Vec<usize> = (0..b).map(|i| sample_index(&weights_i2t[i], i, rng)).collect();
            (img, txt)
        }
    };
    let to_idx = |v: &[usize]| Tensor::from_vec(v.iter().map(|&x| x as u32).collect::<Vec<_>>(), v.len(), dev);
    let image_neg = image_embeds.index_select(&to_idx(&neg_img)?, 0)?;
    let text_neg = text_embeds.index_select(&to_idx(&neg_txt)?, 0)?;
    let mask_neg = text_mask.index_select(&to_idx(&neg_txt)?, 0)?;
    let text_all = Tensor::cat(&[text_embeds, &text_neg], 0)?;
    let mask_all = Tensor::cat(&[text_mask, &mask_neg], 0)?;
    let image_all = Tensor::cat(&[&image_neg, image_embeds], 0)?;
    let output_neg =
        bert.forward_embeds(&text_all, &mask_all, &[CrossStates::image(&image_all)], Mode::Fusion, train)?;
    let vl = Tensor::cat(&[&cls(&output_pos)?, &cls(&output_neg)?], 0)?;
    let logits = itm_head.forward(&vl)?;
    let labels: Vec<i64> = (0..3 * b).map(|i| if i < b { 1 } else { 0 }).collect();
    let labels = Tensor::from_vec(labels, 3 * b, dev)?;
    Ok((cross_entropy(&logits, &labels)?, logits, neg_img, neg_txt))
}

/// Identity targets (B, B+Q) for pre-training ITC.
pub fn identity_targets(b: usize, total: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let mut v = vec![0f32; b * total];
    for i in 0..b {
        v[i * total + i] = 1.0;
    }
    Tensor::from_vec(v, (b, total), dev)
}

/// Retrieval targets: positives are all columns with the same image idx, normalised per row.
pub fn idx_targets(idx: &Tensor, idx_queue: &Tensor) -> Result<Tensor> {
    let b = idx.dim(0)?;
    let idx_all = Tensor::cat(&[&idx.reshape((1, b))?, idx_queue], 1)?;
    let pos = idx.reshape((b, 1))?.broadcast_eq(&idx_all)?.to_dtype(DType::F32)?;
    pos.broadcast_div(&pos.sum_keepdim(1)?)
}
