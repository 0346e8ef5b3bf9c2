//! Momentum ("teacher") copies and the ITC feature queues.

use crate::dist::Comm;
use crate::nn::profile::{self, Kind};
use crate::nn::{Init, ParamBuilder, ParamStore};
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Tensor, Var};
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

/// A momentum copy of a model branch with the EMA that keeps it, built the same way for every
/// model: `build(frozen root, "_m")` makes the `*_m` parameters, which are then paired with their
/// online twins and set to them (`copy_params()` in the reference's `__init__`).
pub struct Teacher<B> {
    pub branch: B,
    pub ema: Ema,
}

impl<B> Teacher<B> {
    pub fn build(
        store: &ParamStore,
        momentum: f64,
        build: impl FnOnce(&ParamBuilder, &str) -> Result<B>,
    ) -> Result<Self> {
        let branch = build(&store.root(false), "_m")?;
        let ema = Ema::from_store(store, momentum)?;
        // Placeholder tensors stay unwritten (that is what keeps them free).
        if !store.mode().placeholders {
            ema.copy()?;
        }
        Ok(Self { branch, ema })
    }
}

/// Pairs of (online, momentum) parameters, matched by name: `X.rest` ↔ `X_m.rest`.
#[derive(Clone, Debug)]
pub struct Ema {
    pairs: Vec<(Var, Var)>,
    momentum: f64,
}

impl Ema {
    /// Pairs every frozen parameter whose first path component ends in `_m` with its online twin.
    pub fn from_store(store: &ParamStore, momentum: f64) -> Result<Self> {
        let params = store.params();
        let mut pairs = Vec::new();
        for p in params.iter().filter(|p| !p.trainable) {
            let (head, rest) = p.name.split_once('.').unwrap_or((&p.name, ""));
            let Some(online_head) = head.strip_suffix("_m") else {
                continue;
            };
            let online = if rest.is_empty() { online_head.to_string() } else { format!("{online_head}.{rest}") };
            match params.iter().find(|q| q.name == online) {
                Some(q) => pairs.push((q.var.clone(), p.var.clone())),
                None => {
                    candle_core::bail!("momentum parameter {} has no online twin {online}", p.name)
                }
            }
        }
        Ok(Self { pairs, momentum })
    }

    /// `copy_params()`: teacher ← student.
    pub fn copy(&self) -> Result<()> {
        for (online, m) in &self.pairs {
            m.set(&online.as_tensor().detach().copy()?)?;
        }
        Ok(())
    }

    /// `θ_m ← m·θ_m + (1 − m)·θ`, done before the teacher's forward at every training step.
    /// On the CPU one in-place, multi-threaded pass per tensor (PyTorch's `mul_`/`add_`).
    pub fn update(&self) -> Result<()> {
        profile::time(Kind::Ema, || {
            for (online, m) in &self.pairs {
                let (t, o) = (m.as_tensor(), online.as_tensor());
                if t.device().is_cpu() && t.dtype() == DType::F32 && o.dtype() == DType::F32 {
                    t.inplace_op2(o, &EmaStep { momentum: self.momentum })?;
                    continue;
                }
                let new = ((t.detach() * self.momentum)? + (o.detach() * (1.0 - self.momentum))?)?;
                m.set(&new)?;
            }
            Ok(())
        })
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

/// `θ_m ← m·θ_m + (1 − m)·θ` in place of θ_m, in the f32 arithmetic of the tensor form.
struct EmaStep {
    momentum: f64,
}

impl InplaceOp2 for EmaStep {
    fn name(&self) -> &'static str {
        "albef-ema"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, src: &CpuStorage, src_l: &Layout) -> Result<()> {
        let (CpuStorage::F32(t), CpuStorage::F32(o)) = (dst, src) else { candle_core::bail!("ema: f32 only") };
        let (Some((t0, t1)), Some((o0, o1))) = (dst_l.contiguous_offsets(), src_l.contiguous_offsets()) else {
            candle_core::bail!("ema: the parameters must be contiguous")
        };
        let (keep, take) = (self.momentum as f32, (1.0 - self.momentum) as f32);
        t[t0..t1].par_chunks_mut(1 << 14).zip(o[o0..o1].par_chunks(1 << 14)).for_each(|(t, o)| {
            t.iter_mut().zip(o).for_each(|(t, &o)| *t = *t * keep + o * take);
        });
        Ok(())
    }
}

/// The ITC queues: `image_queue`, `text_queue` (E, Q), `queue_ptr` (1,), and for retrieval
/// `idx_queue` (1, Q) initialised to −100.
///
/// The pointer is a host-side number during training (`ptr_host`): read from the `queue_ptr`
/// buffer once, at the first enqueue (after any checkpoint was loaded), then kept on the host and
/// written back to the buffer (a host-to-device copy, no sync) so that checkpoints hold it.
#[derive(Clone, Debug)]
pub struct Queues {
    pub image: Var,
    pub text: Var,
    pub ptr: Var,
    pub idx: Option<Var>,
    /// Set in a data-parallel run: what is enqueued is first gathered from every rank.
    gather: Arc<OnceLock<Comm>>,
    ptr_host: std::rc::Rc<std::cell::Cell<Option<usize>>>,
}

impl Queues {
    pub fn new(pb: &ParamBuilder, embed_dim: usize, size: usize, with_idx: bool) -> Result<Self> {
        let image = pb.buffer((embed_dim, size), "image_queue", DType::F32, Init::NormalizedColumns)?;
        let text = pb.buffer((embed_dim, size), "text_queue", DType::F32, Init::NormalizedColumns)?;
        let idx =
            if with_idx { Some(pb.buffer((1, size), "idx_queue", DType::I64, Init::Const(-100.0))?) } else { None };
        let ptr = pb.buffer(1, "queue_ptr", DType::I64, Init::Zeros)?;
        Ok(Self { image, text, ptr, idx, gather: Arc::default(), ptr_host: Default::default() })
    }

    /// From now on, [`Queues::enqueue`] writes the features of every rank of `comm`
    /// (`concat_all_gather` in `_dequeue_and_enqueue`), so that every rank holds the same queues.
    pub fn gather_with(&self, comm: Comm) {
        let _ = self.gather.set(comm);
    }

    pub fn size(&self) -> Result<usize> {
        self.image.as_tensor().dim(1)
    }

    /// Forgets the host copy of the pointer: the next enqueue reads `queue_ptr` again (call after
    /// loading new buffer values into a model that has already trained).
    pub fn reload_ptr(&self) {
        self.ptr_host.set(None);
    }

    /// Writes the (B, E) momentum features (and (B,) idx) at `ptr` in place and advances it, as
    /// `_dequeue_and_enqueue`; in a data-parallel run the features of all ranks, in rank order
    /// (no gradient flows through the gather, as `concat_all_gather`).
    pub fn enqueue(&self, image_feat: &Tensor, text_feat: &Tensor, idx: Option<&Tensor>) -> Result<()> {
        if let Some(comm) = self.gather.get() {
            let all = |t: &Tensor| comm.all_gather(&t.detach()).map_err(|e| candle_core::Error::Msg(format!("{e:#}")));
            let idx = idx.map(all).transpose()?;
            return self.write(&all(image_feat)?, &all(text_feat)?, idx.as_ref());
        }
        self.write(image_feat, text_feat, idx)
    }

    fn write(&self, image_feat: &Tensor, text_feat: &Tensor, idx: Option<&Tensor>) -> Result<()> {
        let b = image_feat.dim(0)?;
        let size = self.size()?;
        if size % b != 0 {
            candle_core::bail!(
                "queue_size {size} must be a multiple of the batch size {b} (over all ranks; the reference asserts this)"
            )
        }
        let ptr = match self.ptr_host.get() {
            Some(p) => p,
            None => self.ptr.as_tensor().to_vec1::<i64>()?[0] as usize,
        };
        if ptr + b > size {
            candle_core::bail!(
                "queue_ptr {ptr} + batch {b} runs past queue_size {size}: the run was resumed with a world size whose \
                 batch over all ranks does not divide the position the queue was left at"
            )
        }
        let write = |q: &Var, cols: &Tensor| -> Result<()> {
            let t = q.as_tensor();
            t.slice_set(&cols.to_dtype(t.dtype())?.contiguous()?, 1, ptr)
        };
        write(&self.image, &image_feat.detach().t()?)?;
        write(&self.text, &text_feat.detach().t()?)?;
        if let (Some(q), Some(idx)) = (&self.idx, idx) {
            write(q, &idx.reshape((1, b))?)?;
        }
        let next = (ptr + b) % size;
        self.ptr_host.set(Some(next));
        self.ptr.set(&Tensor::new(&[next as i64], self.ptr.device())?)
    }
}
