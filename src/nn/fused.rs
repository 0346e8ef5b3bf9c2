//! Fused CPU kernels for the two hottest element-wise ops, with their backward passes.
//!
//! candle's own fused softmax and LayerNorm have no backward (they silently stop gradients);
//! these do, as `CustomOp`s whose `bwd` is written with differentiable tensor ops. On other
//! devices the callers fall back to the composed versions in `nn`.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("fused {what}: only f32 is supported"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused {what}: input must be contiguous"),
    }
}

/// Softmax over the last dimension.
pub struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "albef-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous(s, l, "softmax")?;
        let n = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(n).zip(src.par_chunks(n)).for_each(|(d, x)| {
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, &v) in d.iter_mut().zip(x) {
                *o = (v - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            d.iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(dst), l.shape().clone()))
    }

    /// dx = y ⊙ (g − Σ g⊙y).
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dot = (grad * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some(res.mul(&grad.broadcast_sub(&dot)?)?))
    }
}

/// LayerNorm over the last dimension: (x, weight, bias).
pub struct LayerNormOp {
    pub eps: f64,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "albef-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, "layer norm")?;
        let w = contiguous(s2, l2, "layer norm")?;
        let b = contiguous(s3, l3, "layer norm")?;
        let n = w.len();
        let eps = self.eps;
        let mut dst = vec![0f32; x.len()];
        dst.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(d, row)| {
            // Two passes, as PyTorch: mean, then the biased variance of the centred values.
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            let inv = 1.0 / (var + eps).sqrt();
            for (((o, &v), &wi), &bi) in d.iter_mut().zip(row).zip(w).zip(b) {
                *o = ((v as f64 - mean) * inv) as f32 * wi + bi;
            }
        });
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }

    /// With x̂ = (x − μ)/σ and gw = g ⊙ w: dx = (gw − mean(gw) − x̂ ⊙ mean(gw ⊙ x̂)) / σ,
    /// dw = Σ_rows g ⊙ x̂, db = Σ_rows g.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let inv_std = (centred.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        let x_hat = centred.broadcast_mul(&inv_std)?;
        let gw = grad.broadcast_mul(w)?;
        let dx = gw
            .broadcast_sub(&gw.mean_keepdim(D::Minus1)?)?
            .sub(&x_hat.broadcast_mul(&(&gw * &x_hat)?.mean_keepdim(D::Minus1)?)?)?
            .broadcast_mul(&inv_std)?;
        let rows = grad.elem_count() / w.elem_count();
        let n = w.elem_count();
        let dw = (grad * &x_hat)?.reshape((rows, n))?.sum(0)?;
        let db = grad.reshape((rows, n))?.sum(0)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// True when the fused kernels apply (f32 on the CPU).
pub fn usable(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}
