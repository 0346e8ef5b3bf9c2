//! Small heads on top of the encoders.

use crate::nn::{Linear, ParamBuilder};
use candle_core::{Result, Tensor};

/// `nn.Sequential(Linear(D, D), ReLU, Linear(D, n))`: the VE and NLVR2 classifier
/// (keys `cls_head.0.*`, `cls_head.2.*`).
#[derive(Clone, Debug)]
pub struct ClsHead {
    fc: Linear,
    out: Linear,
}

impl ClsHead {
    pub fn new(pb: &ParamBuilder, dim: usize, classes: usize) -> Result<Self> {
        Ok(Self { fc: Linear::new(&pb.pp("0"), dim, dim)?, out: Linear::new(&pb.pp("2"), dim, classes)? })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.fc.forward(x)?.relu()?)
    }
}

/// The CLS token of a (B, L, D) sequence: (B, D).
pub fn cls(x: &Tensor) -> Result<Tensor> {
    x.narrow(1, 0, 1)?.squeeze(1)
}
