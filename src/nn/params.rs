//! A named, ordered store of parameters (candle `Var`s), built up by the model constructors.
//!
//! Names are the reference's `state_dict` names, so checkpoints map onto the store one to one.
//! A parameter asked for twice under the same name is the same `Var` (that is how weight tying
//! is expressed); `alias` records other names under which a checkpoint stores a shared tensor.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// How a new parameter is initialised (the reference's `_init_weights`).
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Zeros,
    Ones,
    Const(f64),
    /// Normal(0, std) (BERT, and timm's trunc_normal at std 0.02, which truncates at ±2 — i.e.
    /// ±100σ, so never in practice).
    Normal(f64),
    /// Standard normal, L2-normalised along dim 0 (the ITC queues).
    NormalizedColumns,
    /// Normal(0, the store's `init_std`): 0.02 as BERT and timm use, unless the config says
    /// otherwise (small models trained from scratch need a larger one).
    Standard,
}

#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub var: Var,
    pub trainable: bool,
}

#[derive(Debug)]
struct Inner {
    params: Vec<Param>,
    index: HashMap<String, usize>,
    aliases: Vec<(String, String)>,
    buffers: Vec<(String, Var)>,
    rng: StdRng,
    init_std: f64,
    mode: StoreMode,
}

/// How a store's tensors are made and handed out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreMode {
    /// Parameters come back detached, so a forward pass records no autograd graph (which would
    /// keep every intermediate activation alive as long as its outputs): evaluation only.
    pub inference: bool,
    /// Every tensor is zero-filled memory that is never written (the OS maps no pages for it) and
    /// random initialisation is skipped: a model of the right names and shapes at almost no
    /// memory, for key reports (`checkpoint inspect --task`). Not for running.
    pub placeholders: bool,
}

/// All parameters and buffers of one model, in construction order.
#[derive(Clone, Debug)]
pub struct ParamStore {
    inner: Rc<RefCell<Inner>>,
    device: Device,
}

impl ParamStore {
    pub fn new(device: &Device, seed: u64) -> Self {
        let inner = Inner {
            params: Vec::new(),
            index: HashMap::new(),
            aliases: Vec::new(),
            buffers: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            init_std: 0.02,
            mode: StoreMode::default(),
        };
        Self { inner: Rc::new(RefCell::new(inner)), device: device.clone() }
    }

    /// Sets the standard deviation of [`Init::Standard`] for parameters created from now on.
    pub fn set_init_std(&self, std: f64) {
        self.inner.borrow_mut().init_std = std;
    }

    /// Sets how tensors created from now on are made (call before building the model).
    pub fn set_mode(&self, mode: StoreMode) {
        self.inner.borrow_mut().mode = mode;
    }

    pub fn mode(&self) -> StoreMode {
        self.inner.borrow().mode
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn root(&self, trainable: bool) -> ParamBuilder {
        ParamBuilder { store: self.clone(), prefix: String::new(), trainable }
    }

    pub fn params(&self) -> Vec<Param> {
        self.inner.borrow().params.clone()
    }

    pub fn trainable(&self) -> Vec<Param> {
        self.params().into_iter().filter(|p| p.trainable).collect()
    }

    pub fn get(&self, name: &str) -> Option<Var> {
        let inner = self.inner.borrow();
        if let Some(&i) = inner.index.get(name) {
            return Some(inner.params[i].var.clone());
        }
        if let Some((_, v)) = inner.buffers.iter().find(|(n, _)| n == name) {
            return Some(v.clone());
        }
        inner
            .aliases
            .iter()
            .find(|(a, _)| a == name)
            .and_then(|(_, t)| inner.index.get(t).map(|&i| inner.params[i].var.clone()))
    }

    /// `(alias, canonical)` pairs: names under which a checkpoint stores a shared parameter.
    pub fn aliases(&self) -> Vec<(String, String)> {
        self.inner.borrow().aliases.clone()
    }

    pub fn add_alias(&self, alias: &str, canonical: &str) {
        self.inner.borrow_mut().aliases.push((alias.to_string(), canonical.to_string()));
    }

    pub fn buffers(&self) -> Vec<(String, Var)> {
        self.inner.borrow().buffers.clone()
    }

    /// Every named tensor a checkpoint of this model holds: parameters, then buffers.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let inner = self.inner.borrow();
        let mut out: Vec<(String, Tensor)> =
            inner.params.iter().map(|p| (p.name.clone(), p.var.as_tensor().clone())).collect();
        out.extend(inner.buffers.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())));
        out
    }

    /// Whether every float parameter and buffer is finite (one device sync: NaN and inf
    /// survive a sum of absolute values).
    pub fn all_finite(&self) -> candle_core::Result<bool> {
        let mut total: Option<Tensor> = None;
        for (_, t) in self.named_tensors() {
            if !t.dtype().is_float() {
                continue;
            }
            let s = t.to_dtype(DType::F32)?.abs()?.sum_all()?;
            total = Some(match total {
                None => s,
                Some(acc) => (acc + s)?,
            });
        }
        total.map_or(Ok(true), |t| t.to_scalar::<f32>().map(f32::is_finite))
    }

    /// A new variable, built in place from its values (no second copy).
    fn make(&self, shape: &Shape, init: Init, dtype: DType) -> Result<Var> {
        if self.mode().placeholders {
            return Var::zeros(shape, dtype, &self.device);
        }
        let n = shape.elem_count();
        let mut inner = self.inner.borrow_mut();
        let init = match init {
            Init::Standard => Init::Normal(inner.init_std),
            other => other,
        };
        let data: Vec<f32> = match init {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Const(c) => vec![c as f32; n],
            Init::Normal(std) => {
                let dist = Normal::new(0.0f32, std as f32).expect("valid std");
                (0..n).map(|_| dist.sample(&mut inner.rng)).collect()
            }
            Init::Standard => unreachable!("resolved above"),
            Init::NormalizedColumns => {
                let dims = shape.dims();
                let (rows, cols) = (dims[0], n / dims[0].max(1));
                let mut v: Vec<f32> = (0..n).map(|_| inner.rng.sample::<f32, _>(rand_distr::StandardNormal)).collect();
                for c in 0..cols {
                    let norm = (0..rows).map(|r| v[r * cols + c].powi(2)).sum::<f32>().sqrt().max(1e-12);
                    for r in 0..rows {
                        v[r * cols + c] /= norm;
                    }
                }
                v
            }
        };
        drop(inner);
        match dtype {
            DType::F32 => Var::from_vec(data, shape.clone(), &self.device),
            _ => Var::from_tensor(&Tensor::from_vec(data, shape.clone(), &self.device)?.to_dtype(dtype)?),
        }
    }
}

/// A view of a [`ParamStore`] under a name prefix (like candle's `VarBuilder`).
#[derive(Clone, Debug)]
pub struct ParamBuilder {
    store: ParamStore,
    prefix: String,
    trainable: bool,
}

impl ParamBuilder {
    pub fn pp(&self, name: impl AsRef<str>) -> Self {
        Self { store: self.store.clone(), prefix: self.path(name.as_ref()), trainable: self.trainable }
    }

    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    /// The parameter `prefix.name`, created with `init` on first use. Frozen (momentum) parameters
    /// come back detached, so no gradient is ever computed for them.
    pub fn get(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Tensor> {
        let shape = shape.into();
        let full = self.path(name);
        let existing = {
            let inner = self.store.inner.borrow();
            inner.index.get(&full).map(|&i| inner.params[i].clone())
        };
        let param = match existing {
            Some(p) => {
                if p.var.shape() != &shape {
                    candle_core::bail!("parameter {full} requested as {shape:?} but exists as {:?}", p.var.shape())
                }
                p
            }
            None => {
                let var = self.store.make(&shape, init, DType::F32)?;
                let p = Param { name: full.clone(), var, trainable: self.trainable };
                let mut inner = self.store.inner.borrow_mut();
                let i = inner.params.len();
                inner.params.push(p.clone());
                inner.index.insert(full, i);
                p
            }
        };
        let tracked = param.trainable && !self.store.mode().inference;
        Ok(if tracked { param.var.as_tensor().clone() } else { param.var.as_tensor().detach() })
    }

    /// A non-trainable tensor saved with the model (queues, pointers).
    pub fn buffer(&self, shape: impl Into<Shape>, name: &str, dtype: DType, init: Init) -> Result<Var> {
        let shape = shape.into();
        let var = self.store.make(&shape, init, dtype)?;
        self.store.inner.borrow_mut().buffers.push((self.path(name), var.clone()));
        Ok(var)
    }
}
