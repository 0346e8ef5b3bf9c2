//! Retrieval scoring (`Retrieval.py::evaluation`, §4): cosine similarities pick the top-k
//! candidates, the ITM class-1 logit re-ranks them, −100 elsewhere.

use crate::model::vqa::topk_indices;
use crate::model::ContrastiveModel;
use candle_core::{IndexOp, Result, Tensor};

/// A dense row-major score matrix.
pub type Scores = Vec<Vec<f32>>;

/// Encoded evaluation set.
pub struct Encoded {
    /// (N_img, 1+N, Dv) image states.
    pub image_feats: Tensor,
    /// (N_img, E) normalised ITC features.
    pub image_embeds: Tensor,
    /// (N_txt, L, D) text-mode states.
    pub text_feats: Tensor,
    pub text_mask: Tensor,
    /// (N_txt, E).
    pub text_embeds: Tensor,
}

/// `(score_i2t (N_img, N_txt), score_t2i (N_txt, N_img))`.
pub fn score_matrices(
    model: &ContrastiveModel,
    enc: &Encoded,
    k_test: usize,
) -> Result<(Scores, Scores)> {
    let sims = enc
        .image_embeds
        .matmul(&enc.text_embeds.t()?)?
        .to_vec2::<f32>()?;
    let (ni, nt) = (sims.len(), enc.text_feats.dim(0)?);
    let dev = enc.image_feats.device();
    let idx_tensor = |v: &[usize]| {
        Tensor::from_vec(
            v.iter().map(|&x| x as u32).collect::<Vec<_>>(),
            v.len(),
            dev,
        )
    };
    let mut i2t = vec![vec![-100f32; nt]; ni];
    for (i, row) in sims.iter().enumerate() {
        let top = topk_indices(row, k_test.min(nt));
        let sel = idx_tensor(&top)?;
        let text = enc.text_feats.index_select(&sel, 0)?;
        let mask = enc.text_mask.index_select(&sel, 0)?;
        let image = enc.image_feats.i(i..i + 1)?.repeat((top.len(), 1, 1))?;
        let logits = model
            .itm_logits(&model.fuse(&text, &mask, &image)?)?
            .i((.., 1))?
            .to_vec1::<f32>()?;
        for (j, &t) in top.iter().enumerate() {
            i2t[i][t] = logits[j];
        }
    }
    let mut t2i = vec![vec![-100f32; ni]; nt];
    for (t, row) in t2i.iter_mut().enumerate() {
        let col: Vec<f32> = sims.iter().map(|r| r[t]).collect();
        let top = topk_indices(&col, k_test.min(ni));
        let sel = idx_tensor(&top)?;
        let image = enc.image_feats.index_select(&sel, 0)?;
        let text = enc.text_feats.i(t..t + 1)?.repeat((top.len(), 1, 1))?;
        let mask = enc.text_mask.i(t..t + 1)?.repeat((top.len(), 1))?;
        let logits = model
            .itm_logits(&model.fuse(&text, &mask, &image)?)?
            .i((.., 1))?
            .to_vec1::<f32>()?;
        for (j, &i) in top.iter().enumerate() {
            row[i] = logits[j];
        }
    }
    Ok((i2t, t2i))
}
