use albef::config::TaskConfig;
use albef::data::loader::Dataset;
use albef::data::retrieval::RetrievalEval;
use albef::data::Tokenizer;
use albef::model::{ContrastiveModel, Objective};
use albef::train::optim::AdamW;
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use std::sync::Arc;

fn main() -> anyhow::Result<()> {
    let train_mode = std::env::args().nth(1).as_deref() == Some("train");
    let tcfg = TaskConfig::from_yaml_file(std::path::Path::new("/tmp/r3.yaml"))?;
    let mut cfg = tcfg.model_config()?;
    cfg.momentum = std::env::var("M")
        .map(|v| v.parse().unwrap())
        .unwrap_or(0.995);
    cfg.queue_size = 64;
    cfg.init_std = std::env::var("S")
        .map(|v| v.parse().unwrap())
        .unwrap_or(0.02);
    let model = ContrastiveModel::new(&cfg, Objective::Retrieval, &Device::Cpu, 0)?;
    let tok = Tokenizer::from_path(std::path::Path::new("data/synth/vocab.txt"))?;
    let split = Arc::new(RetrievalEval::new(
        std::path::Path::new("data/synth/retrieval_val.json"),
        std::path::Path::new("data/synth"),
        48,
        30,
    )?);
    let n = 16;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let pixels: Vec<Vec<f32>> = (0..n).map(|i| split.get(i, &mut rng).unwrap()).collect();
    let image = albef::tasks::retrieval::stack_images(&pixels, 48, &Device::Cpu)?;
    let texts: Vec<&str> = (0..n)
        .map(|i| split.texts[split.img2txt[i][0]].as_str())
        .collect();
    let (ids, mask) = tok
        .encode_batch(&texts, albef::data::Padding::Longest { truncate_to: None })
        .to_tensors(&Device::Cpu)?;
    let idx = Tensor::arange(0i64, n as i64, &Device::Cpu)?;
    let mut opt = AdamW::new(&model.store, 0.02)?;
    for step in 0..150 {
        let l = model.forward_train(
            &image,
            &ids,
            &mask,
            Some(&idx),
            0.4,
            None,
            &mut rng,
            train_mode,
        )?;
        let total = (&l.ita + &l.itm)?;
        if step % 10 == 0 {
            println!(
                "{step} ita {:.4} itm {:.4}",
                l.ita.to_scalar::<f32>()?,
                l.itm.to_scalar::<f32>()?
            );
        }
        opt.step(&total.backward()?, 1e-3)?;
    }
    let (_, tf) = model.encode_text(&ids, &mask)?;
    let (_, imf) = model.encode_image(&image)?;
    println!(
        "sims {}",
        imf.matmul(&tf.t()?)?.narrow(0, 0, 4)?.narrow(1, 0, 4)?
    );
    Ok(())
}
