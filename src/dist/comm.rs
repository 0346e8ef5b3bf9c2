//! The collectives a data-parallel run needs, behind one trait so that the training code does not
//! know which backend runs: NCCL ([`super::nccl`]) on GPUs, TCP ([`super::tcp`]) on CPUs and in
//! tests.

use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use std::sync::Arc;

/// A shared handle on the run's communicator.
pub type Comm = Arc<dyn Communicator>;

/// DDP's default gradient bucket (`bucket_cap_mb=25`), in f32 elements.
pub const BUCKET_ELEMENTS: usize = 25 * 1024 * 1024 / 4;

/// Collectives over the ranks of a run. Every rank calls the same collectives in the same order;
/// results are identical on every rank.
pub trait Communicator: Send + Sync + std::fmt::Debug {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum over ranks of an f32 tensor (same shape on every rank).
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// The tensors of every rank concatenated along dimension 0, in rank order (same shape on
    /// every rank), as `concat_all_gather`.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;
    /// Rank `root`'s tensor on every rank (`t` gives the shape and dtype on the others).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
    /// Every rank's bytes (any length), in rank order.
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Rank `root`'s bytes on every rank.
    fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Result<Vec<u8>>;
    fn barrier(&self) -> Result<()>;

    fn is_primary(&self) -> bool {
        self.rank() == 0
    }

    /// The mean over ranks of each tensor, reduced in buckets of at most [`BUCKET_ELEMENTS`]
    /// (each tensor is flattened to f32; the results keep its shape and dtype).
    fn all_reduce_mean(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        let world = self.world_size() as f64;
        let mut out = Vec::with_capacity(tensors.len());
        let mut start = 0;
        while start < tensors.len() {
            // One bucket: consecutive tensors up to the cap (a larger tensor is a bucket alone).
            let mut end = start;
            let mut elems = 0;
            while end < tensors.len() && (end == start || elems + tensors[end].elem_count() <= BUCKET_ELEMENTS) {
                elems += tensors[end].elem_count();
                end += 1;
            }
            let flat: Vec<Tensor> = tensors[start..end]
                .iter()
                .map(|t| t.detach().to_dtype(DType::F32)?.flatten_all())
                .collect::<candle_core::Result<_>>()?;
            let summed = self.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
            let mean = (summed / world)?;
            let mut offset = 0;
            for t in &tensors[start..end] {
                let n = t.elem_count();
                out.push(mean.narrow(0, offset, n)?.reshape(t.shape())?.to_dtype(t.dtype())?);
                offset += n;
            }
            start = end;
        }
        Ok(out)
    }
}

/// DDP's gradient averaging: replaces each gradient of `vars` in `grads` by its mean over ranks.
/// A variable without a gradient on some ranks counts as zero there (as DDP's buckets); one
/// without a gradient on every rank keeps none (the optimizer leaves it alone, as on one process).
pub fn average_gradients(comm: &dyn Communicator, vars: &[Var], grads: &mut GradStore) -> Result<()> {
    let Some(first) = vars.first() else { return Ok(()) };
    let dev = first.as_tensor().device().clone();
    let present: Vec<f32> = vars.iter().map(|v| if grads.get(v).is_some() { 1.0 } else { 0.0 }).collect();
    let present = comm.all_reduce_sum(&Tensor::new(present, &dev)?)?.to_vec1::<f32>()?;
    let mut with_grad = Vec::new();
    let mut local = Vec::new();
    for (v, &p) in vars.iter().zip(&present) {
        if p == 0.0 {
            continue;
        }
        let g = match grads.get(v) {
            Some(g) => g.detach(),
            None => v.as_tensor().zeros_like()?,
        };
        with_grad.push(v);
        local.push(g);
    }
    let averaged = comm.all_reduce_mean(&local)?;
    for (v, g) in with_grad.into_iter().zip(averaged) {
        grads.insert(v.as_tensor(), g);
    }
    Ok(())
}

/// Every variable set to rank `root`'s value (DDP's broadcast of the parameters and buffers at
/// construction).
pub fn broadcast_vars(comm: &dyn Communicator, vars: &[Var], root: usize) -> Result<()> {
    for v in vars {
        let t = comm.broadcast(&v.as_tensor().detach(), root)?;
        v.set(&t)?;
    }
    Ok(())
}

/// A tensor's elements as little-endian bytes (on the CPU), for backends that move bytes.
pub fn to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?.to_device(&Device::Cpu)?;
    Ok(match t.dtype() {
        DType::F32 => t.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F64 => t.to_vec1::<f64>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::I64 => t.to_vec1::<i64>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::U32 => t.to_vec1::<u32>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::U8 => t.to_vec1::<u8>()?,
        DType::BF16 => t.to_vec1::<half::bf16>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<half::f16>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        other => bail!("cannot send a {other:?} tensor between ranks"),
    })
}

/// The inverse of [`to_bytes`]: `n` elements of `dtype` (any multiple of the element size is
/// accepted; the shape is the caller's), on `device`.
pub fn from_bytes(bytes: &[u8], dtype: DType, shape: &[usize], device: &Device) -> Result<Tensor> {
    fn chunks<const N: usize, T>(bytes: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
        bytes.chunks_exact(N).map(|c| f(c.try_into().expect("exact chunk"))).collect()
    }
    let n: usize = shape.iter().product();
    if bytes.len() != n * dtype.size_in_bytes() {
        bail!("a peer sent {} bytes for {n} {dtype:?} elements", bytes.len());
    }
    let t = match dtype {
        DType::F32 => Tensor::from_vec(chunks(bytes, f32::from_le_bytes), shape, &Device::Cpu)?,
        DType::F64 => Tensor::from_vec(chunks(bytes, f64::from_le_bytes), shape, &Device::Cpu)?,
        DType::I64 => Tensor::from_vec(chunks(bytes, i64::from_le_bytes), shape, &Device::Cpu)?,
        DType::U32 => Tensor::from_vec(chunks(bytes, u32::from_le_bytes), shape, &Device::Cpu)?,
        DType::U8 => Tensor::from_vec(bytes.to_vec(), shape, &Device::Cpu)?,
        DType::BF16 => Tensor::from_vec(chunks(bytes, half::bf16::from_le_bytes), shape, &Device::Cpu)?,
        DType::F16 => Tensor::from_vec(chunks(bytes, half::f16::from_le_bytes), shape, &Device::Cpu)?,
        other => bail!("cannot receive a {other:?} tensor from a peer"),
    };
    Ok(t.to_device(device)?)
}

/// The sums over ranks of `values` (the same number of them, in the same order, on every rank).
pub fn sum_values(comm: &dyn Communicator, values: &[f64]) -> Result<Vec<f64>> {
    if values.is_empty() {
        return Ok(Vec::new());
    }
    // f64 through bytes: the figures are logged, and f32 would round counts past 2^24.
    let mine: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let all = comm.all_gather_bytes(&mine)?;
    let mut sums = vec![0f64; values.len()];
    for bytes in all {
        if bytes.len() != mine.len() {
            bail!("ranks disagree on the number of figures to sum ({} vs {} bytes)", bytes.len(), mine.len());
        }
        for (s, c) in sums.iter_mut().zip(bytes.chunks_exact(8)) {
            *s += f64::from_le_bytes(c.try_into().expect("8 bytes"));
        }
    }
    Ok(sums)
}

/// Results of an evaluation sharded over ranks, merged: every rank's `(example index, result)`
/// pairs, gathered, as one list in example order (an index two ranks hold, the padding of a
/// `DistributedSampler`, is kept once). The reference merges per-rank result files on rank 0;
/// here every rank gets the merged list, so every rank computes the same metrics.
pub fn merge_by_index<T: serde::Serialize + serde::de::DeserializeOwned>(
    comm: &dyn Communicator,
    local: Vec<(usize, T)>,
    len: usize,
) -> Result<Vec<T>> {
    let parts = comm.all_gather_bytes(&serde_json::to_vec(&local)?)?;
    let mut merged: Vec<Option<T>> = (0..len).map(|_| None).collect();
    for (rank, bytes) in parts.iter().enumerate() {
        let items: Vec<(usize, T)> = serde_json::from_slice(bytes)
            .map_err(|e| anyhow::anyhow!("rank {rank} sent results this rank cannot read: {e}"))?;
        for (i, v) in items {
            if i >= len {
                bail!("rank {rank} sent a result for example {i} of {len}");
            }
            merged[i].get_or_insert(v);
        }
    }
    merged
        .into_iter()
        .enumerate()
        .map(|(i, v)| v.ok_or_else(|| anyhow::anyhow!("no rank evaluated example {i}")))
        .collect()
}
