//! Differentiable building blocks.
//!
//! candle's fused `layer_norm`, `softmax_last_dim` and `rms_norm` have no backward pass and
//! silently stop gradients, so everything here either is composed from primitive ops that do, or
//! (LayerNorm and softmax, f32 on the CPU) is our own fused op with its backward. The composed
//! forms serve every other device and dtype; tests check that both agree.

#[cfg(feature = "cuda")]
mod cuda;
mod fused;
mod gemm;
mod params;
pub mod profile;
pub(crate) mod simd;

pub use params::{Init, ParamBuilder, ParamStore, StoreMode};

use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

/// Numeric precision of the forward pass (`--precision`, `precision:`).
///
/// `Bf16` is mixed precision as `torch.autocast(dtype=torch.bfloat16)` does it: the parameters
/// (the master weights), their gradients and the AdamW moments stay f32; every matmul (linear
/// layers, patch embedding, attention scores and context, MLM decoder) takes bf16 operands and
/// gives a bf16 result; LayerNorm, softmax, log-softmax, the losses and all reductions read f32.
/// Here the matmul result is widened back to f32 at once, so the element-wise ops between the
/// matmuls (bias, GELU, residual adds, dropout) run in f32 on bf16-rounded values: the numerics
/// of autocast's matmuls, not yet its halved activation memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fp32" | "f32" => Ok(Self::Fp32),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!("unknown precision {other:?} (fp32, bf16)")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Fp32 => "fp32",
            Self::Bf16 => "bf16",
        })
    }
}

thread_local! {
    /// Like `torch.autocast`, a setting of the thread that runs the model, not of each layer.
    static PRECISION: std::cell::Cell<Precision> = const { std::cell::Cell::new(Precision::Fp32) };
}

/// Sets the precision of every forward pass run on this thread from now on.
pub fn set_precision(p: Precision) {
    PRECISION.with(|c| c.set(p));
}

pub fn precision() -> Precision {
    PRECISION.with(|c| c.get())
}

/// Runs `f` with precision `p` on this thread, then restores the previous one.
pub fn with_precision<T>(p: Precision, f: impl FnOnce() -> T) -> T {
    let before = precision();
    set_precision(p);
    let out = f();
    set_precision(before);
    out
}

/// `a.matmul(b)` in fp32 whatever the thread's precision (ITC's similarities, which the
/// reference computes in fp32); through `nn::gemm` on the CPU, whose backward makes no gradient
/// for an untracked operand (a queue).
pub fn matmul_fp32(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fused::cpu_f32(a) && fused::cpu_f32(b) {
        return a.apply_op2(b, gemm::MatMul { scale: 1.0 });
    }
    a.matmul(b)
}

/// `a.matmul(b)` in the thread's [`Precision`]: exactly `matmul` in fp32; in bf16 both operands
/// are rounded to bf16, multiplied (f32 accumulation, as cuBLAS and gemm do) and the bf16 result
/// widened to f32. The gradients flow back through the casts as f32.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match precision() {
        Precision::Fp32 if own_gemm(&[a, b]) => a.apply_op2(b, gemm::MatMul { scale: 1.0 }),
        Precision::Fp32 => a.matmul(b),
        Precision::Bf16 => a.to_dtype(DType::BF16)?.matmul(&b.to_dtype(DType::BF16)?)?.to_dtype(DType::F32),
    }
}

/// `a·bᵀ` for (…, m, k) and (…, n, k), as [`matmul`] of `a` and `b.t()`; through `nn::gemm`
/// the gradient of `b` comes back in `b`'s layout.
pub fn matmul_t(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if own_gemm(&[a, b]) && a.rank() == b.rank() {
        return a.apply_op2(b, gemm::MatMulT { scale: 1.0 });
    }
    matmul(a, &b.t()?)
}

/// True when the products go through `nn::gemm` (f32 on the CPU, fp32 precision).
fn own_gemm(ts: &[&Tensor]) -> bool {
    precision() == Precision::Fp32 && ts.iter().all(|t| fused::cpu_f32(t))
}

/// `x·weightᵀ + bias` for x (…, in) and weight (out, in), in the thread's precision; on the CPU
/// in fp32 the bias is added in the product's own pass.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if let Some(b) = bias {
        if own_gemm(&[x, weight, b]) && gemm::rows_of(x.layout()).is_some() {
            return x.apply_op3(weight, b, gemm::Linear);
        }
    }
    let dims = x.dims().to_vec();
    let in_dim = *dims.last().ok_or_else(|| candle_core::Error::Msg("linear: a 0-d input".into()))?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = matmul(&x.reshape((rows, in_dim))?, &weight.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = weight.dim(0)?;
    y.reshape(out_dims)
}

/// The reference's exact (erf) GELU.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fused::cpu_f32(x) {
        return x.contiguous()?.apply_op1(fused::Gelu);
    }
    x.gelu_erf()
}

/// `x` in f32: LayerNorm, softmax and log-softmax compute in f32 whatever their input, as
/// autocast runs them (a no-op on f32 input).
fn in_f32(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        Ok(x.clone())
    } else {
        x.to_dtype(DType::F32)
    }
}

/// Softmax over the last dimension (max-subtracted for stability; the max is a constant), in
/// f32 (a bf16 input is widened first).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let x = &in_f32(x)?;
    if fused::usable(x) {
        return x.contiguous()?.apply_op1(fused::Softmax);
    }
    softmax_composed(x)
}

/// [`softmax`] from primitive ops (every device and dtype).
pub fn softmax_composed(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension, in f32.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let x = &in_f32(x)?;
    if fused::usable_log_softmax(x) {
        return x.contiguous()?.apply_op1(fused::LogSoftmax);
    }
    log_softmax_composed(x)
}

/// [`log_softmax`] from primitive ops (every device and dtype).
pub fn log_softmax_composed(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// `F.normalize(x, dim=-1)`: x / max(||x||, 1e-12).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&norm)
}

/// Mean cross-entropy of `logits` (N, C) against class indices `targets` (N,), skipping
/// targets equal to `ignore_index` (PyTorch's default −100), as `F.cross_entropy` does.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let per_row = cross_entropy_per_row(logits, targets)?;
    let valid = targets.ge(0i64)?.to_dtype(DType::F32)?;
    per_row.sum_all()?.broadcast_div(&valid.sum_all()?)
}

/// Per-row cross-entropy (N,), zero where the target is negative (ignored), as
/// `CrossEntropyLoss(reduction='none')`.
pub fn cross_entropy_per_row(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let valid = targets.ge(0i64)?;
    let safe = valid.where_cond(targets, &targets.zeros_like()?)?;
    let logp = log_softmax(logits)?;
    let picked = logp.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?;
    picked.neg()?.mul(&valid.to_dtype(DType::F32)?)
}

/// Soft-target cross-entropy per row: −Σ_c target·log_softmax(logits).
pub fn soft_cross_entropy_per_row(logits: &Tensor, soft_targets: &Tensor) -> Result<Tensor> {
    log_softmax(logits)?.mul(soft_targets)?.sum(D::Minus1)?.neg()
}

thread_local! {
    /// Dropout masks come from this generator (not candle's unseeded one), so training runs are
    /// reproducible: the training loop reseeds it at the start of every epoch.
    static DROPOUT_RNG: std::cell::RefCell<rand::rngs::StdRng> =
        std::cell::RefCell::new(rand::SeedableRng::seed_from_u64(0));
}

/// Reseeds this thread's dropout generator.
pub fn seed_dropout(seed: u64) {
    DROPOUT_RNG.with(|r| *r.borrow_mut() = rand::SeedableRng::seed_from_u64(seed));
}

/// Dropout with the inverted scaling PyTorch uses; identity when `p == 0` or not training.
pub fn dropout(x: &Tensor, p: f32, train: bool) -> Result<Tensor> {
    if !train || p == 0.0 {
        return Ok(x.clone());
    }
    if fused::cpu_f32(x) {
        let seed = DROPOUT_RNG.with(|r| rand::Rng::random::<u64>(&mut *r.borrow_mut()));
        return x.contiguous()?.apply_op1(fused::Dropout { p, seed });
    }
    let n = x.elem_count();
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = DROPOUT_RNG.with(|r| {
        let mut r = r.borrow_mut();
        (0..n).map(|_| if rand::Rng::random::<f32>(&mut *r) < p { 0.0 } else { scale }).collect()
    });
    x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)
}

/// Linear layer, weight stored (out, in) as in PyTorch.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(pb: &ParamBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let weight = pb.get((out_dim, in_dim), "weight", Init::Standard)?;
        let bias = Some(pb.get(out_dim, "bias", Init::Zeros)?);
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.weight, self.bias.as_ref())
    }
}

/// LayerNorm over the last dimension.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(pb: &ParamBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = pb.get(dim, "weight", Init::Ones)?;
        let bias = pb.get(dim, "bias", Init::Zeros)?;
        Ok(Self { weight, bias, eps })
    }

    /// Statistics and output in f32 (a bf16 input is widened first).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = &in_f32(x)?;
        if fused::usable(x) {
            return x.contiguous()?.apply_op3(&self.weight, &self.bias, fused::LayerNormOp { eps: self.eps });
        }
        self.forward_composed(x)
    }

    /// [`LayerNorm::forward`] from primitive ops (every device and dtype).
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// Embedding table (num, dim).
#[derive(Clone, Debug)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(pb: &ParamBuilder, num: usize, dim: usize) -> Result<Self> {
        Ok(Self { weight: pb.get((num, dim), "weight", Init::Standard)? })
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let dims = ids.dims().to_vec();
        let flat = ids.flatten_all()?;
        let out = self.weight.index_select(&flat, 0)?;
        let mut out_dims = dims;
        out_dims.push(self.weight.dim(1)?);
        out.reshape(out_dims)
    }
}

/// Multi-head scaled dot-product attention on already-projected tensors (B, L, H·dh).
/// `mask` is additive and broadcast to (B, H, Lq, Lk).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let probs = attention_probs(q, k, heads, mask)?;
    attention_context(&probs, v, heads)
}

/// Multi-head self-attention of a packed (B, N, 3·H·dh) projection (queries, keys and values
/// side by side: the image encoder's `qkv`), heads merged: (B, N, H·dh). On the CPU in fp32 one
/// fused op with its own backward ([`gemm::PackedSelfAttention`]); elsewhere [`attention`] of
/// the three thirds.
pub fn packed_self_attention(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let d = qkv.dim(2)? / 3;
    if own_gemm(&[qkv]) {
        let scale = (1.0 / ((d / heads.max(1)) as f64).sqrt()) as f32;
        return qkv.apply_op1(gemm::PackedSelfAttention::new(heads, scale, qkv.track_op()));
    }
    attention(&qkv.narrow(2, 0, d)?, &qkv.narrow(2, d, d)?, &qkv.narrow(2, 2 * d, d)?, heads, None)
}

fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, d) = x.dims3()?;
    x.reshape((b, l, heads, d / heads))?.transpose(1, 2)?.contiguous()
}

/// softmax(q·kᵀ/√dh + mask): (B, H, Lq, Lk).
pub fn attention_probs(q: &Tensor, k: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let head_dim = q.dim(2)? / heads;
    if own_gemm(&[q, k]) {
        // Scores straight from the packed heads, each head's softmax (and mask) run on them while
        // they are in cache.
        let op = gemm::AttentionProbs { heads, scale: (1.0 / (head_dim as f64).sqrt()) as f32 };
        return match mask {
            Some(m) if m.rank() == 4 && m.dim(1)? == 1 && fused::cpu_f32(m) => {
                let (_, _, mq, lk) = m.dims4()?;
                let m = m.broadcast_as((q.dim(0)?, 1, mq, lk))?.contiguous()?;
                q.apply_op3(k, &m, op)
            }
            Some(m) => {
                let scores = q.apply_op2(k, gemm::HeadScores { heads, scale: op.scale })?;
                softmax(&scores.broadcast_add(m)?)
            }
            None => q.apply_op2(k, op),
        };
    }
    // Scaling q (L·dh values) instead of the scores (L·L) is exact for the usual power-of-two
    // head sizes and much cheaper.
    let q = (split_heads(q, heads)? * (1.0 / (head_dim as f64).sqrt()))?;
    let k = split_heads(k, heads)?;
    let scores = matmul(&q, &k.t()?)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    softmax(&scores)
}

/// probs·v merged back to (B, Lq, H·dh).
pub fn attention_context(probs: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    if own_gemm(&[probs, v]) {
        return probs.apply_op2(v, gemm::HeadContext { heads, scale: 1.0 });
    }
    let (b, _, d) = v.dims3()?;
    let v = split_heads(v, heads)?;
    let ctx = matmul(probs, &v)?;
    let lq = ctx.dim(2)?;
    ctx.transpose(1, 2)?.reshape((b, lq, d))
}

/// Whether cross-attention of the query sequences `q` (B pairs of Lq rows of width d, `heads`
/// heads) against `states` (its distinct sequences of Lk rows of width dx) costs fewer
/// multiply-adds through the key and value weights ([`cross_probs_through_keys`],
/// [`cross_context_through_values`]) than by projecting the keys and values: so when the query
/// rows of all heads are fewer than the states (a short text against 577 image tokens), and the
/// states are not shared by many queries (then projecting them once is cheaper). Only where the
/// products run through `nn::gemm` (the CPU in fp32), where it is tested.
pub fn cheaper_through_weights(q: &Tensor, states: &Tensor, heads: usize) -> Result<bool> {
    if !own_gemm(&[q, states]) {
        return Ok(false);
    }
    let (pairs, lq, d) = q.dims3()?;
    let (distinct, lk, dx) = states.dims3()?;
    let projected = distinct * lk * dx * d + pairs * lq * lk * d;
    let through = pairs * lq * d * dx + pairs * heads * lq * lk * dx;
    Ok(through < projected)
}

/// softmax(q_h·k_hᵀ/√dh) for k = states·Wkᵀ + bk without projecting the keys: q_h·k_hᵀ =
/// (q_h·Wk_h)·statesᵀ + q_h·bk_h. The bias term is one constant per query row, which the
/// softmax cancels; it is still added, so that the key bias gets the gradient the reference
/// gives it (zero but for rounding). q (B, Lq, H·dh), states (B, Lk, Dx), key weight
/// (H·dh, Dx), key bias (H·dh) → (B, H, Lq, Lk).
pub fn cross_probs_through_keys(
    q: &Tensor,
    states: &Tensor,
    key_weight: &Tensor,
    key_bias: Option<&Tensor>,
    heads: usize,
) -> Result<Tensor> {
    let (b, lq, d) = q.dims3()?;
    let (_, lk, dx) = states.dims3()?;
    let dh = d / heads;
    // Heads first, the batch folded into the rows: each head's weight is one shared operand, so
    // its gradient is one product (no per-pair copies to sum). Scaling q is exact for the usual
    // power-of-two head sizes, as in `attention_probs`.
    let q = (q * (1.0 / (dh as f64).sqrt()))?.reshape((b, lq, heads, dh))?.permute((2, 0, 1, 3))?;
    let q = q.reshape((heads, b * lq, dh))?;
    let per_pair =
        |t: Tensor, width: usize| t.reshape((heads, b, lq, width))?.transpose(0, 1)?.reshape((b, heads * lq, width));
    let qw = per_pair(matmul(&q, &key_weight.reshape((heads, dh, dx))?)?, dx)?;
    let mut scores = matmul_t(&qw, states)?;
    if let Some(bias) = key_bias {
        scores = scores.broadcast_add(&per_pair(matmul(&q, &bias.reshape((heads, dh, 1))?)?, 1)?)?;
    }
    softmax(&scores)?.reshape((b, heads, lq, lk))
}

/// probs_h·v_h for v = states·Wvᵀ + bv without projecting the values: (probs_h·states)·Wv_hᵀ
/// plus rowsum(probs_h)·bv_h (the sum is 1 but where dropout changed the probabilities).
/// probs (B, H, Lq, Lk), states (B, Lk, Dx), value weight (H·dh, Dx) → (B, Lq, H·dh).
pub fn cross_context_through_values(
    probs: &Tensor,
    states: &Tensor,
    value_weight: &Tensor,
    value_bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, heads, lq, lk) = probs.dims4()?;
    let dx = states.dim(2)?;
    let d = value_weight.dim(0)?;
    let dh = d / heads;
    let ps = matmul(&probs.reshape((b, heads * lq, lk))?, states)?;
    let ps = ps.reshape((b, heads, lq, dx))?.transpose(0, 1)?.reshape((heads, b * lq, dx))?;
    let mut ctx = matmul_t(&ps, &value_weight.reshape((heads, dh, dx))?)?.reshape((heads, b, lq, dh))?;
    if let Some(bias) = value_bias {
        let mass = probs.sum_keepdim(3)?.transpose(0, 1)?;
        ctx = ctx.broadcast_add(&mass.broadcast_mul(&bias.reshape((heads, 1, 1, dh))?)?)?;
    }
    ctx.permute((1, 2, 0, 3))?.reshape((b, lq, d))
}

/// Attention of a batch of queries (B, Lq, H·dh) against one shared key/value sequence
/// (1, Lk, H·dh), unmasked — many texts against one image. The batch is folded into the query
/// rows, so the shared keys and values are projected and read once instead of B times.
pub fn attention_shared_kv(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, lq, d) = q.dims3()?;
    let head_dim = d / heads;
    // (B, Lq, H, dh) → (H, B·Lq, dh)
    let q = (q.reshape((b * lq, heads, head_dim))?.transpose(0, 1)?.contiguous()? * (1.0 / (head_dim as f64).sqrt()))?;
    let k = split_heads(k, heads)?.squeeze(0)?; // (H, Lk, dh)
    let v = split_heads(v, heads)?.squeeze(0)?;
    let probs = softmax(&matmul(&q, &k.t()?)?)?; // (H, B·Lq, Lk)
    let ctx = matmul(&probs, &v)?; // (H, B·Lq, dh)
    ctx.transpose(0, 1)?.reshape((b, lq, d))
}

#[cfg(test)]
mod fused_vs_composed {
    use super::*;
    use candle_core::{Device, Var};

    fn random(shape: (usize, usize, usize), seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0..3.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) =
            (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        a.iter().zip(&b).map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() }).fold(0.0, f32::max)
    }

    /// Forward values and the gradient of Σ f(x)·r (r random) with respect to x, for `f`.
    fn value_and_grad(x: &Tensor, r: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> (Tensor, Tensor) {
        let v = Var::from_tensor(x).unwrap();
        let y = f(v.as_tensor()).unwrap();
        let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        (y, g.get(&v).unwrap().clone())
    }

    /// Scores with an additive attention mask: large negatives (the reference's −10000) and −∞.
    fn masked_scores() -> Tensor {
        let x = random((2, 5, 7), 1);
        let mut mask = vec![0f32; 2 * 5 * 7];
        for (i, m) in mask.iter_mut().enumerate() {
            if i % 7 == 6 {
                *m = -10000.0;
            } else if i % 7 == 5 && i % 2 == 0 {
                *m = f32::NEG_INFINITY;
            }
        }
        (x + Tensor::from_vec(mask, (2, 5, 7), &Device::Cpu).unwrap()).unwrap()
    }

    fn random4(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
        random((shape.0 * shape.1, shape.2, shape.3), seed).reshape(shape).unwrap()
    }

    /// Gradients of Σ f(args)·r with respect to every argument.
    fn grads_of(args: &[&Tensor], r: &Tensor, f: impl Fn(&[Tensor]) -> Result<Tensor>) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = args.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts).unwrap();
        let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        (y, vars.iter().map(|v| g.get(v).unwrap().clone()).collect())
    }

    fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let d = max_diff(a, b);
        assert!(d < tol, "{what}: max difference {d}");
    }

    #[test]
    fn own_linear_and_matmul_equal_candle_forward_and_backward() {
        let x = random((1, 7, 5), 11).squeeze(0).unwrap();
        let w = random((1, 3, 5), 12).squeeze(0).unwrap();
        let b = random((1, 1, 3), 13).flatten_all().unwrap();
        let r = random((1, 7, 3), 14).squeeze(0).unwrap();
        let (y1, g1) = grads_of(&[&x, &w, &b], &r, |t| linear(&t[0], &t[1], Some(&t[2])));
        let (y2, g2) = grads_of(&[&x, &w, &b], &r, |t| t[0].matmul(&t[1].t()?)?.broadcast_add(&t[2]));
        assert_close("linear", &y1, &y2, 1e-5);
        for (name, (a, c)) in ["dx", "dw", "db"].iter().zip(g1.iter().zip(&g2)) {
            assert_close(name, a, c, 1e-5);
        }
        // Batched, with a transposed (strided) right operand and one shared by the batch.
        let a = random((4, 6, 5), 15);
        let bt = random((4, 8, 5), 16);
        let r = random((4, 6, 8), 17);
        let (y1, g1) = grads_of(&[&a, &bt], &r, |t| matmul(&t[0], &t[1].transpose(1, 2)?));
        let (y2, g2) = grads_of(&[&a, &bt], &r, |t| t[0].matmul(&t[1].transpose(1, 2)?));
        assert_close("batched matmul", &y1, &y2, 1e-5);
        assert_close("batched da", &g1[0], &g2[0], 1e-5);
        assert_close("batched db", &g1[1], &g2[1], 1e-5);
        let shared = random((1, 5, 8), 18).squeeze(0).unwrap();
        let (y1, g1) = grads_of(&[&a, &shared], &r, |t| matmul(&t[0], &t[1]));
        let (y2, g2) = grads_of(&[&a, &shared], &r, |t| t[0].broadcast_matmul(&t[1]));
        assert_close("shared matmul", &y1, &y2, 1e-5);
        assert_close("shared db", &g1[1], &g2[1], 1e-5);
        // The first row of each sequence, a (B, 1, k) view whose rows are a sequence apart.
        let seqs = random((3, 4, 5), 19);
        let first = seqs.narrow(1, 0, 1).unwrap();
        let y1 = linear(&first, &w, Some(&b)).unwrap();
        let y2 = first.contiguous().unwrap().broadcast_matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
        assert_close("linear of first rows", &y1, &y2, 1e-5);
        // An untracked operand (ITC's copy of a queue; a linear layer's pixels) gets no
        // gradient made, the tracked one the same as through candle.
        let feat = Var::from_tensor(&random((1, 2, 5), 20).squeeze(0).unwrap()).unwrap();
        let queue = random((1, 5, 9), 21).squeeze(0).unwrap();
        let r = random((1, 2, 9), 22).squeeze(0).unwrap();
        let g = (matmul_fp32(feat.as_tensor(), &queue).unwrap() * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&queue).is_none(), "a gradient was made for the untracked operand");
        let (_, want) = grads_of(&[feat.as_tensor()], &r, |t| t[0].matmul(&queue));
        assert_close("tracked operand of a product with an untracked one", g.get(&feat).unwrap(), &want[0], 1e-5);
        let wv = Var::from_tensor(&w).unwrap();
        let g = (linear(&x, wv.as_tensor(), Some(&b)).unwrap() * &random((1, 7, 3), 23).squeeze(0).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&x).is_none(), "a gradient was made for a linear layer's untracked input");
    }

    /// The composed attention every other device runs: heads split into copies, scaled q.
    fn composed_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
        let split = |x: &Tensor| -> Result<Tensor> {
            let (b, l, d) = x.dims3()?;
            x.reshape((b, l, heads, d / heads))?.transpose(1, 2)?.contiguous()
        };
        let dh = q.dim(2)? / heads;
        let scores = (split(q)? * (1.0 / (dh as f64).sqrt()))?.matmul(&split(k)?.t()?)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let ctx = softmax_composed(&scores)?.matmul(&split(v)?)?;
        let (b, lq, d) = q.dims3()?;
        ctx.transpose(1, 2)?.reshape((b, lq, d))
    }

    #[test]
    fn own_attention_equals_composed_forward_and_backward() {
        // q, k, v cut from one packed (B, L, 3D) tensor, as the ViT's fused qkv: strided views.
        let (b, l, d, heads) = (2, 9, 12, 3);
        let qkv = random((b, l, 3 * d), 21);
        let r = random((b, l, d), 22);
        let mut pad = vec![0f32; b * l];
        pad[l - 1] = -10000.0;
        pad[2 * l - 2] = -10000.0;
        let pad = Tensor::from_vec(pad, (b, 1, 1, l), &Device::Cpu).unwrap();
        let causal = random4((b, 1, l, l), 23);
        for (name, mask) in [("no mask", None), ("padding mask", Some(&pad)), ("full mask", Some(&causal))] {
            let f = |t: &[Tensor], own: bool| -> Result<Tensor> {
                let (q, k, v) = (t[0].narrow(2, 0, d)?, t[0].narrow(2, d, d)?, t[0].narrow(2, 2 * d, d)?);
                if own {
                    attention(&q, &k, &v, heads, mask)
                } else {
                    composed_attention(&q, &k, &v, heads, mask)
                }
            };
            let (y1, g1) = grads_of(&[&qkv], &r, |t| f(t, true));
            let (y2, g2) = grads_of(&[&qkv], &r, |t| f(t, false));
            assert_close(&format!("attention, {name}"), &y1, &y2, 1e-5);
            assert_close(&format!("attention dqkv, {name}"), &g1[0], &g2[0], 1e-5);
        }
    }

    /// The image encoder's fused self-attention over its packed qkv gives the composed
    /// attention's output and qkv gradient, tracked or not, from a contiguous qkv and from a
    /// strided one (a transposed view).
    #[test]
    fn packed_self_attention_equals_composed_forward_and_backward() {
        let (b, l, d, heads) = (2, 9, 12, 3);
        let qkv = random((b, l, 3 * d), 31);
        let r = random((b, l, d), 32);
        let composed = |t: &Tensor| {
            composed_attention(&t.narrow(2, 0, d)?, &t.narrow(2, d, d)?, &t.narrow(2, 2 * d, d)?, heads, None)
        };
        let (y1, g1) = grads_of(&[&qkv], &r, |t| packed_self_attention(&t[0], heads));
        let (y2, g2) = grads_of(&[&qkv], &r, |t| composed(&t[0]));
        assert_close("packed self-attention", &y1, &y2, 1e-5);
        assert_close("packed self-attention dqkv", &g1[0], &g2[0], 1e-5);
        let untracked = packed_self_attention(&qkv, heads).unwrap();
        assert_close("packed self-attention, untracked", &untracked, &y2, 1e-5);
        // The same values laid out (B, 3D, L) and viewed back as (B, L, 3D).
        let strided = qkv.transpose(1, 2).unwrap().contiguous().unwrap();
        let (y3, g3) = grads_of(&[&strided], &r.transpose(1, 2).unwrap(), |t| {
            packed_self_attention(&t[0].transpose(1, 2)?, heads)?.transpose(1, 2)
        });
        assert_close("packed self-attention, strided", &y3.transpose(1, 2).unwrap(), &y2, 1e-5);
        assert_close("packed self-attention dqkv, strided", &g3[0].transpose(1, 2).unwrap(), &g2[0], 1e-5);
        let bad = packed_self_attention(&random((b, l, 3 * d + 1), 33), heads).unwrap_err().to_string();
        assert!(bad.contains("(B, N, 3·H·dh)"), "{bad}");
    }

    #[test]
    fn gelu_equals_candle_erf_gelu_forward_and_backward() {
        let x = (random((4, 8, 33), 31) * 2.0).unwrap();
        let r = random((4, 8, 33), 32);
        let (y1, g1) = value_and_grad(&x, &r, gelu);
        let (y2, g2) = value_and_grad(&x, &r, |t| t.gelu_erf());
        assert_close("gelu", &y1, &y2, 2e-6);
        assert_close("gelu backward", &g1, &g2, 2e-6);
    }

    #[test]
    fn dropout_is_reproducible_and_its_backward_uses_the_same_mask() {
        let x = (random((3, 50, 40), 41).abs().unwrap() + 1.0).unwrap();
        seed_dropout(7);
        let (y, g) = value_and_grad(&x, &x.ones_like().unwrap(), |t| dropout(t, 0.25, true));
        seed_dropout(7);
        let again = dropout(&x, 0.25, true).unwrap();
        assert_eq!(max_diff(&y, &again), 0.0, "same seed, same mask");
        let (y, g) =
            (y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), g.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64;
        assert!((dropped - 0.25).abs() < 0.02, "dropped fraction {dropped}");
        for (yi, gi) in y.iter().zip(&g) {
            // Kept elements are scaled by 1/(1 − p) and pass a gradient of exactly that.
            assert_eq!(*yi == 0.0, *gi == 0.0);
            if *gi != 0.0 {
                assert!((gi - 1.0 / 0.75).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn softmax_fused_equals_composed_forward_and_backward() {
        for x in [random((3, 4, 9), 0), masked_scores()] {
            let r = random(x.dims3().unwrap(), 2);
            let (yf, gf) = value_and_grad(&x, &r, softmax);
            let (yc, gc) = value_and_grad(&x, &r, softmax_composed);
            assert!(max_diff(&yf, &yc) < 1e-6, "forward {}", max_diff(&yf, &yc));
            assert!(max_diff(&gf, &gc) < 1e-6, "backward {}", max_diff(&gf, &gc));
            assert!(gf.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|g| g.is_finite()));
        }
    }

    #[test]
    fn fused_log_softmax_equals_composed_forward_and_backward() {
        // The CUDA kernel's CPU twin (the CPU itself uses the composed form).
        for x in [random((3, 4, 9), 10), masked_scores()] {
            let r = random(x.dims3().unwrap(), 11);
            let (yf, gf) = value_and_grad(&x, &r, |t| t.apply_op1(fused::LogSoftmax));
            let (yc, gc) = value_and_grad(&x, &r, log_softmax_composed);
            let finite = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (a, b) = (finite(&yf), finite(&yc));
            for (p, q) in a.iter().zip(&b) {
                assert!(p == q || (p - q).abs() < 1e-5, "forward {p} vs {q}");
            }
            assert!(max_diff(&gf, &gc) < 1e-5, "backward {}", max_diff(&gf, &gc));
        }
    }

    #[test]
    fn log_softmax_equals_log_of_fused_softmax() {
        // No fused log-softmax exists: the composed one is checked against log(fused softmax).
        let x = random((3, 4, 9), 3);
        let r = random((3, 4, 9), 4);
        let (yl, gl) = value_and_grad(&x, &r, log_softmax);
        let (ys, gs) = value_and_grad(&x, &r, |t| softmax(t)?.log());
        assert!(max_diff(&yl, &ys) < 1e-5, "forward {}", max_diff(&yl, &ys));
        assert!(max_diff(&gl, &gs) < 1e-5, "backward {}", max_diff(&gl, &gs));
    }

    #[test]
    fn layer_norm_fused_equals_composed_forward_and_backward() {
        let (w, b) = (random((1, 1, 9), 5).flatten_all().unwrap(), random((1, 1, 9), 6).flatten_all().unwrap());
        let (wv, bv) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
        let ln = LayerNorm { weight: wv.as_tensor().clone(), bias: bv.as_tensor().clone(), eps: 1e-12 };
        for x in [random((3, 4, 9), 7), (random((3, 4, 9), 8) * 1000.0).unwrap()] {
            let r = random((3, 4, 9), 9);
            let xv = Var::from_tensor(&x).unwrap();
            let grads = |y: Tensor| (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let yf = ln.forward(xv.as_tensor()).unwrap();
            let yc = ln.forward_composed(xv.as_tensor()).unwrap();
            assert!(max_diff(&yf, &yc) < 1e-5, "forward {}", max_diff(&yf, &yc));
            let (gf, gc) = (grads(yf), grads(yc));
            for (name, v) in [("x", &xv), ("weight", &wv), ("bias", &bv)] {
                let d = max_diff(gf.get(v).unwrap(), gc.get(v).unwrap());
                assert!(d < 1e-4, "d{name}: {d}");
            }
        }
    }

    /// Attention through the key and value weights gives the values and every gradient (query,
    /// states, weights, biases, with dropout-like uneven probability mass) of projecting the
    /// keys and values first, on a short query against long states, the shape it is used for.
    #[test]
    fn cross_attention_through_weights_equals_projected_keys_and_values() {
        let (b, lq, lk, d, dx, heads) = (3, 4, 40, 16, 12, 4);
        let var = |shape: (usize, usize, usize), seed| Var::from_tensor(&(random(shape, seed) * 0.3).unwrap()).unwrap();
        let q = var((b, lq, d), 20);
        let states = var((b, lk, dx), 21);
        let (wk, wv) = (var((1, d, dx), 22), var((1, d, dx), 23));
        let (bk, bv) = (var((1, 1, d), 24), var((1, 1, d), 25));
        // Uneven row sums, as dropout leaves them, exercise the value-bias term.
        let keep = (random4((b, heads, lq, lk), 26).ge(-2.0).unwrap().to_dtype(DType::F32).unwrap() * 1.25).unwrap();
        let r = random((b, lq, d), 27);
        let (wk2, wv2) = (wk.as_tensor().squeeze(0).unwrap(), wv.as_tensor().squeeze(0).unwrap());
        let (bk1, bv1) = (bk.as_tensor().flatten_all().unwrap(), bv.as_tensor().flatten_all().unwrap());
        assert!(cheaper_through_weights(q.as_tensor(), states.as_tensor(), heads).unwrap());
        let projected = {
            let k = linear(states.as_tensor(), &wk2, Some(&bk1)).unwrap();
            let v = linear(states.as_tensor(), &wv2, Some(&bv1)).unwrap();
            let p = (attention_probs(q.as_tensor(), &k, heads, None).unwrap() * &keep).unwrap();
            attention_context(&p, &v, heads).unwrap()
        };
        let through = {
            let p = cross_probs_through_keys(q.as_tensor(), states.as_tensor(), &wk2, Some(&bk1), heads).unwrap();
            cross_context_through_values(&(p * &keep).unwrap(), states.as_tensor(), &wv2, Some(&bv1)).unwrap()
        };
        assert!(max_diff(&projected, &through) < 1e-5, "forward {}", max_diff(&projected, &through));
        let grads = |y: &Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let (gp, gt) = (grads(&projected), grads(&through));
        let vars = [
            ("q", &q),
            ("states", &states),
            ("key weight", &wk),
            ("key bias", &bk),
            ("value weight", &wv),
            ("value bias", &bv),
        ];
        for (name, v) in vars {
            let d = max_diff(gp.get(v).unwrap(), gt.get(v).unwrap());
            assert!(d < 1e-5, "d {name}: {d}");
        }
        // The key bias shifts every score of a query row alike: zero gradient but for rounding.
        let dbk = gt.get(&bk).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(dbk < 1e-5, "key bias gradient {dbk}");
    }
}
