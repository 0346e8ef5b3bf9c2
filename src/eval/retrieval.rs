//! Retrieval scoring (`Retrieval.py::evaluation`, §4): cosine similarities pick the top-k
//! candidates, the ITM class-1 logit re-ranks them, −100 elsewhere.

use crate::dist::Communicator;
use crate::model::ContrastiveModel;
use crate::util::{topk_indices, Metrics};
use candle_core::{IndexOp, Result, Tensor};
use std::ops::Range;

/// A dense row-major score matrix.
pub type Scores = Vec<Vec<f32>>;

/// An encoded evaluation split (Retrieval.py calls the states `*_feats` and the ITC features
/// `*_embeds`; here the names follow the model's: states vs. features).
pub struct EncodedSplit {
    /// (N_img, 1+N, Dv) image states.
    pub image_states: Tensor,
    /// (N_img, E) normalised ITC features.
    pub image_feat: Tensor,
    /// (N_txt, L, D) text-mode states.
    pub text_states: Tensor,
    pub text_mask: Tensor,
    /// (N_txt, E) normalised ITC features.
    pub text_feat: Tensor,
}

/// Texts per fusion call when scoring.
const CHUNK: usize = 128;

/// Texts are cut to their length rounded up to this many tokens: a text's numbers then depend
/// on nothing but itself, whatever else shares its fusion call (sharded evaluation scores other
/// lists than one process and must give the same bits).
const LENGTH_BUCKET: usize = 8;

/// ITM class-1 logits of `texts` (indices) against image `i`; the image states are shared by
/// the batch rather than repeated (same numbers, far fewer cross-attention projections). Texts
/// are grouped by length bucket and each call is cut to its bucket: the padding it drops is
/// masked with −10000, whose softmax weight is exactly 0 in f32.
fn itm_scores(
    model: &ContrastiveModel,
    enc: &EncodedSplit,
    lengths: &[usize],
    i: usize,
    texts: &[usize],
) -> Result<Vec<f32>> {
    let dev = enc.image_states.device();
    let full = enc.text_states.dim(1)?;
    let bucket = |t: usize| (lengths[t].div_ceil(LENGTH_BUCKET) * LENGTH_BUCKET).clamp(1, full);
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&j| (bucket(texts[j]), texts[j]));
    let mut out = vec![0f32; texts.len()];
    for group in order.chunk_by(|&a, &b| bucket(texts[a]) == bucket(texts[b])) {
        let len = bucket(texts[group[0]]);
        for chunk in group.chunks(CHUNK) {
            let ids: Vec<u32> = chunk.iter().map(|&j| texts[j] as u32).collect();
            let sel = Tensor::from_vec(ids, chunk.len(), dev)?;
            let text = enc.text_states.index_select(&sel, 0)?.narrow(1, 0, len)?;
            let mask = enc.text_mask.index_select(&sel, 0)?.narrow(1, 0, len)?;
            let fused = model.fuse(&text, &mask, &enc.image_states.i(i..i + 1)?)?;
            for (&j, s) in chunk.iter().zip(model.itm_logits(&fused)?.i((.., 1))?.to_vec1::<f32>()?) {
                out[j] = s;
            }
        }
    }
    Ok(out)
}

/// Tokens up to and including each text's last unmasked one.
fn text_lengths(mask: &Tensor) -> Result<Vec<usize>> {
    let rows = mask.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    Ok(rows.iter().map(|r| r.iter().rposition(|&m| m != 0.0).map_or(r.len(), |p| p + 1)).collect())
}

/// `(score_i2t (N_img, N_txt), score_t2i (N_txt, N_img))`: for each image its top-`k_test` texts
/// by cosine similarity, for each text its top-`k_test` images, scored by the ITM logit; −100
/// elsewhere. Text-to-image pairs are grouped by image, which changes no score.
pub fn score_matrices(model: &ContrastiveModel, enc: &EncodedSplit, k_test: usize) -> Result<(Scores, Scores)> {
    let (ni, nt) = (enc.image_feat.dim(0)?, enc.text_states.dim(0)?);
    score_rows(model, enc, k_test, 0..ni, 0..nt, -100.0)
}

/// [`score_matrices`] over the ranks of `comm`: each rank scores its rows (Retrieval.py's split,
/// `step = N // world + 1`) and the matrices are summed over ranks. The rows a rank does not
/// score hold 0 there, so the sum is exactly the one-process matrix (the reference fills −100
/// everywhere, which shifts every score by −100·(world − 1) and no ranking).
pub fn score_matrices_sharded(
    model: &ContrastiveModel,
    enc: &EncodedSplit,
    k_test: usize,
    comm: &dyn Communicator,
) -> anyhow::Result<(Scores, Scores)> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let rows = |n: usize| {
        let step = n / world + 1;
        (rank * step).min(n)..((rank + 1) * step).min(n)
    };
    let (ni, nt) = (enc.image_feat.dim(0)?, enc.text_states.dim(0)?);
    let (i2t, t2i) = score_rows(model, enc, k_test, rows(ni), rows(nt), 0.0)?;
    let sum = |m: Scores, cols: usize| -> anyhow::Result<Scores> {
        let n = m.len();
        let flat = Tensor::from_vec(m.concat(), n * cols, &candle_core::Device::Cpu)?;
        let summed = comm.all_reduce_sum(&flat)?.to_vec1::<f32>()?;
        Ok(summed.chunks(cols.max(1)).take(n).map(<[f32]>::to_vec).collect())
    };
    Ok((sum(i2t, nt)?, sum(t2i, ni)?))
}

/// Scores of image rows `images` of `score_i2t` and text rows `texts` of `score_t2i` (−100 where
/// not a candidate), every other row filled with `other`.
fn score_rows(
    model: &ContrastiveModel,
    enc: &EncodedSplit,
    k_test: usize,
    images: Range<usize>,
    texts: Range<usize>,
    other: f32,
) -> Result<(Scores, Scores)> {
    let sims = enc.image_feat.matmul(&enc.text_feat.t()?)?.to_vec2::<f32>()?;
    let (ni, nt) = (sims.len(), enc.text_states.dim(0)?);
    let row = |owned: bool, len: usize| vec![if owned { -100f32 } else { other }; len];
    let mut i2t: Scores = (0..ni).map(|i| row(images.contains(&i), nt)).collect();
    let mut t2i: Scores = (0..nt).map(|t| row(texts.contains(&t), ni)).collect();
    let mut by_image: Vec<Vec<usize>> = vec![Vec::new(); ni];
    for t in texts {
        let col: Vec<f32> = sims.iter().map(|r| r[t]).collect();
        for i in topk_indices(&col, k_test.min(ni)) {
            by_image[i].push(t);
        }
    }
    // Each image's candidates of both directions in one list: a pair in both top-k's is scored once.
    let lengths = text_lengths(&enc.text_mask)?;
    for (i, row) in sims.iter().enumerate() {
        let top = if images.contains(&i) { topk_indices(row, k_test.min(nt)) } else { Vec::new() };
        let mut pairs = top.clone();
        pairs.extend(by_image[i].iter().copied());
        pairs.sort_unstable();
        pairs.dedup();
        if pairs.is_empty() {
            continue;
        }
        let scores = itm_scores(model, enc, &lengths, i, &pairs)?;
        let score_of = |t: usize| scores[pairs.binary_search(&t).expect("every candidate was scored")];
        for &t in &top {
            i2t[i][t] = score_of(t);
        }
        for &t in &by_image[i] {
            t2i[t][i] = score_of(t);
        }
    }
    Ok((i2t, t2i))
}

/// Rank of each query's best ground-truth item in its score row (0 = first).
fn best_rank(scores: &[f32], truth: &[usize]) -> usize {
    // `np.argsort(score)[::-1]`: descending; position of the first ground-truth item.
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap_or(std::cmp::Ordering::Equal));
    order.iter().position(|i| truth.contains(i)).unwrap_or(order.len())
}

fn recall(ranks: &[usize], k: usize) -> f64 {
    100.0 * ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len().max(1) as f64
}

/// `itm_eval`: R@1/5/10 both ways and their means.
pub fn itm_eval(i2t: &Scores, t2i: &Scores, txt2img: &[usize], img2txt: &[Vec<usize>]) -> Metrics {
    let tr: Vec<usize> = i2t.iter().zip(img2txt).map(|(row, truth)| best_rank(row, truth)).collect();
    let ir: Vec<usize> = t2i.iter().zip(txt2img).map(|(row, &truth)| best_rank(row, &[truth])).collect();
    let (tr1, tr5, tr10) = (recall(&tr, 1), recall(&tr, 5), recall(&tr, 10));
    let (ir1, ir5, ir10) = (recall(&ir, 1), recall(&ir, 5), recall(&ir, 10));
    let (tr_mean, ir_mean) = ((tr1 + tr5 + tr10) / 3.0, (ir1 + ir5 + ir10) / 3.0);
    [
        ("txt_r1", tr1),
        ("txt_r5", tr5),
        ("txt_r10", tr10),
        ("txt_r_mean", tr_mean),
        ("img_r1", ir1),
        ("img_r5", ir5),
        ("img_r10", ir10),
        ("img_r_mean", ir_mean),
        ("r_mean", (tr_mean + ir_mean) / 2.0),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_at_k_by_hand() {
        // 2 images, 4 texts (2 each). Image 0 ranks its text 1 first; image 1 ranks its texts
        // after both of image 0's (rank 2).
        let i2t = vec![vec![0.1, 0.9, 0.2, 0.0], vec![0.8, 0.7, 0.1, 0.3]];
        let img2txt = vec![vec![0, 1], vec![2, 3]];
        // Texts 0, 1 prefer image 0; text 2 prefers image 0 (wrong); text 3 prefers image 1.
        let t2i = vec![vec![0.9, 0.1], vec![0.8, 0.2], vec![0.6, 0.4], vec![0.1, 0.9]];
        let txt2img = vec![0, 0, 1, 1];
        let m = itm_eval(&i2t, &t2i, &txt2img, &img2txt);
        assert_eq!(m["txt_r1"], 50.0);
        assert_eq!(m["txt_r5"], 100.0);
        assert_eq!(m["img_r1"], 75.0);
        assert_eq!(m["img_r5"], 100.0);
        assert!((m["r_mean"] - (250.0 / 3.0 + 275.0 / 3.0) / 2.0).abs() < 1e-9);
        assert_eq!(m.keys().next().unwrap(), "txt_r1");
    }
}
