use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (m, k, n) in [(9232, 768, 768), (9232, 768, 1536), (9232, 768, 768), (9232, 768, 1536)] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (k, n), &dev)?;
        a.matmul(&b)?;
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            a.matmul(&b)?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("{m} {k} {n} {:.1} GFLOP/s", 2.0 * (m * k * n) as f64 / best / 1e9);
    }
    let q = Tensor::randn(0f32, 1.0, (96, 577, 64), &dev)?;
    let kk = Tensor::randn(0f32, 1.0, (96, 64, 577), &dev)?;
    q.matmul(&kk)?;
    let t = Instant::now();
    q.matmul(&kk)?;
    println!("attn {:.1} GFLOP/s", 2.0 * (96 * 577 * 577 * 64) as f64 / t.elapsed().as_secs_f64() / 1e9);
    Ok(())
}
