//! AdamW with the reference's two parameter groups (`optim/optim_factory.py`): no weight decay
//! for 1-D tensors and biases, `weight_decay` for everything else (0-D `temp` included).

use crate::checkpoint::StateDict;
use crate::nn::profile::{self, Kind};
use crate::nn::simd::vectorized;
use crate::nn::ParamStore;
use anyhow::{Context, Result};
use candle_core::{backprop::GradStore, CpuStorage, DType, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;
use std::cell::RefCell;

/// The first and second moments of one parameter.
enum Moments {
    /// f32 parameters on the CPU: plain buffers, updated with the parameter in one in-place,
    /// multi-threaded pass (as PyTorch's in-place `step`), no temporaries.
    Host { m: Vec<f32>, v: Vec<f32> },
    /// Elsewhere: tensors, updated with whole-tensor ops.
    Device { m: Tensor, v: Tensor },
}

struct Slot {
    name: String,
    var: Var,
    weight_decay: f64,
    moments: Moments,
}

impl Slot {
    fn new(name: String, var: Var, weight_decay: f64) -> Result<Self> {
        let t = var.as_tensor();
        let moments = if t.device().is_cpu() && t.dtype() == DType::F32 {
            Moments::Host { m: vec![0.0; t.elem_count()], v: vec![0.0; t.elem_count()] }
        } else {
            Moments::Device { m: t.zeros_like()?, v: t.zeros_like()? }
        };
        Ok(Self { name, var, weight_decay, moments })
    }

    fn tensors(&self) -> Result<(Tensor, Tensor)> {
        let t = self.var.as_tensor();
        Ok(match &self.moments {
            Moments::Host { m, v } => {
                (Tensor::from_slice(m, t.shape(), t.device())?, Tensor::from_slice(v, t.shape(), t.device())?)
            }
            Moments::Device { m, v } => (m.clone(), v.clone()),
        })
    }

    fn set(&mut self, m: &Tensor, v: &Tensor) -> Result<()> {
        let shape = self.var.as_tensor().shape();
        if m.shape() != shape || v.shape() != shape {
            anyhow::bail!("optimizer state for {} is {:?}, the parameter is {shape:?}", self.name, m.shape());
        }
        match &mut self.moments {
            Moments::Host { m: hm, v: hv } => {
                *hm = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                *hv = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            }
            Moments::Device { m: dm, v: dv } => {
                *dm = m.clone();
                *dv = v.clone();
            }
        }
        Ok(())
    }
}

/// AdamW's per-step factors, in f32.
#[derive(Clone, Copy)]
struct Coefficients {
    decay: f32,
    b1: f32,
    one_b1: f32,
    b2: f32,
    one_b2: f32,
    inv_bc2: f32,
    eps: f32,
    step: f32,
}

vectorized! {
    /// One chunk of the update. Iterators, not indices: bounds checks in the loop would keep it
    /// scalar, and its square root and division then cost more than the memory traffic.
    fn adamw_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: Coefficients) {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let decayed = *p * k.decay;
            *m = *m * k.b1 + g * k.one_b1;
            *v = *v * k.b2 + g * g * k.one_b2;
            let denom = v.sqrt() * k.inv_bc2 + k.eps;
            *p = decayed - *m / denom * k.step;
        }
    }
}

/// One AdamW update of a parameter (the in-place destination) from its gradient, with the
/// moments updated in the same pass.
struct Update<'a> {
    m: RefCell<&'a mut [f32]>,
    v: RefCell<&'a mut [f32]>,
    lr: f64,
    weight_decay: f64,
    beta1: f64,
    beta2: f64,
    bc1: f64,
    bc2_sqrt: f64,
    eps: f64,
}

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "albef-adamw"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, g: &CpuStorage, g_l: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (dst, g) else {
            candle_core::bail!("adamw: f32 parameters and gradients only")
        };
        let (Some((p0, p1)), Some((g0, g1))) = (dst_l.contiguous_offsets(), g_l.contiguous_offsets()) else {
            candle_core::bail!("adamw: parameter and gradient must be contiguous")
        };
        let (p, g) = (&mut p[p0..p1], &g[g0..g1]);
        let (mut m, mut v) = (self.m.borrow_mut(), self.v.borrow_mut());
        // The same f32 arithmetic, in the same order, as the tensor form below (a factor of 1
        // where there is no decay changes no value).
        let k = Coefficients {
            decay: if self.weight_decay > 0.0 { (1.0 - self.lr * self.weight_decay) as f32 } else { 1.0 },
            b1: self.beta1 as f32,
            one_b1: (1.0 - self.beta1) as f32,
            b2: self.beta2 as f32,
            one_b2: (1.0 - self.beta2) as f32,
            inv_bc2: (1.0 / self.bc2_sqrt) as f32,
            eps: self.eps as f32,
            step: (self.lr / self.bc1) as f32,
        };
        const CHUNK: usize = 1 << 14;
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((p, g), (m, v))| adamw_chunk(p, g, m, v, k));
        Ok(())
    }
}

pub struct AdamW {
    slots: Vec<Slot>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// Optimizer steps taken (PyTorch keeps one per parameter; all move together here).
    pub step: u64,
}

pub fn decays(name: &str, rank: usize) -> bool {
    !(rank == 1 || name.ends_with(".bias"))
}

impl AdamW {
    /// Over the trainable parameters of `store` (torch defaults: betas (0.9, 0.999), eps 1e-8).
    pub fn new(store: &ParamStore, weight_decay: f64) -> Result<Self> {
        let slots = store
            .trainable()
            .into_iter()
            .map(|p| {
                let wd = if decays(&p.name, p.var.rank()) { weight_decay } else { 0.0 };
                Slot::new(p.name, p.var, wd)
            })
            .collect::<Result<_>>()?;
        Ok(Self { slots, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: 0 })
    }

    /// The parameters this optimizer updates, in a fixed order.
    pub fn vars(&self) -> Vec<Var> {
        self.slots.iter().map(|s| s.var.clone()).collect()
    }

    /// The global L2 norm of the gradients of this optimizer's parameters (one device sync).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut total: Option<Tensor> = None;
        for s in &self.slots {
            if let Some(g) = grads.get(&s.var) {
                let sq = g.detach().to_dtype(candle_core::DType::F32)?.sqr()?.sum_all()?;
                total = Some(match total {
                    None => sq,
                    Some(t) => (t + sq)?,
                });
            }
        }
        Ok(total.map_or(Ok(0.0), |t| t.to_scalar::<f32>().map(|v| (v as f64).sqrt()))?)
    }

    /// Adds the gradients of this optimizer's parameters in `grads` to `sum` (gradient
    /// accumulation); the rest of `grads` (activations') is dropped with it.
    pub fn accumulate(&self, sum: &mut Option<GradStore>, grads: GradStore) -> Result<()> {
        let acc = sum.get_or_insert_with(GradStore::default);
        for s in &self.slots {
            let Some(g) = grads.get(&s.var) else { continue };
            let g = g.detach();
            let total = match acc.get(&s.var) {
                Some(prev) => (prev + &g)?,
                None => g,
            };
            acc.insert(&s.var, total);
        }
        Ok(())
    }

    /// This optimizer's parameter gradients in `grads`, times `scale`.
    pub fn scaled(&self, grads: &GradStore, scale: f64) -> Result<GradStore> {
        let mut out = GradStore::default();
        for s in &self.slots {
            if let Some(g) = grads.get(&s.var) {
                out.insert(&s.var, (g * scale)?);
            }
        }
        Ok(out)
    }

    /// One update with learning rate `lr`; parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        profile::time(Kind::AdamW, || self.step_inner(grads, lr))
    }

    fn step_inner(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
        for s in &mut self.slots {
            // Gradients carry the forward graph; keeping them in the moments would keep every
            // step's graph alive.
            let Some(g) = grads.get(&s.var).map(|g| g.detach()) else {
                continue;
            };
            match &mut s.moments {
                Moments::Host { m, v } => {
                    let update = Update {
                        m: RefCell::new(m),
                        v: RefCell::new(v),
                        lr,
                        weight_decay: s.weight_decay,
                        beta1: b1,
                        beta2: b2,
                        bc1,
                        bc2_sqrt,
                        eps: self.eps,
                    };
                    s.var.as_tensor().inplace_op2(&g.contiguous()?, &update)?;
                }
                Moments::Device { m, v } => {
                    let p = s.var.as_tensor().detach();
                    let p = if s.weight_decay > 0.0 { (p * (1.0 - lr * s.weight_decay))? } else { p };
                    *m = ((&*m * b1)? + (&g * (1.0 - b1))?)?;
                    *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                    let denom = ((v.sqrt()? / bc2_sqrt)? + self.eps)?;
                    let update = (m.div(&denom)? * (lr / bc1))?;
                    s.var.set(&(p - update)?)?;
                }
            }
        }
        Ok(())
    }

    /// `optimizer.m.<param>` / `optimizer.v.<param>` tensors for a checkpoint.
    pub fn state(&self) -> Result<StateDict> {
        let mut sd = StateDict::new();
        for s in &self.slots {
            let (m, v) = s.tensors()?;
            sd.insert(format!("optimizer.m.{}", s.name), m);
            sd.insert(format!("optimizer.v.{}", s.name), v);
        }
        Ok(sd)
    }

    pub fn load_state(&mut self, sd: &StateDict, step: u64) -> Result<()> {
        for s in &mut self.slots {
            let get = |which: &str| {
                sd.get(&format!("optimizer.{which}.{}", s.name))
                    .with_context(|| format!("checkpoint has no optimizer state for {}", s.name))
            };
            let (m, v) = (get("m")?.clone(), get("v")?.clone());
            s.set(&m, &v)?;
        }
        self.step = step;
        Ok(())
    }

    pub fn groups(&self) -> (usize, usize) {
        let decayed = self.slots.iter().filter(|s| s.weight_decay > 0.0).count();
        (self.slots.len() - decayed, decayed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Init;
    use candle_core::Device;

    #[test]
    fn matches_torch_adamw_by_hand() {
        let store = ParamStore::new(&Device::Cpu, 0);
        let pb = store.root(true);
        let w = pb.get((1, 2), "w", Init::Const(1.0)).unwrap();
        let b = pb.get(2, "lin.bias", Init::Const(1.0)).unwrap();
        let mut opt = AdamW::new(&store, 0.1).unwrap();
        assert_eq!(opt.groups(), (1, 1));
        let loss = (w.sum_all().unwrap() * 2.0).unwrap().add(&b.sum_all().unwrap()).unwrap();
        opt.step(&loss.backward().unwrap(), 0.01).unwrap();
        // Step 1: m̂ = g, v̂ = g², update = lr·g/(|g| + eps) ≈ lr; decay only on w.
        let w1 = store.get("w").unwrap().as_tensor().to_vec2::<f32>().unwrap()[0][0];
        let b1 = store.get("lin.bias").unwrap().as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((w1 - (1.0 * (1.0 - 0.01 * 0.1) - 0.01)).abs() < 1e-6, "{w1}");
        assert!((b1 - (1.0 - 0.01)).abs() < 1e-6, "{b1}");
    }
}
