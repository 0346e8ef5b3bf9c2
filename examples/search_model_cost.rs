//! The model's share of `albef index` and `albef search --rerank K` for a model sized by a config
//! (default: the full-size Retrieval_flickr.yaml, random weights: the cost does not depend on
//! them): images/s of the ITC image encoding, and the time to re-rank K hits (K image encodings
//! plus K fusion passes). `cargo run --release --example search_model_cost [CONFIG] [K]`.

use albef::config::model_config_from_file;
use albef::model::{ContrastiveModel, Objective};
use candle_core::{DType, Device, IndexOp, Tensor};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = args.first().cloned().unwrap_or_else(|| "configs/Retrieval_flickr.yaml".into());
    let k: usize = args.get(1).map_or(16, |s| s.parse().expect("K"));
    let mut cfg = model_config_from_file(std::path::Path::new(&config))?;
    cfg.mode.inference = true;
    let dev = Device::Cpu;
    let model = ContrastiveModel::new(&cfg, Objective::Retrieval, &dev, 0)?;
    let res = cfg.vision.image_res;
    let batch = 8;
    let images = Tensor::randn(0f32, 1.0, (batch, 3, res, res), &dev)?;
    model.encode_image(&images.i(0..1)?)?; // warm-up
    let t = Instant::now();
    let (_, feat) = model.encode_image(&images)?;
    feat.to_vec2::<f32>()?;
    let s = t.elapsed().as_secs_f64();
    println!("{config}: image encoding at {res}px, batch {batch}: {:.2} images/s", batch as f64 / s);

    let len = 30;
    let ids = Tensor::ones((1, len), DType::U32, &dev)?;
    let mask = Tensor::ones((1, len), DType::U32, &dev)?;
    let t = Instant::now();
    let (states, _) = model.encode_text(&ids, &mask)?;
    let mut logits = Vec::new();
    for start in (0..k).step_by(batch) {
        let n = batch.min(k - start);
        let (image_states, _) = model.encode_image(&images.i(0..n)?)?;
        let text = states.broadcast_as((n, len, states.dim(2)?))?.contiguous()?;
        let m = mask.broadcast_as((n, len))?.contiguous()?;
        let fused = model.fuse(&text, &m, &image_states)?;
        logits.extend(model.itm_logits(&fused)?.i((.., 1))?.to_vec1::<f32>()?);
    }
    println!("re-rank {k}: {:.2} s (text encoding, {k} image encodings, {k} fusion passes)", t.elapsed().as_secs_f64());
    Ok(())
}
