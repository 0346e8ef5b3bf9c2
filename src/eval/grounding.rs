//! Weakly-supervised grounding: Grad-CAM maps as Grounding.py's `val` computes them, and box
//! selection and IoU as `dataset/utils.py::grounding_eval` / `computeIoU` do.

use crate::checkpoint::torch_upsample_bicubic_plane;
use crate::model::ContrastiveModel;
use candle_core::{DType, Result, Tensor, D};
use std::ops::Range;

/// Where the map comes from (`--gradcam_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GradcamMode {
    /// Cross-attention of a BERT fusion layer, gradient of the positive ITM logit.
    #[default]
    Itm,
    /// CLS self-attention of a ViT block, gradient of the ITC similarity.
    Itc,
}

impl std::str::FromStr for GradcamMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "itm" => Ok(Self::Itm),
            "itc" => Ok(Self::Itc),
            _ => anyhow::bail!("--gradcam_mode {s:?}: one of itm, itc"),
        }
    }
}

/// The (A, G) pair a Grad-CAM is made of: attention probabilities and their gradient.
pub struct Attn {
    pub probs: Tensor,
    pub grads: Tensor,
}

/// Runs the probed forward and its backward: `itm` → cross-attention of BERT layer `block`
/// (B, H, L, 1+N) and d(Σ ITM positive logit)/dA; `itc` → self-attention of ViT block `block`
/// (B, H, 1+N, 1+N) and d(Σ diag(sim))/dA.
pub fn attention_and_gradient(
    model: &ContrastiveModel,
    image: &Tensor,
    ids: &Tensor,
    mask: &Tensor,
    mode: GradcamMode,
    block: usize,
) -> Result<Attn> {
    let (loss, probs) = match mode {
        GradcamMode::Itm => {
            let (logits, probs) = model.itm_probe(image, ids, mask, block, None)?;
            (logits.narrow(1, 1, 1)?.sum_all()?, probs)
        }
        GradcamMode::Itc => {
            let (diag, probs) = model.itc_probe(image, ids, mask, block, None)?;
            (diag.sum_all()?, probs)
        }
    };
    let grads = loss.backward()?;
    let g = match grads.get(probs.as_tensor()) {
        Some(g) => g.clone(),
        None => probs.as_tensor().zeros_like()?,
    };
    Ok(Attn { probs: probs.as_tensor().clone(), grads: g })
}

/// `itm` mode, per token: `(A[..., 1:] · mask) · (clamp(G[..., 1:], 0) · mask)` averaged over the
/// heads: (B, L, N), N = grid cells (the image CLS column dropped).
pub fn itm_token_maps(a: &Attn, mask: &Tensor) -> Result<Tensor> {
    let (b, _h, l, k) = a.probs.dims4()?;
    let n = k - 1;
    let m = mask.to_dtype(DType::F32)?.reshape((b, 1, l, 1))?;
    let cams = a.probs.narrow(3, 1, n)?.broadcast_mul(&m)?;
    let grads = a.grads.narrow(3, 1, n)?.clamp(0f32, f32::INFINITY)?.broadcast_mul(&m)?;
    (cams * grads)?.mean(1)
}

/// Grad-CAM maps (B, N) of a batch, as Grounding.py's `val` computes them.
///
/// Reference quirk kept (`itm`): the head mean is followed by a mean over **all** L positions
/// of the batch's `padding='longest'` length, padding included (masked to zero), so an
/// expression's map is scaled by 1/L of its batch and depends on its batch-mates.
pub fn gradcam_maps(a: &Attn, mask: &Tensor, mode: GradcamMode) -> Result<Tensor> {
    match mode {
        GradcamMode::Itm => itm_token_maps(a, mask)?.mean(1),
        GradcamMode::Itc => {
            let k = a.probs.dim(D::Minus1)?;
            let cam = a.probs.narrow(2, 0, 1)?.narrow(3, 1, k - 1)?.squeeze(2)?;
            let grad = a.grads.narrow(2, 0, 1)?.narrow(3, 1, k - 1)?.squeeze(2)?.clamp(0f32, f32::INFINITY)?;
            (cam * grad)?.mean(1)
        }
    }
}

/// `F.interpolate(map.view(1, 1, gh, gw), size=(H, W), mode='bicubic')` (A = −0.75,
/// `align_corners=False`): row-major (H, W).
pub fn upsample(map: &[f32], gh: usize, gw: usize, height: usize, width: usize) -> Vec<f32> {
    torch_upsample_bicubic_plane(map, gh, gw, height, width)
}

/// The indices a Python / PyTorch slice `start:stop` selects from a dimension of length `len`:
/// negative ends count from the back, then both are clamped to `0..=len`.
pub fn py_slice(start: i64, stop: i64, len: usize) -> Range<usize> {
    let n = len as i64;
    let fix = |i: i64| if i < 0 { (i + n).max(0) } else { i.min(n) } as usize;
    let (a, b) = (fix(start), fix(stop));
    a..b.max(a)
}

/// Box score of `grounding_eval`: `M[int(y):int(y+h), int(x):int(x+w)].sum() / (w·h) ** 0.5`.
/// Reference quirks kept: `int()` truncates the slice ends (towards zero) while the area is
/// the unrounded w·h, and the slices follow Python's rules (negative ends wrap, ends past the
/// image are clamped). An empty box scores NaN (0/0), which never wins.
pub fn box_score(up: &[f32], height: usize, width: usize, det: &[f64; 4]) -> f64 {
    let [x, y, w, h] = *det;
    let rows = py_slice(y as i64, (y + h) as i64, height);
    let cols = py_slice(x as i64, (x + w) as i64, width);
    let mut sum = 0f64;
    for r in rows {
        sum += up[r * width + cols.start..r * width + cols.end].iter().map(|&v| v as f64).sum::<f64>();
    }
    sum / (w * h).powf(0.5)
}

/// The proposal with the highest score, as `grounding_eval` picks it: `max_score` starts at 0
/// and only a strictly greater score replaces the pick, so ties keep the first and a map whose
/// every score is ≤ 0 picks nothing (`None`; see [`Chooser`]).
pub fn choose_box(up: &[f32], height: usize, width: usize, dets: &[[f64; 4]]) -> Option<usize> {
    let mut best = 0f64;
    let mut pick = None;
    for (i, d) in dets.iter().enumerate() {
        let s = box_score(up, height, width, d);
        if s > best {
            best = s;
            pick = Some(i);
        }
    }
    pick
}

/// `computeIoU(box1, box2)` with [x, y, w, h] boxes and the inclusive-pixel rule
/// (`x2 = x + w − 1`, intersection `(x2 − x1 + 1)(y2 − y1 + 1)`). Reference quirk kept: the
/// intersection counts only when `x1 < x2` and `y1 < y2` strictly, so boxes that share a
/// single pixel row or column have none.
pub fn compute_iou(b1: &[f64; 4], b2: &[f64; 4]) -> f64 {
    let ix1 = b1[0].max(b2[0]);
    let iy1 = b1[1].max(b2[1]);
    let ix2 = (b1[0] + b1[2] - 1.0).min(b2[0] + b2[2] - 1.0);
    let iy2 = (b1[1] + b1[3] - 1.0).min(b2[1] + b2[3] - 1.0);
    let inter = if ix1 < ix2 && iy1 < iy2 { (ix2 - ix1 + 1.0) * (iy2 - iy1 + 1.0) } else { 0.0 };
    let union = b1[2] * b1[3] + b2[2] * b2[3] - inter;
    inter / union
}

/// Box picking across expressions in loader order. Reference quirk kept: `pred_box` is a
/// variable of the whole loop, so when no proposal of an expression scores above 0 the
/// previous expression's box is used again (the very first such expression raises NameError in
/// the reference; here it gets no box and counts as wrong).
#[derive(Default)]
pub struct Chooser {
    last: Option<[f64; 4]>,
}

impl Chooser {
    pub fn next(&mut self, picked: Option<[f64; 4]>) -> Option<[f64; 4]> {
        if picked.is_some() {
            self.last = picked;
        }
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_hand_cases() {
        // Identical boxes.
        assert_eq!(compute_iou(&[0.0, 0.0, 10.0, 10.0], &[0.0, 0.0, 10.0, 10.0]), 1.0);
        // Inclusive pixels: [0, 10)×[0, 10) and [5, 15)×[0, 10): x 5..=9 → 5 × 10 = 50;
        // union 100 + 100 − 50 = 150.
        assert_eq!(compute_iou(&[0.0, 0.0, 10.0, 10.0], &[5.0, 0.0, 10.0, 10.0]), 50.0 / 150.0);
        // IoU exactly 0.5: a 10×10 box and a 10×5 box inside it → 50 / (100 + 50 − 50).
        let half = compute_iou(&[0.0, 0.0, 10.0, 10.0], &[0.0, 0.0, 10.0, 5.0]);
        assert_eq!(half, 0.5);
        assert!(half >= 0.5, "counted correct at exactly 0.5");
        // One shared column (x2 == x1): strict `<` gives no intersection.
        assert_eq!(compute_iou(&[0.0, 0.0, 10.0, 10.0], &[9.0, 0.0, 10.0, 10.0]), 0.0);
        // Fractional boxes: inter x 2.5..=(1.5+4−1)=4.5 → 3; y 0..=9 → 10.
        let f = compute_iou(&[1.5, 0.0, 4.0, 10.0], &[2.5, 0.0, 4.0, 10.0]);
        assert!((f - 30.0 / (40.0 + 40.0 - 30.0)).abs() < 1e-12, "{f}");
        // Disjoint.
        assert_eq!(compute_iou(&[0.0, 0.0, 2.0, 2.0], &[5.0, 5.0, 2.0, 2.0]), 0.0);
    }

    #[test]
    fn python_slices() {
        assert_eq!(py_slice(2, 5, 10), 2..5);
        assert_eq!(py_slice(8, 15, 10), 8..10, "past the end: clamped");
        assert_eq!(py_slice(-2, 10, 10), 8..10, "negative start wraps");
        assert_eq!(py_slice(-20, 3, 10), 0..3);
        assert_eq!(py_slice(5, 3, 10), 5..5, "empty");
        assert_eq!(py_slice(12, 20, 10), 10..10);
    }

    /// A 4 × 5 map with value = 1 + column + 10·row.
    fn map() -> (Vec<f32>, usize, usize) {
        let (h, w) = (4, 5);
        ((0..h * w).map(|i| (1 + i % w + 10 * (i / w)) as f32).collect(), h, w)
    }

    #[test]
    fn box_scores_truncate_ends_and_use_the_unrounded_area() {
        let (m, h, w) = map();
        // x 0.9..2.9 → int 0..2 (columns 0, 1); y 1.5..2.6 → 1..2 (row 1): 11 + 12 = 23.
        let s = box_score(&m, h, w, &[0.9, 1.5, 2.0, 1.1]);
        assert!((s - 23.0 / (2.2f64).sqrt()).abs() < 1e-12, "{s}");
        // A box leaving the image: columns 3..7 → 3..5, rows 2..9 → 2..4.
        let s = box_score(&m, h, w, &[3.0, 2.0, 4.0, 7.0]);
        let sum = (24 + 25 + 34 + 35) as f64;
        assert!((s - sum / 28f64.sqrt()).abs() < 1e-12, "{s}");
        // Negative start: int(-1.5) = -1 wraps to the last row/column, so the slice is empty.
        assert!(box_score(&m, h, w, &[-1.5, 0.0, 2.0, 2.0]).abs() < 1e-12);
        // A box within one pixel column (int(1.2) = int(1.7) = 1) selects nothing: 0 / √0.5.
        assert_eq!(box_score(&m, h, w, &[1.2, 1.0, 0.5, 1.0]), 0.0);
        // A zero-area box: 0 / 0.
        assert!(box_score(&m, h, w, &[1.2, 1.0, 0.0, 1.0]).is_nan());
    }

    #[test]
    fn the_first_maximum_wins_and_non_positive_maps_keep_the_previous_box() {
        let (m, h, w) = map();
        let a = [0.0, 0.0, 2.0, 2.0];
        let dets = [a, [3.0, 3.0, 1.0, 1.0], a, [3.0, 3.0, 1.0, 1.0]];
        // Cell (3, 3) = 34 scores 34; the 2×2 corner (1+2+11+12)/2 = 13.
        assert_eq!(choose_box(&m, h, w, &dets), Some(1), "tie between 1 and 3: the first");
        let zero = vec![0f32; h * w];
        assert_eq!(choose_box(&zero, h, w, &dets), None);
        let neg: Vec<f32> = m.iter().map(|v| -v).collect();
        assert_eq!(choose_box(&neg, h, w, &dets), None);
        let mut c = Chooser::default();
        assert_eq!(c.next(None), None);
        assert_eq!(c.next(Some(a)), Some(a));
        assert_eq!(c.next(None), Some(a), "stale box reused");
    }
}
