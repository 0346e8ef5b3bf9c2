//! `albef bench`: forward throughput of the full-size encoders (random weights) on this machine.
//! Each figure is printed with a ratio against a baseline measured in the same run: the same
//! work done with candle's plain `Tensor::matmul` on the same shapes (the floor of what the
//! model's matmuls cost), so the ratio shows the overhead of everything around the matmuls.

use albef::model::bert::{BertModel, CrossStates, Layout, Mode};
use albef::model::vit::VisionTransformer;
use albef::model::ModelConfig;
use albef::nn::ParamStore;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::Args;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// Timed repetitions per measurement (after one warm-up).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Image encoder batch.
    #[arg(long, default_value_t = 8)]
    image_batch: usize,
    /// Fusion batch and text length.
    #[arg(long, default_value_t = 16)]
    text_batch: usize,
    #[arg(long, default_value_t = 30)]
    text_len: usize,
    #[arg(long, default_value_t = 384)]
    image_res: usize,
}

fn time<F: FnMut() -> Result<()>>(reps: usize, mut f: F) -> Result<f64> {
    f()?;
    let start = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    Ok(start.elapsed().as_secs_f64() / reps as f64)
}

/// The dense matmuls of one transformer layer of width d, MLP width 4d, sequence n, batch b,
/// plus the two attention matmuls — a lower bound for the layer's cost.
fn matmul_floor(
    b: usize,
    n: usize,
    d: usize,
    heads: usize,
    kv_len: usize,
    cross: bool,
    dev: &Device,
) -> Result<Box<dyn FnMut() -> Result<()>>> {
    let x = Tensor::randn(0f32, 1.0, (b * n, d), dev)?;
    let w = Tensor::randn(0f32, 0.02, (d, d), dev)?;
    let w1 = Tensor::randn(0f32, 0.02, (d, 4 * d), dev)?;
    let w2 = Tensor::randn(0f32, 0.02, (4 * d, d), dev)?;
    let q = Tensor::randn(0f32, 1.0, (b, heads, n, d / heads), dev)?;
    let k = Tensor::randn(0f32, 1.0, (b, heads, d / heads, kv_len), dev)?;
    let v = Tensor::randn(0f32, 1.0, (b, heads, kv_len, d / heads), dev)?;
    let kv_x = Tensor::randn(0f32, 1.0, (b * kv_len, d), dev)?;
    let k_self = Tensor::randn(0f32, 1.0, (b, heads, d / heads, n), dev)?;
    let v_self = Tensor::randn(0f32, 1.0, (b, heads, n, d / heads), dev)?;
    Ok(Box::new(move || {
        for _ in 0..4 {
            x.matmul(&w)?;
        }
        if cross {
            x.matmul(&w)?;
            x.matmul(&w)?;
            kv_x.matmul(&w)?;
            kv_x.matmul(&w)?;
            q.matmul(&k)?.matmul(&v)?;
        }
        q.matmul(&k_self)?.matmul(&v_self)?;
        x.matmul(&w1)?.matmul(&w2)?;
        Ok(())
    }))
}

pub fn run(a: BenchArgs) -> Result<()> {
    let dev = Device::Cpu;
    let mut cfg = ModelConfig::default();
    cfg.vision.image_res = a.image_res;
    let store = ParamStore::new(&dev, 0);
    let vit = VisionTransformer::new(&store.root(false), &cfg.vision)?;
    let image = Tensor::randn(
        0f32,
        1.0,
        (a.image_batch, 3, a.image_res, a.image_res),
        &dev,
    )?;
    let tokens = cfg.vision.num_patches() + 1;
    println!("threads: {}", candle_core::utils::get_num_threads());

    let t_vit = time(a.reps, || {
        vit.forward(&image).map(|_| ()).map_err(Into::into)
    })?;
    let mut floor = matmul_floor(a.image_batch, tokens, 768, 12, tokens, false, &dev)?;
    let t_floor = time(a.reps, &mut floor)? * cfg.vision.depth as f64;
    println!(
        "image encoder ViT-B/16 @{} px, batch {}: {:.3} s/batch, {:.2} images/s  (matmul floor {:.3} s, ratio {:.2}x)",
        a.image_res,
        a.image_batch,
        t_vit,
        a.image_batch as f64 / t_vit,
        t_floor,
        t_vit / t_floor
    );

    let bert = BertModel::new(
        &store.root(false).pp("text_encoder"),
        &cfg.bert,
        Layout::Encoder,
    )?;
    let text = Tensor::randn(0f32, 1.0, (a.text_batch, a.text_len, 768), &dev)?;
    let mask = Tensor::ones((a.text_batch, a.text_len), DType::I64, &dev)?;
    let img_states = Tensor::randn(0f32, 1.0, (a.text_batch, tokens, 768), &dev)?;
    let cross = [CrossStates::image(&img_states)];
    let t_fusion = time(a.reps, || {
        bert.forward_embeds(&text, &mask, &cross, Mode::Fusion, false)
            .map(|_| ())
            .map_err(Into::into)
    })?;
    let fusion_layers = cfg.bert.num_hidden_layers - cfg.bert.fusion_layer;
    let mut floor = matmul_floor(a.text_batch, a.text_len, 768, 12, tokens, true, &dev)?;
    let t_floor = time(a.reps, &mut floor)? * fusion_layers as f64;
    println!(
        "fusion layers (6 x self+cross attention), batch {} x {} tokens vs {} image tokens: {:.3} s/batch, {:.1} pairs/s  (matmul floor {:.3} s, ratio {:.2}x)",
        a.text_batch,
        a.text_len,
        tokens,
        t_fusion,
        a.text_batch as f64 / t_fusion,
        t_floor,
        t_fusion / t_floor
    );
    Ok(())
}
