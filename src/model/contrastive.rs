//! Image-text contrastive (ITC) and image-text matching (ITM) losses, shared by the
//! pre-training and retrieval (grounding) models.

use super::bert::{BertModel, CrossStates, Mode};
use super::heads::cls;
use super::momentum::Queues;
use crate::nn::{cross_entropy, log_softmax, matmul_fp32, softmax, Linear};
use candle_core::{DType, Result, Tensor, D};
use rand::Rng;

/// Where ITM negatives come from: sampled from the similarity softmax (on the device, with
/// uniforms from this RNG), or given (to replay a recorded step).
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
    // The queues are copied beside the batch (the reference's `torch.cat([feat_m.t(),
    // queue.clone().detach()], 1)`): they are written in place before the backward reads them.
    let image_all = Tensor::cat(&[&inp.image_feat_m.t()?, &queues.image.as_tensor().detach()], 1)?;
    let text_all = Tensor::cat(&[&inp.text_feat_m.t()?, &queues.text.as_tensor().detach()], 1)?;
    let (tgt_i2t, tgt_t2i) = match inp.alpha {
        Some(alpha) => {
            let t = temp.detach();
            let sim_i2t_m = matmul_fp32(inp.image_feat_m, &text_all)?.broadcast_div(&t)?;
            let sim_t2i_m = matmul_fp32(inp.text_feat_m, &image_all)?.broadcast_div(&t)?;
            let mix = |sim: &Tensor| -> Result<Tensor> { (softmax(sim)? * alpha)? + (inp.targets * (1.0 - alpha))? };
            (mix(&sim_i2t_m)?, mix(&sim_t2i_m)?)
        }
        None => (inp.targets.clone(), inp.targets.clone()),
    };
    // No gradient is made for the (untracked) copies of the queues.
    let sim_i2t = matmul_fp32(inp.image_feat, &text_all)?.broadcast_div(temp)?;
    let sim_t2i = matmul_fp32(inp.text_feat, &image_all)?.broadcast_div(temp)?;
    let l_i2t = log_softmax(&sim_i2t)?.mul(&tgt_i2t)?.sum(D::Minus1)?.mean_all()?.neg()?;
    let l_t2i = log_softmax(&sim_t2i)?.mul(&tgt_t2i)?.sum(D::Minus1)?.mean_all()?.neg()?;
    Ok(ItcOutput { loss: ((l_i2t + l_t2i)? * 0.5)?, sim_i2t, sim_t2i })
}

/// Negative-sampling weights (B, B) from the in-batch part of the similarities, on their device:
/// softmax over the first B columns, then zero every pair that may not be a negative
/// (`forbidden` (B, B), u8, 1 = same image), as the reference's `masked_fill_(mask, 0)`.
pub fn negative_weights(sim: &Tensor, forbidden: &Tensor) -> Result<Tensor> {
    let b = sim.dim(0)?;
    let w = softmax(&sim.narrow(1, 0, b)?.detach())?;
    forbidden.where_cond(&w.zeros_like()?, &w)
}

/// `torch.multinomial(weights, 1)` for every row of `weights` (B, N), on the device, by inverse
/// CDF: row i takes the first j whose cumulative weight exceeds `u[i]`·(row total), `u` (B,) f64
/// uniform in [0, 1). This is [`sample_index`]'s rule on the same uniforms (the sums are f64
/// as there, so the two agree but for ties at the last bit of an f64). A row with no positive
/// weight (every sample shows one image; the reference crashes) takes j = ⌊u·(N−1)⌋, shifted
/// past i: uniform over the other rows. Returns u32 indices (B,).
pub fn sample_rows(weights: &Tensor, u: &Tensor) -> Result<Tensor> {
    let (b, n) = weights.dims2()?;
    let dev = weights.device();
    if n <= 1 {
        // A batch of one has no other row: its own (as `sample_index`).
        return Tensor::zeros(b, DType::U32, dev);
    }
    let w = weights.detach().to_dtype(DType::F64)?.relu()?;
    let cum = w.cumsum(1)?;
    let total = cum.narrow(1, n - 1, 1)?; // (B, 1)
    let target = u.reshape((b, 1))?.broadcast_mul(&total)?;
    // The first j with cum_j > target is the number of j with cum_j ≤ target; never past the
    // last positive weight (u·total can round up to total).
    let below = cum.broadcast_le(&target)?.to_dtype(DType::F64)?.sum(1)?;
    let cols = Tensor::arange(0f64, n as f64, dev)?.reshape((1, n))?;
    let last_positive = w.gt(0f64)?.to_dtype(DType::F64)?.broadcast_mul(&cols)?.max(1)?;
    let picked = below.minimum(&last_positive)?;
    let rows = Tensor::arange(0f64, b as f64, dev)?;
    let uniform = (u * (n.saturating_sub(1)) as f64)?.floor()?.minimum(n.saturating_sub(2) as f64)?;
    let uniform = (&uniform + uniform.ge(&rows)?.to_dtype(DType::F64)?)?;
    let valid = total.squeeze(1)?.gt(0f64)?;
    valid.where_cond(&picked, &uniform)?.to_dtype(DType::U32)
}

/// The uniforms for [`sample_rows`], from the step's host RNG (a host-to-device copy, no sync).
pub fn uniforms<R: Rng>(n: usize, rng: &mut R, dev: &candle_core::Device) -> Result<Tensor> {
    Tensor::from_vec((0..n).map(|_| rng.random::<f64>()).collect::<Vec<f64>>(), n, dev)
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

/// ITM with hard negatives (§3.2). Returns (loss, logits (3B, 2), negative image and text
/// indices (B,) u32).
#[allow(clippy::too_many_arguments)]
pub fn itm<R: Rng>(
    bert: &BertModel,
    itm_head: &Linear,
    text_embeds: &Tensor,
    text_mask: &Tensor,
    image_embeds: &Tensor,
    weights_i2t: &Tensor,
    weights_t2i: &Tensor,
    negatives: Negatives<R>,
    train: bool,
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let b = text_embeds.dim(0)?;
    let dev = text_embeds.device();
    let to_idx = |v: &[usize]| Tensor::from_vec(v.iter().map(|&x| x as u32).collect::<Vec<_>>(), v.len(), dev);
    let (neg_img, neg_txt) = match negatives {
        Negatives::Given { image, text } => (to_idx(&image)?, to_idx(&text)?),
        Negatives::Sample(rng) => {
            // Same order as the reference: first an image for every text, then a text for every image.
            let u_img = uniforms(b, rng, dev)?;
            let u_txt = uniforms(b, rng, dev)?;
            (sample_rows(weights_t2i, &u_img)?, sample_rows(weights_i2t, &u_txt)?)
        }
    };
    // The reference's two fusion passes (B positive pairs, then each text with a sampled image
    // and each image with a sampled text) as one pass over the 3B pairs, in its order. Every
    // pair's image is a row of `image_embeds`, so the cross-attention keys and values are
    // projected once per image, not once per pair (a third of the reference's products), or not
    // at all where attention through the weights is cheaper (`Attention::forward`); the per-pair
    // values are the same (every row of a projection is computed alone).
    let own = Tensor::arange(0u32, b as u32, dev)?;
    let image_rows = Tensor::cat(&[&own, &neg_img, &own], 0)?;
    let text_neg = text_embeds.index_select(&neg_txt, 0)?;
    let mask_neg = text_mask.index_select(&neg_txt, 0)?;
    let text_all = Tensor::cat(&[text_embeds, text_embeds, &text_neg], 0)?;
    let mask_all = Tensor::cat(&[text_mask, text_mask, &mask_neg], 0)?;
    let cross = [CrossStates::image_rows(image_embeds, &image_rows)];
    let output = bert.forward_embeds(&text_all, &mask_all, &cross, Mode::Fusion, train)?;
    let logits = itm_head.forward(&cls(&output)?)?;
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

#[cfg(test)]
mod device_sampling {
    use super::*;
    use candle_core::Device;
    use rand::{rngs::StdRng, SeedableRng};

    /// Random rows of weights with some zeros (forbidden pairs), as `negative_weights` gives,
    /// each with at least one valid negative (rows without one are the next test's).
    fn weights(rows: usize, n: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..rows)
            .map(|i| {
                let mut row: Vec<f32> = (0..n)
                    .map(|j| if j == i % n || rng.random::<f32>() < 0.2 { 0.0 } else { rng.random::<f32>().powi(3) })
                    .collect();
                if row.iter().all(|&w| w == 0.0) {
                    row[(i + 1) % n] = 0.5;
                }
                row
            })
            .collect()
    }

    fn tensor(w: &[Vec<f32>]) -> Tensor {
        Tensor::new(w.to_vec(), &Device::Cpu).unwrap()
    }

    /// With the same seed, the device sampler picks exactly the indices the host sampler (the one
    /// the step used before) picked: the RNG stream and the inverse-CDF rule are the same.
    #[test]
    fn device_sampler_equals_the_host_sampler_on_the_same_seed() {
        for (n, seed) in [(4usize, 1u64), (8, 2), (32, 3)] {
            let rows = 600;
            let w = weights(rows, n, seed);
            let mut host_rng = StdRng::seed_from_u64(seed + 100);
            let host: Vec<u32> =
                w.iter().enumerate().map(|(i, r)| sample_index(r, i % n, &mut host_rng) as u32).collect();
            let mut dev_rng = StdRng::seed_from_u64(seed + 100);
            let u = uniforms(rows, &mut dev_rng, &Device::Cpu).unwrap();
            let device = sample_rows(&tensor(&w), &u).unwrap().to_vec1::<u32>().unwrap();
            assert_eq!(device, host, "n = {n}");
            for (i, &j) in device.iter().enumerate() {
                assert!(w[i][j as usize] > 0.0, "row {i} picked a zero-weight column {j}");
            }
        }
    }

    /// Frequencies over many draws follow the weights: Pearson's χ² against the expected counts
    /// stays below the 0.1% critical value (fixed seed, so the check is deterministic).
    #[test]
    fn sampled_frequencies_follow_the_weights() {
        let row = vec![0.4f32, 0.0, 0.3, 0.15, 0.1, 0.05, 0.0, 0.0];
        let draws = 40_000;
        let w = tensor(&vec![row.clone(); draws]);
        let u = uniforms(draws, &mut StdRng::seed_from_u64(7), &Device::Cpu).unwrap();
        let picked = sample_rows(&w, &u).unwrap().to_vec1::<u32>().unwrap();
        let mut counts = [0usize; 8];
        picked.iter().for_each(|&j| counts[j as usize] += 1);
        let mut chi2 = 0.0;
        for (j, &p) in row.iter().enumerate() {
            if p == 0.0 {
                assert_eq!(counts[j], 0, "zero-weight column {j} was drawn");
                continue;
            }
            let expected = p as f64 * draws as f64;
            chi2 += (counts[j] as f64 - expected).powi(2) / expected;
        }
        // 5 positive columns: 4 degrees of freedom, χ²(0.999) = 18.47.
        assert!(chi2 < 18.47, "χ² = {chi2:.2}, counts {counts:?}");
    }

    /// A row with no valid negative takes the other rows uniformly, never its own. (Here the
    /// host sampler drew `random_range` instead of `random::<f64>`, so in this case only the
    /// device sampler's draws differ from the old ones.)
    #[test]
    fn rows_without_a_valid_negative_pick_another_row_uniformly() {
        let (b, reps) = (5usize, 4000usize);
        let zeros = Tensor::zeros((b, b), DType::F32, &Device::Cpu).unwrap();
        let mut seen = vec![[0usize; 5]; b];
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..reps {
            let u = uniforms(b, &mut rng, &Device::Cpu).unwrap();
            for (i, &j) in sample_rows(&zeros, &u).unwrap().to_vec1::<u32>().unwrap().iter().enumerate() {
                seen[i][j as usize] += 1;
            }
        }
        for (i, c) in seen.iter().enumerate() {
            assert_eq!(c[i], 0, "row {i} picked itself");
            for (j, &k) in c.iter().enumerate().filter(|(j, _)| *j != i) {
                let share = k as f64 / reps as f64;
                assert!((share - 0.25).abs() < 0.03, "row {i} → {j}: share {share:.3}");
            }
        }
    }
}
