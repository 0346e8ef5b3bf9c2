//! Matrix products on the CPU straight through `gemm`, with their backward passes.
//!
//! candle's own CPU matmul zero-fills its output before `gemm` overwrites it, runs a batch of
//! small products one after the other (each split across the threads), and needs attention's
//! heads split into contiguous copies first. These ops read any strides (the heads of a packed
//! (B, L, H·dh) tensor, a transposed weight), write their output once, add a linear layer's
//! bias in the same pass, and share a batch of products out whole between the threads.

use super::fused::{contiguous, f32s};
use super::profile::{self, Kind};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A matrix inside a buffer: element (i, j) is at `offset + i·rs + j·cs`.
#[derive(Clone, Copy, Debug)]
struct Mat {
    offset: usize,
    rs: isize,
    cs: isize,
}

/// One product `c = scale·a·b (+ c)` of a batch.
#[derive(Clone, Copy, Debug)]
struct Product {
    a: Mat,
    b: Mat,
    c: Mat,
}

/// A buffer of uninitialised f32 for an output every element of which is written.
pub(super) fn output(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: f32 has no invalid bit patterns and each caller writes every element before
    // the buffer is read (gemm with `read_dst = false`, or a fill).
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(len)
    };
    v
}

struct SendPtr(*mut f32);
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// Called with a product's index and its (m·n) output block, right after the product, while the
/// block is still in cache (attention's softmax).
type Then<'a> = &'a (dyn Fn(usize, &mut [f32]) + Sync);

/// One product `c = scale·a·b (+ c)` (m×k by k×n) at the matrices `p` names in the buffers
/// `a`, `b` and `c`.
///
/// # Safety
/// The three matrices lie inside their buffers, and no other thread touches c's elements
/// meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    p: &Product,
    scale: f32,
    accumulate: bool,
    par: gemm::Parallelism,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.add(p.c.offset),
            p.c.cs,
            p.c.rs,
            accumulate,
            a.add(p.a.offset),
            p.a.cs,
            p.a.rs,
            b.add(p.b.offset),
            p.b.cs,
            p.b.rs,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        )
    }
}

/// Runs every product of `batch` (m×k by k×n): in parallel over the products when there are
/// enough of them to keep every thread busy (attention's batch × heads), otherwise one after
/// the other with each product split across the threads. `accumulate` adds to what `c` holds.
/// `then` needs each product's output to be one contiguous block.
#[allow(clippy::too_many_arguments)]
fn run(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    batch: &[Product],
    scale: f32,
    accumulate: bool,
    then: Option<Then>,
) {
    let threads = rayon::current_num_threads();
    let dst = SendPtr(c.as_mut_ptr());
    let one = |i: usize, p: &Product, par: gemm::Parallelism| {
        let dst = &dst;
        // SAFETY: every product's matrices lie inside their buffers (the callers derive them from
        // candle layouts), and the products of one batch write disjoint elements of `c`.
        unsafe {
            product((m, n, k), a.as_ptr(), b.as_ptr(), dst.0, p, scale, accumulate, par);
            if let Some(then) = then {
                debug_assert!(p.c.rs == n as isize && p.c.cs == 1);
                // SAFETY: this product's block, written by it alone.
                then(i, std::slice::from_raw_parts_mut(dst.0.add(p.c.offset), m * n));
            }
        }
    };
    if m == 0 || n == 0 {
        return;
    }
    if batch.len() >= 2 * threads {
        batch.par_iter().enumerate().for_each(|(i, p)| one(i, p, gemm::Parallelism::None));
    } else {
        let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        for (i, p) in batch.iter().enumerate() {
            one(i, p, par);
        }
    }
}

/// Offsets of every batch element of `l` (all dimensions but the last two), in row-major order.
fn batch_offsets(l: &Layout) -> Vec<usize> {
    let dims = l.dims();
    let strides = l.stride();
    let r = dims.len();
    let mut offs = vec![l.start_offset()];
    for d in 0..r.saturating_sub(2) {
        offs = offs.iter().flat_map(|&o| (0..dims[d]).map(move |i| o + i * strides[d])).collect();
    }
    offs
}

fn last2(l: &Layout) -> (usize, usize, isize, isize) {
    let (d, s) = (l.dims(), l.stride());
    let r = d.len();
    (d[r - 2], d[r - 1], s[r - 2] as isize, s[r - 1] as isize)
}

/// `a·b` for (…, m, k) and (…, k, n) with equal leading dimensions, or a 2-D `b` shared by every
/// batch element of `a`.
pub struct MatMul {
    pub scale: f32,
}

/// `a·bᵀ` for (…, m, k) and (…, n, k), as [`MatMul`] of `a` and `b.t()`, but with the gradient
/// of `b` made in `b`'s own (…, n, k) layout: through a transpose it would come back transposed,
/// and candle adds a transposed gradient element by element.
pub struct MatMulT {
    pub scale: f32,
}

fn matmul_fwd(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    scale: f32,
    b_transposed: bool,
) -> Result<(CpuStorage, Shape)> {
    profile::time(Kind::Matmul, || {
        let (a, b) = (f32s(s1, "matmul")?, f32s(s2, "matmul")?);
        if l1.dims().len() < 2 || l2.dims().len() < 2 {
            candle_core::bail!("matmul needs two matrices, got {:?} and {:?}", l1.dims(), l2.dims())
        }
        let (m, k, a_rs, a_cs) = last2(l1);
        let (k2, n, b_rs, b_cs) = match last2(l2) {
            (r, c, rs, cs) if b_transposed => (c, r, cs, rs),
            rc => rc,
        };
        let lead = &l1.dims()[..l1.dims().len() - 2];
        let shared_b = l2.dims().len() == 2;
        if k != k2 || !(shared_b || lead == &l2.dims()[..l2.dims().len() - 2]) {
            candle_core::bail!("matmul shapes {:?} and {:?} do not match", l1.dims(), l2.dims())
        }
        let (a_offs, b_offs) = (batch_offsets(l1), batch_offsets(l2));
        let batch: Vec<Product> = a_offs
            .iter()
            .enumerate()
            .map(|(i, &ao)| Product {
                a: Mat { offset: ao, rs: a_rs, cs: a_cs },
                b: Mat { offset: if shared_b { b_offs[0] } else { b_offs[i] }, rs: b_rs, cs: b_cs },
                c: Mat { offset: i * m * n, rs: n as isize, cs: 1 },
            })
            .collect();
        let mut c = output(a_offs.len() * m * n);
        run((m, n, k), a, b, &mut c, &batch, scale, false, None);
        let mut dims = lead.to_vec();
        dims.extend([m, n]);
        Ok((CpuStorage::F32(c), Shape::from(dims)))
    })
}

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "albef-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        matmul_fwd((s1, l1), (s2, l2), self.scale, false)
    }

    /// Only for the tracked operands: candle stores whatever gradient a backward returns, and
    /// one for an untracked operand (ITC's 65k-column queue) would be made, zero-filled and
    /// added for nothing.
    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = || MatMul { scale: self.scale };
        let da = if a.track_op() { Some(grad.apply_op2_no_bwd(&b.t()?, &op())?) } else { None };
        let db = if !b.track_op() {
            None
        } else if b.rank() == 2 && a.rank() > 2 {
            let k = a.dim(candle_core::D::Minus1)?;
            let n = grad.dim(candle_core::D::Minus1)?;
            let a2 = a.reshape(((), k))?;
            Some(a2.t()?.apply_op2_no_bwd(&grad.reshape(((), n))?, &op())?)
        } else {
            Some(a.t()?.apply_op2_no_bwd(grad, &op())?)
        };
        Ok((da, db))
    }
}

impl CustomOp2 for MatMulT {
    fn name(&self) -> &'static str {
        "albef-matmul-t"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        matmul_fwd((s1, l1), (s2, l2), self.scale, true)
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if b.rank() != a.rank() {
            candle_core::bail!("matmul-t: the gradient of a shared b is not implemented")
        }
        let op = MatMul { scale: self.scale };
        // c = a·bᵀ: da = g·b, db = gᵀ·a (in b's layout).
        let da = grad.apply_op2_no_bwd(b, &op)?;
        let db = grad.t()?.apply_op2_no_bwd(a, &op)?;
        Ok((Some(da), Some(db)))
    }
}

/// A linear layer's `x·wᵀ + bias` for x (…, in), w (out, in), bias (out): the bias is written
/// first and the product added onto it. The leading dimensions of x must fold into rows of one
/// stride ([`rows_of`]): then no reshape, whose backward would cost a pass, is needed.
pub struct Linear;

/// (rows, row stride) of x (…, k) seen as one matrix, when its leading dimensions fold into one:
/// those of more than one element nest (each one's stride is the next one's times its size).
/// Dimensions of one element have no say: a (B, 1, k) view of the first row of each of B
/// sequences steps from row to row by its first stride.
pub fn rows_of(l: &Layout) -> Option<(usize, isize)> {
    let (dims, strides) = (l.dims(), l.stride());
    let r = dims.len();
    if r < 2 {
        return None;
    }
    let lead: Vec<(usize, usize)> =
        dims[..r - 1].iter().zip(&strides[..r - 1]).filter(|(&n, _)| n > 1).map(|(&n, &s)| (n, s)).collect();
    if lead.windows(2).any(|w| w[0].1 != w[1].1 * w[1].0) {
        return None;
    }
    // One row: its stride is never stepped.
    let rs = lead.last().map_or(dims[r - 1], |&(_, s)| s);
    Some((dims[..r - 1].iter().product(), rs as isize))
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "albef-linear"
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
        profile::time(Kind::Matmul, || {
            let (x, w, bias) = (f32s(s1, "linear")?, f32s(s2, "linear")?, contiguous(s3, l3, "linear bias")?);
            let (_, k, _, x_cs) = last2(l1);
            let (n, k2, w_rs, w_cs) = last2(l2);
            let Some((rows, x_rs)) = rows_of(l1) else {
                candle_core::bail!("linear: input {:?} with strides {:?} is not one matrix", l1.dims(), l1.stride())
            };
            if l2.dims().len() != 2 || k != k2 || l3.dims() != [n] {
                candle_core::bail!("linear shapes {:?}, {:?}, {:?} do not match", l1.dims(), l2.dims(), l3.dims())
            }
            let mut c = output(rows * n);
            c.par_chunks_mut(n.max(1)).for_each(|row| row.copy_from_slice(bias));
            let product = Product {
                a: Mat { offset: l1.start_offset(), rs: x_rs, cs: x_cs },
                // wᵀ: element (i, j) of the (in, out) matrix is w[j, i].
                b: Mat { offset: l2.start_offset(), rs: w_cs, cs: w_rs },
                c: Mat { offset: 0, rs: n as isize, cs: 1 },
            };
            run((rows, n, k), x, w, &mut c, &[product], 1.0, true, None);
            let mut dims = l1.dims().to_vec();
            *dims.last_mut().expect("rank ≥ 2") = n;
            Ok((CpuStorage::F32(c), Shape::from(dims)))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = MatMul { scale: 1.0 };
        // The image encoder's patch embedding reads the (untracked) pixels.
        let dx = if x.track_op() { Some(grad.apply_op2_no_bwd(w, &op)?) } else { None };
        let (k, n) = (w.dim(1)?, w.dim(0)?);
        let (grad2, x2) = (grad.reshape(((), n))?, x.reshape(((), k))?);
        let dw = grad2.t()?.apply_op2_no_bwd(&x2, &op)?;
        let db = grad2.contiguous()?.apply_op1_no_bwd(&ColumnSums)?;
        Ok((dx, Some(dw), Some(db)))
    }
}

/// Per-head matrices of a packed (B, L, H·dh) tensor: batch `bi`, head `h`, as an (L, dh)
/// matrix (`transposed`: as its (dh, L) transpose).
fn head(l: &Layout, heads: usize, bi: usize, h: usize, transposed: bool) -> Mat {
    columns(l, h * (l.dims()[2] / heads), bi, transposed)
}

/// Batch `bi` of a (B, L, C) tensor from column `col` on, as an (L, ·) matrix (`transposed`:
/// as its transpose).
fn columns(l: &Layout, col: usize, bi: usize, transposed: bool) -> Mat {
    let s = l.stride();
    let offset = l.start_offset() + bi * s[0] + col * s[2];
    let (rs, cs) = (s[1] as isize, s[2] as isize);
    if transposed {
        Mat { offset, rs: cs, cs: rs }
    } else {
        Mat { offset, rs, cs }
    }
}

fn check_packed(what: &str, l: &Layout, heads: usize) -> Result<(usize, usize, usize)> {
    match *l.dims() {
        [b, len, d] if heads > 0 && d % heads == 0 => Ok((b, len, d)),
        _ => candle_core::bail!("{what}: expected (B, L, H·dh) with {heads} heads, got {:?}", l.dims()),
    }
}

/// `scale · a_h · b_hᵀ` for every head of packed a (B, M, H·dh) and b (B, N, H·dh), as
/// (B, H, M, N); `then` runs on each head's block right after its product.
fn head_scores(
    heads: usize,
    scale: f32,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    then: Option<Then>,
) -> Result<(CpuStorage, Shape)> {
    let (a, b) = (f32s(s1, "attention scores")?, f32s(s2, "attention scores")?);
    let (bsz, m, d) = check_packed("attention scores", l1, heads)?;
    let (bsz2, n, d2) = check_packed("attention scores", l2, heads)?;
    if bsz != bsz2 || d != d2 {
        candle_core::bail!("attention scores: {:?} against {:?}", l1.dims(), l2.dims())
    }
    let h = heads;
    let batch: Vec<Product> = (0..bsz * h)
        .map(|t| Product {
            a: head(l1, h, t / h, t % h, false),
            b: head(l2, h, t / h, t % h, true),
            c: Mat { offset: t * m * n, rs: n as isize, cs: 1 },
        })
        .collect();
    let mut c = output(bsz * h * m * n);
    run((m, n, d / h), a, b, &mut c, &batch, scale, false, then);
    Ok((CpuStorage::F32(c), Shape::from((bsz, h, m, n))))
}

/// Attention scores of every head without splitting the heads out: for packed a (B, M, H·dh)
/// and b (B, N, H·dh), `scale · a_h · b_hᵀ` as (B, H, M, N).
pub struct HeadScores {
    pub heads: usize,
    pub scale: f32,
}

impl CustomOp2 for HeadScores {
    fn name(&self) -> &'static str {
        "albef-head-scores"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::time(Kind::Matmul, || head_scores(self.heads, self.scale, (s1, l1), (s2, l2), None))
    }

    /// With g (B, H, M, N): da_h = scale·g_h·b_h, db_h = scale·g_hᵀ·a_h, both written packed.
    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = HeadContext { heads: self.heads, scale: self.scale };
        let da = grad.apply_op2_no_bwd(b, &op)?;
        let db = grad.transpose(2, 3)?.apply_op2_no_bwd(a, &op)?;
        Ok((Some(da), Some(db)))
    }
}

/// Attention context with the heads merged as it is written: for p (B, H, M, N) (any strides)
/// and packed x (B, N, H·dh), `scale · p_h · x_h` laid out as (B, M, H·dh).
pub struct HeadContext {
    pub heads: usize,
    pub scale: f32,
}

impl CustomOp2 for HeadContext {
    fn name(&self) -> &'static str {
        "albef-head-context"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::time(Kind::Matmul, || {
            let (p, x) = (f32s(s1, "attention context")?, f32s(s2, "attention context")?);
            let (bsz, n, d) = check_packed("attention context", l2, self.heads)?;
            let h = self.heads;
            let m = match *l1.dims() {
                [b1, h1, m, n1] if b1 == bsz && h1 == h && n1 == n => m,
                _ => candle_core::bail!(
                    "attention context: probabilities {:?} against values {:?}",
                    l1.dims(),
                    l2.dims()
                ),
            };
            let ps = l1.stride();
            let dh = d / h;
            let batch: Vec<Product> = (0..bsz * h)
                .map(|t| {
                    let (bi, hi) = (t / h, t % h);
                    Product {
                        a: Mat {
                            offset: l1.start_offset() + bi * ps[0] + hi * ps[1],
                            rs: ps[2] as isize,
                            cs: ps[3] as isize,
                        },
                        b: head(l2, h, bi, hi, false),
                        c: Mat { offset: bi * m * d + hi * dh, rs: d as isize, cs: 1 },
                    }
                })
                .collect();
            let mut c = output(bsz * m * d);
            run((m, dh, n), p, x, &mut c, &batch, self.scale, false, None);
            Ok((CpuStorage::F32(c), Shape::from((bsz, m, d))))
        })
    }

    /// With g (B, M, H·dh): dp_h = scale·g_h·x_hᵀ, dx_h = scale·p_hᵀ·g_h.
    fn bwd(&self, p: &Tensor, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dp = grad.apply_op2_no_bwd(x, &HeadScores { heads: self.heads, scale: self.scale })?;
        let dx = p.transpose(2, 3)?.apply_op2_no_bwd(grad, &HeadContext { heads: self.heads, scale: self.scale })?;
        Ok((Some(dp), Some(dx)))
    }
}

/// Attention probabilities softmax(scale · q_h · k_hᵀ + mask) of packed q (B, M, H·dh) and
/// k (B, N, H·dh), as (B, H, M, N): each head's softmax runs on its scores as soon as they are
/// computed, while they are in cache. With a mask (B, 1, 1, N) or (B, 1, M, N) (additive) as
/// the third argument of [`CustomOp3`], without one as [`CustomOp2`].
pub struct AttentionProbs {
    pub heads: usize,
    pub scale: f32,
}

impl AttentionProbs {
    fn forward(
        &self,
        q: (&CpuStorage, &Layout),
        k: (&CpuStorage, &Layout),
        mask: Option<(&[f32], &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (bsz, m, _) = check_packed("attention", q.1, self.heads)?;
        let n = k.1.dims().get(1).copied().unwrap_or(0);
        let mask_rows = match mask.map(|(_, l)| l.dims().to_vec()).as_deref() {
            None => 0,
            Some(&[mb, 1, 1, mn]) if mb == bsz && mn == n => 1,
            Some(&[mb, 1, mm, mn]) if mb == bsz && mm == m && mn == n => m,
            Some(dims) => {
                candle_core::bail!("attention: mask {dims:?} does not fit {bsz} × {m} queries against {n} keys")
            }
        };
        let h = self.heads;
        let then = |t: usize, block: &mut [f32]| {
            let bi = t / h;
            for (i, row) in block.chunks_mut(n.max(1)).enumerate() {
                let mask_row = mask.map(|(mv, _)| {
                    let r = bi * mask_rows + if mask_rows == 1 { 0 } else { i };
                    &mv[r * n..(r + 1) * n]
                });
                super::fused::softmax_in_place(row, mask_row);
            }
        };
        profile::time(Kind::Attention, || head_scores(h, self.scale, q, k, Some(&then)))
    }

    /// From the probabilities p and their gradient g: ds = p ⊙ (g − Σ g⊙p), then
    /// dq_h = scale·ds_h·k_h and dk_h = scale·ds_hᵀ·q_h.
    fn backward(&self, q: &Tensor, k: &Tensor, probs: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let ds = super::fused::softmax_backward(probs, grad)?;
        let op = HeadContext { heads: self.heads, scale: self.scale };
        Ok((ds.apply_op2_no_bwd(k, &op)?, ds.transpose(2, 3)?.apply_op2_no_bwd(q, &op)?))
    }
}

impl CustomOp2 for AttentionProbs {
    fn name(&self) -> &'static str {
        "albef-attention-probs"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward((s1, l1), (s2, l2), None)
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dq, dk) = self.backward(q, k, res, grad)?;
        Ok((Some(dq), Some(dk)))
    }
}

impl CustomOp3 for AttentionProbs {
    fn name(&self) -> &'static str {
        "albef-attention-probs-masked"
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
        let mask = contiguous(s3, l3, "attention mask")?;
        self.forward((s1, l1), (s2, l2), Some((mask, l3)))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk) = self.backward(q, k, res, grad)?;
        Ok((Some(dq), Some(dk), None))
    }
}

/// Multi-head self-attention straight from a packed projection: for qkv (B, N, 3·H·dh) (the
/// queries, keys and values side by side, as the image encoder's one `qkv` layer writes them),
/// softmax(scale·q_h·k_hᵀ)·v_h with the heads merged, (B, N, H·dh).
///
/// One op instead of three narrows, the probabilities and the context: each (batch, head) runs
/// its scores, softmax and context while its block is in cache, and the backward writes the
/// gradient of qkv once. Through the composed ops candle's backward would zero-fill and add a
/// (B, H, N, N) probability gradient and three zero-padded (B, N, 3·H·dh) copies, per layer.
pub struct PackedSelfAttention {
    heads: usize,
    scale: f32,
    /// The probabilities (B·H blocks of N·N) the forward keeps for the backward; `None` when
    /// the input is not tracked, so no backward will come.
    kept: Option<std::sync::Mutex<Vec<f32>>>,
}

impl PackedSelfAttention {
    /// `keep`: whether the backward will be asked for (the input is tracked).
    pub fn new(heads: usize, scale: f32, keep: bool) -> Self {
        Self { heads, scale, kept: keep.then(|| std::sync::Mutex::new(Vec::new())) }
    }
}

/// (B, N, H·dh) of a packed (B, N, 3·H·dh) projection.
fn check_qkv(l: &Layout, heads: usize) -> Result<(usize, usize, usize)> {
    match *l.dims() {
        [b, n, d3] if heads > 0 && d3 % (3 * heads) == 0 => Ok((b, n, d3 / 3)),
        _ => candle_core::bail!(
            "self-attention: expected packed queries, keys and values (B, N, 3·H·dh) with {heads} heads, got {:?}",
            l.dims()
        ),
    }
}

impl candle_core::CustomOp1 for PackedSelfAttention {
    fn name(&self) -> &'static str {
        "albef-packed-self-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::time(Kind::Attention, || {
            let x = f32s(s, "self-attention")?;
            let (bsz, n, d) = check_qkv(l, self.heads)?;
            let (h, dh) = (self.heads, d / self.heads);
            let mut out = output(bsz * n * d);
            let mut kept = if self.kept.is_some() { output(bsz * h * n * n) } else { Vec::new() };
            if n > 0 {
                let dst = SendPtr(out.as_mut_ptr());
                let head = |t: usize, p: &mut [f32]| {
                    let (bi, hi) = (t / h, t % h);
                    let block = Mat { offset: 0, rs: n as isize, cs: 1 };
                    let scores =
                        Product { a: columns(l, hi * dh, bi, false), b: columns(l, d + hi * dh, bi, true), c: block };
                    let context = Product {
                        a: block,
                        b: columns(l, 2 * d + hi * dh, bi, false),
                        c: Mat { offset: (bi * n) * d + hi * dh, rs: d as isize, cs: 1 },
                    };
                    let dst = &dst;
                    // SAFETY: the matrices lie inside qkv, the N·N block and the output, and each
                    // (batch, head) writes its own block and its own dh columns of the output.
                    unsafe {
                        product(
                            (n, n, dh),
                            x.as_ptr(),
                            x.as_ptr(),
                            p.as_mut_ptr(),
                            &scores,
                            self.scale,
                            false,
                            gemm::Parallelism::None,
                        );
                        p.chunks_mut(n).for_each(|row| super::fused::softmax_in_place(row, None));
                        product(
                            (n, dh, n),
                            p.as_ptr(),
                            x.as_ptr(),
                            dst.0,
                            &context,
                            1.0,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                };
                if self.kept.is_some() {
                    kept.par_chunks_mut(n * n).enumerate().for_each(|(t, p)| head(t, p));
                } else {
                    (0..bsz * h).into_par_iter().for_each_init(|| output(n * n), |p, t| head(t, p));
                }
            }
            if let Some(slot) = &self.kept {
                *slot.lock().map_err(|_| candle_core::Error::Msg("self-attention: poisoned probabilities".into()))? =
                    kept;
            }
            Ok((CpuStorage::F32(out), Shape::from((bsz, n, d))))
        })
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let Some(slot) = &self.kept else {
            candle_core::bail!("self-attention: a backward through a forward that kept no probabilities")
        };
        let probs =
            slot.lock().map_err(|_| candle_core::Error::Msg("self-attention: poisoned probabilities".into()))?;
        let op = PackedSelfAttentionBackward { heads: self.heads, scale: self.scale, probs: &probs };
        Ok(Some(qkv.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

/// The gradient of [`PackedSelfAttention`]'s qkv from the gradient g (B, N, H·dh) of its output
/// and its kept probabilities p: per (batch, head), dp = g_h·v_hᵀ, dv_h = p_hᵀ·g_h,
/// ds = p ⊙ (dp − Σ dp⊙p), dq_h = scale·ds·k_h, dk_h = scale·dsᵀ·q_h, written packed as qkv.
struct PackedSelfAttentionBackward<'a> {
    heads: usize,
    scale: f32,
    probs: &'a [f32],
}

impl CustomOp2 for PackedSelfAttentionBackward<'_> {
    fn name(&self) -> &'static str {
        "albef-packed-self-attention-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::time(Kind::Attention, || {
            let (x, g) = (f32s(s1, "self-attention backward")?, contiguous(s2, l2, "self-attention backward")?);
            let (bsz, n, d) = check_qkv(l1, self.heads)?;
            let (h, dh) = (self.heads, d / self.heads);
            if l2.dims() != [bsz, n, d] || self.probs.len() != bsz * h * n * n {
                candle_core::bail!(
                    "self-attention backward: gradient {:?} and {} kept probabilities against qkv {:?}",
                    l2.dims(),
                    self.probs.len(),
                    l1.dims()
                )
            }
            let mut dx = output(bsz * n * 3 * d);
            if n > 0 {
                let dst = SendPtr(dx.as_mut_ptr());
                (0..bsz * h).into_par_iter().for_each_init(
                    || output(n * n),
                    |ds, t| {
                        let (bi, hi) = (t / h, t % h);
                        let p = &self.probs[t * n * n..(t + 1) * n * n];
                        let block = Mat { offset: 0, rs: n as isize, cs: 1 };
                        let block_t = Mat { offset: 0, rs: 1, cs: n as isize };
                        let g_h = Mat { offset: (bi * n) * d + hi * dh, rs: d as isize, cs: 1 };
                        let grad_of = |part: usize| Mat {
                            offset: (bi * n) * 3 * d + part * d + hi * dh,
                            rs: (3 * d) as isize,
                            cs: 1,
                        };
                        let none = gemm::Parallelism::None;
                        let dst = &dst;
                        // SAFETY: the matrices lie inside qkv, g, p, the N·N scratch and dx, and
                        // each (batch, head) writes its own dh columns of each third of dx.
                        unsafe {
                            let dp = Product { a: g_h, b: columns(l1, 2 * d + hi * dh, bi, true), c: block };
                            product((n, n, dh), g.as_ptr(), x.as_ptr(), ds.as_mut_ptr(), &dp, 1.0, false, none);
                            let dv = Product { a: block_t, b: g_h, c: grad_of(2) };
                            product((n, dh, n), p.as_ptr(), g.as_ptr(), dst.0, &dv, 1.0, false, none);
                            ds.chunks_mut(n)
                                .zip(p.chunks(n))
                                .for_each(|(row, y)| super::fused::softmax_backward_in_place(y, row));
                            let dq = Product { a: block, b: columns(l1, d + hi * dh, bi, false), c: grad_of(0) };
                            product((n, dh, n), ds.as_ptr(), x.as_ptr(), dst.0, &dq, self.scale, false, none);
                            let dk = Product { a: block_t, b: columns(l1, hi * dh, bi, false), c: grad_of(1) };
                            product((n, dh, n), ds.as_ptr(), x.as_ptr(), dst.0, &dk, self.scale, false, none);
                        }
                    },
                );
            }
            Ok((CpuStorage::F32(dx), Shape::from((bsz, n, 3 * d))))
        })
    }
}

/// Σ over the rows of a contiguous (rows, n) matrix, in row blocks summed in a fixed order (a
/// linear layer's bias gradient; candle's `sum(0)` walks the columns on one thread).
struct ColumnSums;

impl candle_core::CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "albef-column-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::time(Kind::Matmul, || {
            let g = contiguous(s, l, "column sums")?;
            let (rows, n) = match *l.dims() {
                [r, n] => (r, n),
                _ => candle_core::bail!("column sums: expected a matrix, got {:?}", l.dims()),
            };
            let block = rows.div_ceil(4 * rayon::current_num_threads()).max(1);
            let partial: Vec<Vec<f32>> = g
                .par_chunks(block * n.max(1))
                .map(|rows| {
                    let mut acc = vec![0f32; n];
                    for row in rows.chunks(n.max(1)) {
                        acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
                    }
                    acc
                })
                .collect();
            let mut out = vec![0f32; n];
            for p in &partial {
                out.iter_mut().zip(p).for_each(|(a, &v)| *a += v);
            }
            Ok((CpuStorage::F32(out), Shape::from(n)))
        })
    }
}
