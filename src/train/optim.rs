//! AdamW with the reference's two parameter groups (`optim/optim_factory.py`): no weight decay
//! for 1-D tensors and biases, `weight_decay` for everything else (0-D `temp` included).

use crate::checkpoint::StateDict;
use crate::nn::ParamStore;
use anyhow::{Context, Result};
use candle_core::{backprop::GradStore, Tensor, Var};

struct Slot {
    name: String,
    var: Var,
    weight_decay: f64,
    m: Tensor,
    v: Tensor,
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
                let zeros = p.var.as_tensor().zeros_like()?;
                let wd = if decays(&p.name, p.var.rank()) { weight_decay } else { 0.0 };
                Ok(Slot { name: p.name, var: p.var, weight_decay: wd, m: zeros.clone(), v: zeros })
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
            let p = s.var.as_tensor().detach();
            let p = if s.weight_decay > 0.0 { (p * (1.0 - lr * s.weight_decay))? } else { p };
            s.m = ((&s.m * b1)? + (&g * (1.0 - b1))?)?;
            s.v = ((&s.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((s.v.sqrt()? / bc2_sqrt)? + self.eps)?;
            let update = (s.m.div(&denom)? * (lr / bc1))?;
            s.var.set(&(p - update)?)?;
        }
        Ok(())
    }

    /// `optimizer.m.<param>` / `optimizer.v.<param>` tensors for a checkpoint.
    pub fn state(&self) -> StateDict {
        let mut sd = StateDict::new();
        for s in &self.slots {
            sd.insert(format!("optimizer.m.{}", s.name), s.m.clone());
            sd.insert(format!("optimizer.v.{}", s.name), s.v.clone());
        }
        sd
    }

    pub fn load_state(&mut self, sd: &StateDict, step: u64) -> Result<()> {
        for s in &mut self.slots {
            s.m = sd
                .get(&format!("optimizer.m.{}", s.name))
                .with_context(|| format!("checkpoint has no optimizer state for {}", s.name))?
                .clone();
            s.v = sd
                .get(&format!("optimizer.v.{}", s.name))
                .with_context(|| format!("checkpoint has no optimizer state for {}", s.name))?
                .clone();
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
