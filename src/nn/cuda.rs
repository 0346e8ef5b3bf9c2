//! CUDA kernels of the fused ops (softmax, log-softmax, LayerNorm over the last dimension), in
//! f32: these ops compute in f32 whatever their input (a bf16 input is widened first, as
//! autocast runs them), so f32 kernels serve both precisions. Compiled with NVRTC at the first
//! use (the GPU machine's `libnvrtc`), one thread block per row. Their backward passes are the
//! ops' `bwd`, tensor ops that run on the device. `albef selftest --device cuda` checks them
//! against the composed forms; nothing here can run without a GPU.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, Layout, Result, Shape};
use std::sync::OnceLock;

const THREADS: u32 = 256;

const SOURCE: &str = r#"
#define NEG_INF (-__int_as_float(0x7f800000))

// Block-wide reductions over THREADS (a power of two) values in shared memory.
__device__ float block_max(float v, float* buf) {
    buf[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) buf[threadIdx.x] = fmaxf(buf[threadIdx.x], buf[threadIdx.x + s]);
        __syncthreads();
    }
    float r = buf[0];
    __syncthreads();
    return r;
}

__device__ float block_sum(float v, float* buf) {
    buf[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
        __syncthreads();
    }
    float r = buf[0];
    __syncthreads();
    return r;
}

__device__ double block_sum_f64(double v, double* buf) {
    buf[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
        __syncthreads();
    }
    double r = buf[0];
    __syncthreads();
    return r;
}

// Softmax (log_out = 0) or log-softmax (log_out = 1) of each row, max-subtracted.
extern "C" __global__ void albef_softmax(const float* x, float* y, int cols, int log_out) {
    extern __shared__ float fbuf[];
    const float* xr = x + (size_t)blockIdx.x * cols;
    float* yr = y + (size_t)blockIdx.x * cols;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) m = fmaxf(m, xr[j]);
    m = block_max(m, fbuf);
    float s = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) s += expf(xr[j] - m);
    s = block_sum(s, fbuf);
    if (log_out) {
        float ls = logf(s);
        for (int j = threadIdx.x; j < cols; j += blockDim.x) yr[j] = xr[j] - m - ls;
    } else {
        float inv = 1.0f / s;
        for (int j = threadIdx.x; j < cols; j += blockDim.x) yr[j] = expf(xr[j] - m) * inv;
    }
}

// LayerNorm of each row: two passes as PyTorch (mean, then the biased variance of the centred
// values), accumulated in f64 as the CPU kernel does.
extern "C" __global__ void albef_layer_norm(const float* x, const float* w, const float* b, float* y, int cols, double eps) {
    extern __shared__ double dbuf[];
    const float* xr = x + (size_t)blockIdx.x * cols;
    float* yr = y + (size_t)blockIdx.x * cols;
    double s = 0.0;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) s += (double)xr[j];
    double mean = block_sum_f64(s, dbuf) / cols;
    double v = 0.0;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) { double d = (double)xr[j] - mean; v += d * d; }
    double var = block_sum_f64(v, dbuf) / cols;
    double inv = 1.0 / sqrt(var + eps);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) yr[j] = (float)(((double)xr[j] - mean) * inv) * w[j] + b[j];
}
"#;

/// The PTX of [`SOURCE`], compiled once per process.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let compiled = PTX.get_or_init(|| {
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(SOURCE)
            .map(|p| p.to_src())
            .map_err(|e| format!("compiling albef's CUDA kernels with NVRTC: {e}"))
    });
    compiled.as_deref().map_err(|e| candle_core::Error::Msg(e.clone()))
}

fn rows_cols(l: &Layout) -> (usize, usize) {
    let cols = l.shape().dims().last().copied().unwrap_or(1).max(1);
    (l.shape().elem_count() / cols, cols)
}

fn view<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
    let slice = s.as_cuda_slice::<f32>().map_err(|_| candle_core::Error::Msg(format!("fused {what}: only f32")))?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => candle_core::bail!("fused {what}: input must be contiguous"),
    }
}

fn config(rows: usize, shared_bytes_per_thread: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: THREADS * shared_bytes_per_thread,
    }
}

/// Softmax or log-softmax over the last dimension.
pub fn softmax(s: &CudaStorage, l: &Layout, log: bool) -> Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let (rows, cols) = rows_cols(l);
    let x = view(s, l, "softmax")?;
    // SAFETY: every element is written by the kernel.
    let y = unsafe { dev.alloc::<f32>(rows * cols)? };
    let f = dev.get_or_load_custom_func("albef_softmax", "albef_fused", ptx()?)?;
    let mut b = f.builder();
    b.arg(&x);
    b.arg(&y);
    candle_core::builder_arg!(b, cols as i32, log as i32);
    // SAFETY: the arguments match the kernel's signature.
    unsafe { b.launch(config(rows, 4)) }.w()?;
    drop(b);
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l.shape().clone()))
}

/// LayerNorm over the last dimension with weight and bias.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (rows, cols) = rows_cols(l1);
    let (x, w, bias) = (view(s1, l1, "layer norm")?, view(s2, l2, "layer norm")?, view(s3, l3, "layer norm")?);
    if w.len() != cols || bias.len() != cols {
        candle_core::bail!("fused layer norm: weight and bias must have {cols} elements")
    }
    // SAFETY: every element is written by the kernel.
    let y = unsafe { dev.alloc::<f32>(rows * cols)? };
    let f = dev.get_or_load_custom_func("albef_layer_norm", "albef_fused", ptx()?)?;
    let mut b = f.builder();
    b.arg(&x);
    b.arg(&w);
    b.arg(&bias);
    b.arg(&y);
    candle_core::builder_arg!(b, cols as i32, eps);
    // SAFETY: the arguments match the kernel's signature.
    unsafe { b.launch(config(rows, 8)) }.w()?;
    drop(b);
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l1.shape().clone()))
}
