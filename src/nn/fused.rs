//! Fused CPU kernels for the element-wise ops, with their backward passes.
//!
//! candle's own fused softmax and LayerNorm have no backward (they silently stop gradients);
//! these do, as `CustomOp`s whose backward is itself one fused, multi-threaded pass (softmax,
//! LayerNorm, GELU, dropout) instead of a chain of whole-tensor ops each allocating its result.
//! Softmax, log-softmax and LayerNorm also have CUDA kernels (feature `cuda`, `nn::cuda`), whose
//! backward passes are tensor ops on the device. Elsewhere the callers fall back to the composed
//! versions in `nn`.

use super::profile::{self, Kind};
use super::simd::{self, vectorized};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The f32 data of a CPU storage, whole (a layout then says where each element is).
pub(super) fn f32s<'a>(s: &'a CpuStorage, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v.as_slice()),
        _ => candle_core::bail!("{what}: only f32 is supported on this path"),
    }
}

/// The elements of a contiguous layout of a CPU storage, in order.
pub(super) fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = f32s(s, what)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: the input must be contiguous"),
    }
}

/// Softmax over the last dimension.
pub struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "albef-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::time(Kind::Softmax, || {
            let src = contiguous(s, l, "softmax")?;
            let n = l.shape().dims().last().copied().unwrap_or(1).max(1);
            let mut dst = super::gemm::output(src.len());
            dst.par_chunks_mut(n).zip(src.par_chunks(n)).for_each(|(d, x)| softmax_row(x, None, d));
            Ok((CpuStorage::F32(dst), l.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::softmax(s, l, false)
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(softmax_backward(res, grad)?))
    }
}

/// Log-softmax over the last dimension (used on CUDA; the CPU keeps the composed form, whose
/// numbers the fixture tests pin, and this `cpu_fwd` serves to test the op).
pub struct LogSoftmax;

impl CustomOp1 for LogSoftmax {
    fn name(&self) -> &'static str {
        "albef-log-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous(s, l, "log-softmax")?;
        let n = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut dst = super::gemm::output(src.len());
        dst.par_chunks_mut(n).zip(src.par_chunks(n)).for_each(|(d, x)| {
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = x.iter().map(|&v| (v - max).exp()).sum::<f32>().ln();
            for (o, &v) in d.iter_mut().zip(x) {
                *o = v - max - lse;
            }
        });
        Ok((CpuStorage::F32(dst), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::softmax(s, l, true)
    }

    /// dx = g − exp(y) · Σ g.
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let sum = grad.sum_keepdim(candle_core::D::Minus1)?;
        Ok(Some(grad.sub(&res.exp()?.broadcast_mul(&sum)?)?))
    }
}

fn softmax_row(x: &[f32], mask: Option<&[f32]>, d: &mut [f32]) {
    d.copy_from_slice(x);
    softmax_in_place(d, mask);
}

/// dx = y ⊙ (g − Σ g⊙y) for softmax output y and its gradient g (last dimension): one pass on
/// the CPU, tensor ops elsewhere.
pub fn softmax_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    if !cpu_f32(y) {
        let dot = (g * y)?.sum_keepdim(candle_core::D::Minus1)?;
        return y.mul(&g.broadcast_sub(&dot)?);
    }
    y.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBackward)
}

vectorized! {
    /// One row of softmax(d + mask) in place, eight lanes at a time.
    pub fn softmax_in_place(d: &mut [f32], mask: Option<&[f32]>) {
        if let Some(m) = mask {
            d.iter_mut().zip(m).for_each(|(o, &mv)| *o += mv);
        }
        let mut lanes = [f32::NEG_INFINITY; 8];
        let mut chunks = d.chunks_exact(8);
        for c in &mut chunks {
            for j in 0..8 {
                lanes[j] = if c[j] > lanes[j] { c[j] } else { lanes[j] };
            }
        }
        let max = chunks.remainder().iter().chain(&lanes).copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sums = [0f32; 8];
        let mut chunks = d.chunks_exact_mut(8);
        for c in &mut chunks {
            for j in 0..8 {
                c[j] = simd::exp(c[j] - max);
                sums[j] += c[j];
            }
        }
        let mut sum = 0f32;
        for o in chunks.into_remainder() {
            *o = simd::exp(*o - max);
            sum += *o;
        }
        let inv = 1.0 / (sum + sums.iter().sum::<f32>());
        d.iter_mut().for_each(|o| *o *= inv);
    }
}

/// dx = y ⊙ (g − Σ g⊙y), row by row, for softmax output y and its gradient g.
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "albef-softmax-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::time(Kind::Softmax, || {
            let (y, g) = (contiguous(s1, l1, "softmax backward")?, contiguous(s2, l2, "softmax backward")?);
            let n = l1.dims().last().copied().unwrap_or(1).max(1);
            let mut dst = super::gemm::output(y.len());
            dst.par_chunks_mut(n).zip(y.par_chunks(n).zip(g.par_chunks(n))).for_each(|(d, (y, g))| {
                d.copy_from_slice(g);
                softmax_backward_in_place(y, d);
            });
            Ok((CpuStorage::F32(dst), l1.shape().clone()))
        })
    }
}

/// One row of the softmax backward in place: g ← y ⊙ (g − Σ g⊙y), for softmax output y.
pub(super) fn softmax_backward_in_place(y: &[f32], g: &mut [f32]) {
    let dot: f32 = y.iter().zip(g.iter()).map(|(a, b)| a * b).sum();
    for (o, &yi) in g.iter_mut().zip(y) {
        *o = yi * (*o - dot);
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
        profile::time(Kind::LayerNorm, || {
            let x = contiguous(s1, l1, "layer norm")?;
            let w = contiguous(s2, l2, "layer norm")?;
            let b = contiguous(s3, l3, "layer norm")?;
            let n = w.len();
            let eps = self.eps;
            let mut dst = super::gemm::output(x.len());
            dst.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(d, row)| {
                let (mean, inv) = row_stats(row, eps);
                for (((o, &v), &wi), &bi) in d.iter_mut().zip(row).zip(w).zip(b) {
                    *o = ((v as f64 - mean) * inv) as f32 * wi + bi;
                }
            });
            Ok((CpuStorage::F32(dst), l1.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::layer_norm(s1, l1, s2, l2, s3, l3, self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !cpu_f32(x) {
            return self.bwd_composed(x, w, grad);
        }
        let n = w.elem_count();
        let rows = x.elem_count() / n.max(1);
        let packed = x.contiguous()?.apply_op3_no_bwd(
            &w.contiguous()?,
            &grad.contiguous()?,
            &LayerNormBackward { eps: self.eps },
        )?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        Ok((Some(dx), Some(packed.get(rows)?), Some(packed.get(rows + 1)?)))
    }
}

impl LayerNormOp {
    /// The backward as tensor ops on the input's device (see [`LayerNormBackward`]).
    fn bwd_composed(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use candle_core::D;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let inv_std = (centred.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        let x_hat = centred.broadcast_mul(&inv_std)?;
        let gw = grad.broadcast_mul(w)?;
        let dx = gw
            .broadcast_sub(&gw.mean_keepdim(D::Minus1)?)?
            .sub(&x_hat.broadcast_mul(&(&gw * &x_hat)?.mean_keepdim(D::Minus1)?)?)?
            .broadcast_mul(&inv_std)?;
        let n = w.elem_count();
        let rows = grad.elem_count() / n.max(1);
        let dw = (grad * &x_hat)?.reshape((rows, n))?.sum(0)?;
        let db = grad.reshape((rows, n))?.sum(0)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Mean and 1/σ of a row: two passes, as PyTorch (the mean, then the biased variance of the
/// centred values), in f64.
fn row_stats(row: &[f32], eps: f64) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// LayerNorm's backward for (x, w, g) in one pass over the rows, packed as (rows + 2, n):
/// dx, then dw, then db. With x̂ = (x − μ)/σ and gw = g ⊙ w:
/// dx = (gw − mean(gw) − x̂ ⊙ mean(gw ⊙ x̂)) / σ, dw = Σ_rows g ⊙ x̂, db = Σ_rows g.
struct LayerNormBackward {
    eps: f64,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "albef-layer-norm-backward"
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
        profile::time(Kind::LayerNorm, || {
            let x = contiguous(s1, l1, "layer norm backward")?;
            let w = contiguous(s2, l2, "layer norm backward")?;
            let g = contiguous(s3, l3, "layer norm backward")?;
            let n = w.len().max(1);
            let rows = x.len() / n;
            let mut out = vec![0f32; (rows + 2) * n];
            let (dx, sums) = out.split_at_mut(rows * n);
            // Rows in blocks, each block with its own partial dw, db (summed in a fixed order).
            let block = rows.div_ceil(4 * rayon::current_num_threads()).max(1);
            let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
                .par_chunks_mut(block * n)
                .zip(x.par_chunks(block * n).zip(g.par_chunks(block * n)))
                .map(|(dxb, (xb, gb))| {
                    let (mut dw, mut db) = (vec![0f32; n], vec![0f32; n]);
                    let mut xhat = vec![0f32; n];
                    for ((d, row), gr) in dxb.chunks_mut(n).zip(xb.chunks(n)).zip(gb.chunks(n)) {
                        let (mean, inv) = row_stats(row, self.eps);
                        let (mut mean_gw, mut mean_gwx) = (0f32, 0f32);
                        for i in 0..n {
                            xhat[i] = ((row[i] as f64 - mean) * inv) as f32;
                            let gw = gr[i] * w[i];
                            mean_gw += gw;
                            mean_gwx += gw * xhat[i];
                            dw[i] += gr[i] * xhat[i];
                            db[i] += gr[i];
                        }
                        let (mean_gw, mean_gwx) = (mean_gw / n as f32, mean_gwx / n as f32);
                        for i in 0..n {
                            d[i] = (gr[i] * w[i] - mean_gw - xhat[i] * mean_gwx) * inv as f32;
                        }
                    }
                    (dw, db)
                })
                .collect();
            let (dw, db) = sums.split_at_mut(n);
            for (pw, pb) in &partial {
                dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
                db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
            }
            Ok((CpuStorage::F32(out), Shape::from((rows + 2, n))))
        })
    }
}

fn elementwise(dst: &mut [f32], f: impl Fn(&mut [f32], usize) + Sync) {
    const CHUNK: usize = 1 << 14;
    dst.par_chunks_mut(CHUNK).enumerate().for_each(|(i, d)| f(d, i * CHUNK));
}

/// The reference's exact GELU, x·Φ(x) = x/2·(1 + erf(x/√2)), one vectorised pass.
pub struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "albef-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::time(Kind::Gelu, || {
            let x = contiguous(s, l, "gelu")?;
            let mut dst = super::gemm::output(x.len());
            elementwise(&mut dst, |d, at| gelu_chunk(&x[at..at + d.len()], d));
            Ok((CpuStorage::F32(dst), l.shape().clone()))
        })
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)?))
    }
}

vectorized! {
    fn gelu_chunk(x: &[f32], d: &mut [f32]) {
        for (o, &v) in d.iter_mut().zip(x) {
            *o = 0.5 * v * (1.0 + simd::erf(v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

vectorized! {
    fn gelu_backward_chunk(x: &[f32], g: &[f32], d: &mut [f32]) {
        let inv_sqrt_2pi = 0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2;
        for ((o, &v), &gv) in d.iter_mut().zip(x).zip(g) {
            let cdf = 0.5 * (1.0 + simd::erf(v * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = inv_sqrt_2pi * simd::exp(-0.5 * v * v);
            *o = gv * (cdf + v * pdf);
        }
    }
}

/// g ⊙ GELU'(x) = g ⊙ (Φ(x) + x·φ(x)).
struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "albef-gelu-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::time(Kind::Gelu, || {
            let (x, g) = (contiguous(s1, l1, "gelu backward")?, contiguous(s2, l2, "gelu backward")?);
            let mut dst = super::gemm::output(x.len());
            elementwise(&mut dst, |d, at| gelu_backward_chunk(&x[at..at + d.len()], &g[at..at + d.len()], d));
            Ok((CpuStorage::F32(dst), l1.shape().clone()))
        })
    }
}

/// Inverted dropout whose mask is a hash of (seed, element index): drawn in parallel, and the
/// backward recomputes it instead of keeping it.
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    #[inline(always)]
    fn keep(&self, i: usize) -> bool {
        // SplitMix64's finaliser over the counter: independent uniform bits per element.
        let mut z = self.seed.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32) * (1.0 / (1u64 << 24) as f32) >= self.p
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "albef-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::time(Kind::Dropout, || {
            let x = contiguous(s, l, "dropout")?;
            let scale = 1.0 / (1.0 - self.p);
            let mut dst = super::gemm::output(x.len());
            elementwise(&mut dst, |d, at| {
                for (j, (o, &v)) in d.iter_mut().zip(&x[at..]).enumerate() {
                    *o = if self.keep(at + j) { v * scale } else { 0.0 };
                }
            });
            Ok((CpuStorage::F32(dst), l.shape().clone()))
        })
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Dropout { p: self.p, seed: self.seed })?))
    }
}

/// True when the CPU kernels apply (f32 on the CPU).
pub fn cpu_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// True when the fused softmax and LayerNorm apply: f32 on the CPU, and on CUDA devices in a
/// CUDA build.
pub fn usable(x: &Tensor) -> bool {
    cpu_f32(x) || (x.dtype() == candle_core::DType::F32 && on_cuda(x))
}

/// True when the fused log-softmax applies: f32 on CUDA devices in a CUDA build.
pub fn usable_log_softmax(x: &Tensor) -> bool {
    x.dtype() == candle_core::DType::F32 && on_cuda(x)
}

fn on_cuda(x: &Tensor) -> bool {
    cfg!(feature = "cuda") && x.device().is_cuda()
}
