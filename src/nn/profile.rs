//! Where the time goes: seconds spent per kind of op, forward and backward apart, for
//! `albef bench`. Off by default (one relaxed atomic load per op); the CPU kernels in `nn`
//! report into it, and the optimizer and the EMA too.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Every product through `gemm`: linear layers, attention scores and context.
    Matmul,
    /// Attention's fused ops: scores + mask + softmax, and the image encoder's whole
    /// self-attention (scores, softmax, context) and its backward.
    Attention,
    Softmax,
    LayerNorm,
    Gelu,
    Dropout,
    AdamW,
    Ema,
}

const KINDS: [Kind; 8] =
    [Kind::Matmul, Kind::Attention, Kind::Softmax, Kind::LayerNorm, Kind::Gelu, Kind::Dropout, Kind::AdamW, Kind::Ema];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Matmul => "matmul",
            Kind::Attention => "attention (fused)",
            Kind::Softmax => "softmax",
            Kind::LayerNorm => "layer norm",
            Kind::Gelu => "gelu",
            Kind::Dropout => "dropout",
            Kind::AdamW => "adamw",
            Kind::Ema => "ema",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
/// Nanoseconds per (phase, kind): forward first, then backward.
static NANOS: [AtomicU64; 2 * KINDS.len()] = [const { AtomicU64::new(0) }; 2 * KINDS.len()];

thread_local! {
    static BACKWARD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Starts (or stops) recording.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Ops run from now on this thread count as backward (`true`) or forward work.
pub fn set_backward(on: bool) {
    BACKWARD.with(|b| b.set(on));
}

/// Runs `f`, adding its wall time to `kind` when recording.
pub fn time<T>(kind: Kind, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let start = Instant::now();
    let out = f();
    let slot =
        KINDS.iter().position(|&k| k == kind).unwrap_or(0) + if BACKWARD.with(|b| b.get()) { KINDS.len() } else { 0 };
    NANOS[slot].fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    out
}

/// Seconds recorded per kind since the last call, `(forward, backward)`, and resets them.
pub fn take() -> Vec<(Kind, f64, f64)> {
    KINDS
        .iter()
        .enumerate()
        .map(|(i, &k)| {
            let f = NANOS[i].swap(0, Ordering::Relaxed) as f64 / 1e9;
            let b = NANOS[i + KINDS.len()].swap(0, Ordering::Relaxed) as f64 / 1e9;
            (k, f, b)
        })
        .collect()
}
