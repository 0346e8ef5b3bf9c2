//! The GPU backend: NCCL through cudarc (candle's `nccl` feature). Tensors stay on the device;
//! rank 0 creates the NCCL unique id and hands it to the others over the TCP rendezvous, which
//! also carries the small byte collectives (epoch figures, results to merge, run state).

use super::comm::Communicator;
use super::tcp::TcpCommunicator;
use super::{Timeouts, World};
use anyhow::{anyhow, bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use std::sync::Mutex;

/// cudarc's `Comm` holds a raw NCCL handle; it is used by one thread at a time (behind the mutex).
struct Handle(Comm);
unsafe impl Send for Handle {}

pub struct NcclCommunicator {
    nccl: Mutex<Handle>,
    side: TcpCommunicator,
}

impl std::fmt::Debug for NcclCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclCommunicator(rank {} of {})", self.side.rank(), self.side.world_size())
    }
}

impl NcclCommunicator {
    /// Joins the TCP rendezvous, passes rank 0's NCCL id to every rank, and opens the NCCL
    /// communicator on `device`'s stream.
    pub fn init(world: &World, device: &Device, timeouts: Timeouts) -> Result<super::Comm> {
        let Device::Cuda(dev) = device else { bail!("the NCCL backend needs a CUDA device, not {device:?}") };
        let side = TcpCommunicator::init(world, timeouts)?;
        let mine: Vec<u8> = if world.rank == 0 {
            let id = Id::new().map_err(|e| anyhow!("cannot create the NCCL unique id: {e:?}"))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let bytes = side.broadcast_bytes(&mine, 0)?;
        if bytes.len() != 128 {
            bail!("rank 0 sent an NCCL id of {} bytes (128 expected)", bytes.len());
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, b) in internal.iter_mut().zip(&bytes) {
            *d = *b as std::ffi::c_char;
        }
        let comm =
            Comm::from_rank(dev.cuda_stream(), world.rank, world.world_size, Id::uninit(internal)).map_err(|e| {
                anyhow!(
                    "rank {} of {}: NCCL initialisation failed on {device:?}: {e:?} (NCCL_DEBUG=INFO tells more)",
                    world.rank,
                    world.world_size
                )
            })?;
        Ok(std::sync::Arc::new(Self { nccl: Mutex::new(Handle(comm)), side }))
    }

    fn run(&self, t: &Tensor, op: Collective) -> Result<Tensor> {
        let handle = self.nccl.lock().map_err(|_| anyhow!("a thread panicked inside an NCCL collective"))?;
        let t = t.contiguous()?;
        Ok(t.apply_op1_no_bwd(&NcclOp { comm: &handle.0, op })?)
    }
}

#[derive(Clone, Copy)]
enum Collective {
    AllReduceSum,
    AllGather,
    Broadcast(usize),
}

struct NcclOp<'a> {
    comm: &'a Comm,
    op: Collective,
}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("NCCL {what} failed: {e:?}"))
}

impl NcclOp<'_> {
    fn typed<T: CudaDType + DeviceRepr + NcclType>(
        &self,
        s: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("NCCL collectives take contiguous tensors")
        };
        let dev = s.device().clone();
        let src = s.as_cuda_slice::<T>()?.slice(start..end);
        let n = end - start;
        let world = self.comm.world_size();
        let (out, shape) = match self.op {
            Collective::AllReduceSum => {
                let mut dst = unsafe { dev.alloc::<T>(n)? };
                self.comm.all_reduce(&src, &mut dst, &ReduceOp::Sum).map_err(|e| nccl_error("all_reduce", e))?;
                (dst, l.shape().clone())
            }
            Collective::AllGather => {
                let mut dst = unsafe { dev.alloc::<T>(n * world)? };
                self.comm.all_gather(&src, &mut dst).map_err(|e| nccl_error("all_gather", e))?;
                let mut dims = l.dims().to_vec();
                if dims.is_empty() {
                    dims.push(1);
                }
                dims[0] *= world;
                (dst, Shape::from(dims))
            }
            Collective::Broadcast(root) => {
                let mut dst = unsafe { dev.alloc::<T>(n)? };
                let send = (self.comm.rank() == root).then_some(&src);
                self.comm.broadcast(send, &mut dst, root as i32).map_err(|e| nccl_error("broadcast", e))?;
                (dst, l.shape().clone())
            }
        };
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
    }
}

impl CustomOp1 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives take CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        match s.dtype() {
            DType::F32 => self.typed::<f32>(s, l),
            DType::F64 => self.typed::<f64>(s, l),
            DType::I64 => self.typed::<i64>(s, l),
            DType::U32 => self.typed::<u32>(s, l),
            DType::U8 => self.typed::<u8>(s, l),
            other => candle_core::bail!("no NCCL collective for {other:?} tensors"),
        }
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.side.rank()
    }

    fn world_size(&self) -> usize {
        self.side.world_size()
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if t.dtype() != DType::F32 {
            bail!("all_reduce_sum takes f32 tensors, not {:?}", t.dtype());
        }
        if !t.device().is_cuda() {
            return self.side.all_reduce_sum(t);
        }
        self.run(t, Collective::AllReduceSum)
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        if !t.device().is_cuda() {
            return self.side.all_gather(t);
        }
        self.run(t, Collective::AllGather)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if !t.device().is_cuda() {
            return self.side.broadcast(t, root);
        }
        self.run(t, Collective::Broadcast(root))
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.side.all_gather_bytes(bytes)
    }

    fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Result<Vec<u8>> {
        self.side.broadcast_bytes(bytes, root)
    }

    fn barrier(&self) -> Result<()> {
        self.side.barrier()
    }
}
