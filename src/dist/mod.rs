//! Data-parallel runs over several processes (`utils.init_distributed_mode` and DDP in the
//! reference): which process this is ([`World`], read from torchrun's or SLURM's variables), the
//! [`Communicator`] that joins the processes (NCCL on GPUs, TCP otherwise), and `albef launch`.
//!
//! One process without those variables is world size 1 and has no communicator at all: every
//! collective is skipped, and the code paths are those of a plain single-process run.

pub mod comm;
pub mod launch;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod tcp;

pub use comm::{Comm, Communicator};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::time::Duration;

/// torch's default `MASTER_PORT`.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// This process's place among the processes of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub world_size: usize,
    /// The GPU of this process on its node (`cuda:LOCAL_RANK`).
    pub local_rank: usize,
    /// Where rank 0 listens for the others (the rendezvous).
    pub master_addr: String,
    pub master_port: u16,
    /// Which variables it came from (for messages).
    pub source: &'static str,
}

/// How long the processes wait for each other.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// For every rank to join the rendezvous (`ALBEF_RENDEZVOUS_TIMEOUT`, seconds; default 300).
    pub rendezvous: Duration,
    /// For a peer's part of one collective (`ALBEF_DIST_TIMEOUT`, seconds; default 1800, torch's
    /// process-group default): a peer silent for longer is taken as hung.
    pub op: Duration,
}

impl Timeouts {
    pub fn from_env() -> Result<Self> {
        let secs = |name: &str, default: u64| -> Result<Duration> {
            match std::env::var(name) {
                Err(_) => Ok(Duration::from_secs(default)),
                Ok(v) => {
                    let s: f64 =
                        v.trim().parse().with_context(|| format!("{name}={v:?} is not a number of seconds"))?;
                    if !(s > 0.0 && s.is_finite()) {
                        bail!("{name}={v:?} must be a positive number of seconds");
                    }
                    Ok(Duration::from_secs_f64(s))
                }
            }
        };
        Ok(Self { rendezvous: secs("ALBEF_RENDEZVOUS_TIMEOUT", 300)?, op: secs("ALBEF_DIST_TIMEOUT", 1800)? })
    }
}

impl World {
    /// The world described by this process's environment; `None` without torchrun's or SLURM's
    /// variables, or when `distributed` is false (`--distributed False`).
    pub fn from_env(distributed: bool) -> Result<Option<World>> {
        Self::from_vars(|k| std::env::var(k).ok(), distributed)
    }

    /// As [`World::from_env`], with the variables from `get`. As `init_distributed_mode`:
    /// `RANK` + `WORLD_SIZE` (+ `LOCAL_RANK`) first, then `SLURM_PROCID` (+ `SLURM_NTASKS`,
    /// `SLURM_LOCALID`); `MASTER_ADDR` / `MASTER_PORT` name the rendezvous in both cases.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>, distributed: bool) -> Result<Option<World>> {
        let num = |name: &str| -> Result<Option<usize>> {
            get(name)
                .map(|v| {
                    v.trim().parse::<usize>().with_context(|| format!("{name}={v:?} is not a non-negative integer"))
                })
                .transpose()
        };
        let (rank, world_size, local_rank, source) =
            if let (Some(rank), Some(world)) = (num("RANK")?, num("WORLD_SIZE")?) {
                (rank, world, num("LOCAL_RANK")?, "RANK/WORLD_SIZE")
            } else if let Some(rank) = num("SLURM_PROCID")? {
                let world = num("SLURM_NTASKS")?.context("SLURM_PROCID is set but SLURM_NTASKS is not")?;
                (rank, world, num("SLURM_LOCALID")?, "SLURM_PROCID/SLURM_NTASKS")
            } else {
                return Ok(None);
            };
        if !distributed {
            eprintln!("--distributed False: {source} ignored, one process on one device");
            return Ok(None);
        }
        if world_size == 0 {
            bail!("the world size ({source}) is 0");
        }
        if rank >= world_size {
            bail!("rank {rank} is not below the world size {world_size} ({source})");
        }
        let master_addr = match get("MASTER_ADDR") {
            Some(a) if !a.trim().is_empty() => a.trim().to_string(),
            _ if world_size == 1 => "127.0.0.1".to_string(),
            _ => bail!(
                "rank {rank} of {world_size} ({source}): MASTER_ADDR is not set; set it to the host of rank 0 \
                 (under SLURM, e.g. `export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1)`)"
            ),
        };
        let master_port = match get("MASTER_PORT") {
            None => DEFAULT_MASTER_PORT,
            Some(p) => p.trim().parse::<u16>().with_context(|| format!("MASTER_PORT={p:?} is not a port number"))?,
        };
        Ok(Some(World { rank, world_size, local_rank: local_rank.unwrap_or(rank), master_addr, master_port, source }))
    }

    pub fn is_primary(&self) -> bool {
        self.rank == 0
    }

    /// `host:port` of the rendezvous.
    pub fn master(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

/// The reference's `--distributed` (default true): `True`/`False` (any case), `1`/`0`.
pub fn parse_distributed_flag(value: Option<&str>) -> Result<bool> {
    match value.map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(true),
        Some(v) if ["true", "1", "yes"].contains(&v.as_str()) => Ok(true),
        Some(v) if ["false", "0", "no"].contains(&v.as_str()) => Ok(false),
        Some(v) => bail!("--distributed {v:?}: expected True or False"),
    }
}

/// The device of this process: `cuda` without an ordinal becomes `cuda:LOCAL_RANK` (each process
/// its own GPU, as `torch.cuda.set_device(args.gpu)`).
pub fn device_name(requested: &str, world: Option<&World>) -> String {
    match world {
        Some(w) if requested == "cuda" => format!("cuda:{}", w.local_rank),
        _ => requested.to_string(),
    }
}

/// Joins the processes of `world`: NCCL when the device is a GPU and albef was built with the
/// `nccl` feature, TCP through rank 0 otherwise. Rank 0 listens at `MASTER_ADDR:MASTER_PORT`.
pub fn init(world: &World, device: &Device) -> Result<Comm> {
    let timeouts = Timeouts::from_env()?;
    if device.is_cuda() {
        #[cfg(feature = "nccl")]
        {
            return nccl::NcclCommunicator::init(world, device, timeouts);
        }
        #[cfg(not(feature = "nccl"))]
        eprintln!(
            "warning: this albef was built without the `nccl` feature: gradients travel through the CPU over TCP \
             (build with --features nccl for NCCL)"
        );
    }
    Ok(std::sync::Arc::new(tcp::TcpCommunicator::init(world, timeouts)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world(vars: &[(&str, &str)], distributed: bool) -> Result<Option<World>> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        World::from_vars(|k| map.get(k).cloned(), distributed)
    }

    #[test]
    fn discovery_from_torchrun_and_slurm() {
        assert_eq!(world(&[], true).unwrap(), None);
        let w = world(
            &[
                ("RANK", "3"),
                ("WORLD_SIZE", "8"),
                ("LOCAL_RANK", "1"),
                ("MASTER_ADDR", "node0"),
                ("MASTER_PORT", "1234"),
            ],
            true,
        )
        .unwrap()
        .unwrap();
        assert_eq!((w.rank, w.world_size, w.local_rank, w.master().as_str()), (3, 8, 1, "node0:1234"));
        assert_eq!(device_name("cuda", Some(&w)), "cuda:1");
        assert_eq!(device_name("cuda:5", Some(&w)), "cuda:5");
        let s =
            world(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "16"), ("SLURM_LOCALID", "5"), ("MASTER_ADDR", "n")], true)
                .unwrap()
                .unwrap();
        assert_eq!((s.rank, s.world_size, s.local_rank, s.master_port), (5, 16, 5, DEFAULT_MASTER_PORT));
        // --distributed False: one process whatever the environment says.
        assert_eq!(world(&[("RANK", "0"), ("WORLD_SIZE", "2")], false).unwrap(), None);
        let e = world(&[("RANK", "1"), ("WORLD_SIZE", "2")], true).unwrap_err().to_string();
        assert!(e.contains("MASTER_ADDR"), "{e}");
        let e = world(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a")], true).unwrap_err().to_string();
        assert!(e.contains("rank 2 is not below the world size 2"), "{e}");
        let e = world(&[("RANK", "x"), ("WORLD_SIZE", "2")], true).unwrap_err().to_string();
        assert!(e.contains("RANK=\"x\""), "{e}");
        assert!(!parse_distributed_flag(Some("False")).unwrap());
        assert!(parse_distributed_flag(Some("True")).unwrap());
        assert!(parse_distributed_flag(None).unwrap());
        assert!(parse_distributed_flag(Some("maybe")).is_err());
    }
}
