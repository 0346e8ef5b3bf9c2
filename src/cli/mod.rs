//! Subcommand implementations.

pub mod bench;
pub mod checkpoint;
pub mod compare;
pub mod data;
pub mod demo;
pub mod search;
pub mod selftest;
pub mod serve;
pub mod tasks;

use anyhow::{bail, Result};
use candle_core::Device;

/// `--device cpu|cuda|cuda:N`.
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        n if n.starts_with("cuda") => {
            let ordinal = n.strip_prefix("cuda:").map(|i| i.parse::<usize>()).transpose()?.unwrap_or(0);
            if !cfg!(feature = "cuda") {
                bail!("--device {n}: this albef was built without CUDA (rebuild with `cargo build --release --features cuda`)");
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        other => bail!("unknown --device {other:?} (cpu, cuda, cuda:N)"),
    }
}
