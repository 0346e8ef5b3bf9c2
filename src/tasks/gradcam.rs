//! `albef gradcam`: what `visualization.ipynb` shows, from the command line. For each (image,
//! expression) pair: the Grad-CAM of the whole expression (Grounding.py's map) and one per word
//! piece (index t of `(A·G)[0].mean(heads)`), drawn over the image as PNG heat maps, one figure
//! with all of them labelled, and the raw maps as safetensors.

use super::{load_checkpoint, TeacherInit};
use crate::config::model_config_from_file;
use crate::data::text::pre_caption;
use crate::data::transform::{eval_transform, RgbImage};
use crate::data::Tokenizer;
use crate::eval::grounding::{attention_and_gradient, itm_token_maps, GradcamMode};
use crate::heatmap::{figure, overlay, plain, save_png};
use crate::model::{ContrastiveModel, Objective};
use crate::task::Task;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct GradcamOptions {
    /// A YAML that sizes the model (Grounding.yaml, or any task config).
    pub config: PathBuf,
    pub checkpoint: PathBuf,
    pub text_encoder: PathBuf,
    pub output_dir: PathBuf,
    /// (image, expression) pairs.
    pub pairs: Vec<(PathBuf, String)>,
    /// BERT layer whose cross-attention is used (the notebook's 8).
    pub block_num: usize,
    /// Gaussian blur of the display maps, as the notebook (σ = 0.02·max(H, W)).
    pub blur: bool,
    pub device: Device,
}

/// The maps of one pair: (grid) for the expression, (L, grid) per word piece ([CLS] first).
pub struct PairMaps {
    pub text: String,
    pub tokens: Vec<String>,
    pub expression: Vec<f32>,
    pub words: Vec<f32>,
    pub grid: (usize, usize),
}

/// Reads a JSON list of pairs: `[{"image": …, "text": …}, …]` or `[[image, text], …]`. Image
/// paths are taken as given, else relative to the list's folder.
pub fn read_pairs(path: &Path) -> Result<Vec<(PathBuf, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let list =
        v.as_array().with_context(|| format!("{}: expected a JSON list of (image, text) pairs", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new(""));
    list.iter()
        .enumerate()
        .map(|(i, item)| {
            let (image, text) = match item {
                Value::Array(a) if a.len() == 2 => (a[0].as_str(), a[1].as_str()),
                Value::Object(o) => (o.get("image").and_then(Value::as_str), o.get("text").and_then(Value::as_str)),
                _ => (None, None),
            };
            let (Some(image), Some(text)) = (image, text) else {
                bail!("{}: entry {i} is not {{\"image\": …, \"text\": …}} or [image, text]", path.display());
            };
            let p = PathBuf::from(image);
            let p = if p.exists() { p } else { dir.join(image) };
            Ok((p, text.to_string()))
        })
        .collect()
}

/// Grad-CAM maps of one expression on one image (no padding: one text at a time, as the
/// notebook does).
pub fn pair_maps(
    model: &ContrastiveModel,
    tokenizer: &Tokenizer,
    image: &RgbImage,
    text: &str,
    block: usize,
) -> Result<PairMaps> {
    let dev = model.store.device().clone();
    let v = &model.cfg.vision;
    let grid = (v.image_res / v.patch_size, v.image_res / v.patch_size);
    let pixels = eval_transform(image, v.image_res, &dev)?.unsqueeze(0)?;
    let text = pre_caption(text, 30);
    let ids = tokenizer.encode(&text, None);
    let l = ids.len();
    let tokens = ids.iter().map(|&i| tokenizer.token(i).unwrap_or("[UNK]").to_string()).collect();
    let ids = Tensor::from_vec(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), (1, l), &dev)?;
    let mask = Tensor::ones((1, l), candle_core::DType::I64, &dev)?;
    let attn = attention_and_gradient(model, &pixels, &ids, &mask, GradcamMode::Itm, block)?;
    let per_token = itm_token_maps(&attn, &mask)?; // (1, L, N)
    let expression = per_token.mean(1)?.flatten_all()?.to_vec1::<f32>()?;
    let words = per_token.flatten_all()?.to_vec1::<f32>()?;
    Ok(PairMaps { text, tokens, expression, words, grid })
}

/// A word piece as part of a file name.
fn slug(s: &str) -> String {
    let t: String = s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
    let t = t.trim_matches('_').to_string();
    if t.is_empty() {
        "tok".into()
    } else {
        t
    }
}

pub fn run(opts: &GradcamOptions) -> Result<Value> {
    if opts.pairs.is_empty() {
        bail!("no (image, text) pair given: pass --image with one or more --text, or --pairs FILE.json");
    }
    // Everything is read and computed before anything is written.
    let images: Vec<RgbImage> = opts.pairs.iter().map(|(p, _)| RgbImage::open(p)).collect::<Result<_>>()?;
    let cfg = model_config_from_file(&opts.config)?;
    let tokenizer = Tokenizer::from_path(&opts.text_encoder)?;
    if tokenizer.vocab_size() != cfg.bert.vocab_size {
        bail!(
            "the tokenizer in {} has {} tokens but bert_config says vocab_size {}",
            opts.text_encoder.display(),
            tokenizer.vocab_size(),
            cfg.bert.vocab_size
        );
    }
    let b = opts.block_num;
    if b < cfg.bert.fusion_layer || b >= cfg.bert.num_hidden_layers {
        bail!(
            "--block_num {b}: a BERT layer with cross-attention, {}..={} for this model",
            cfg.bert.fusion_layer,
            cfg.bert.num_hidden_layers.saturating_sub(1)
        );
    }
    let model = ContrastiveModel::new(&cfg, Objective::Retrieval, &opts.device, 0)?;
    eprint!("{}", load_checkpoint(&model, Task::Grounding, &opts.checkpoint, true, TeacherInit::FromLoaded)?);
    let maps: Vec<PairMaps> = opts
        .pairs
        .iter()
        .zip(&images)
        .map(|((_, text), img)| pair_maps(&model, &tokenizer, img, text, b))
        .collect::<Result<_>>()?;

    std::fs::create_dir_all(&opts.output_dir)
        .with_context(|| format!("cannot create output folder {}", opts.output_dir.display()))?;
    let mut index = Vec::new();
    for (k, (((path, _), img), m)) in opts.pairs.iter().zip(&images).zip(&maps).enumerate() {
        let (gh, gw) = m.grid;
        let cells = gh * gw;
        let file = |name: &str| opts.output_dir.join(format!("{k:02}_{name}"));
        let expression = overlay(img, &m.expression, gh, gw, opts.blur);
        save_png(&expression, &file("expression.png"))?;
        let mut tiles = vec![(plain(img), "Image".to_string()), (expression, m.text.clone())];
        let mut word_files = Vec::new();
        // Word pieces after [CLS], as the notebook's loop over input_ids[1:].
        for (t, token) in m.tokens.iter().enumerate().skip(1) {
            let pic = overlay(img, &m.words[t * cells..(t + 1) * cells], gh, gw, opts.blur);
            let name = format!("word_{t:02}_{}.png", slug(token));
            save_png(&pic, &file(&name))?;
            word_files.push(json!({"index": t, "token": token, "png": format!("{k:02}_{name}")}));
            tiles.push((pic, token.clone()));
        }
        save_png(&figure(&tiles, 4, 320), &file("figure.png"))?;
        let mut sd = crate::checkpoint::StateDict::new();
        sd.insert("expression".into(), Tensor::from_vec(m.expression.clone(), (gh, gw), &Device::Cpu)?);
        sd.insert("words".into(), Tensor::from_vec(m.words.clone(), (m.tokens.len(), gh, gw), &Device::Cpu)?);
        let meta = [
            ("text".to_string(), m.text.clone()),
            ("tokens".to_string(), serde_json::to_string(&m.tokens)?),
            ("block_num".to_string(), b.to_string()),
        ]
        .into_iter()
        .collect();
        crate::checkpoint::save_safetensors(&sd, &meta, &file("maps.safetensors"))?;
        index.push(json!({
            "image": path.display().to_string(),
            "text": m.text,
            "tokens": m.tokens,
            "expression_png": format!("{k:02}_expression.png"),
            "figure_png": format!("{k:02}_figure.png"),
            "maps": format!("{k:02}_maps.safetensors"),
            "words": word_files,
        }));
    }
    let index = Value::Array(index);
    crate::util::write_atomic(&opts.output_dir.join("gradcam.json"), serde_json::to_string_pretty(&index)?.as_bytes())?;
    Ok(index)
}

/// A grounding (or retrieval) model loaded for heat maps one at a time (`albef serve`).
pub struct Grounder {
    model: ContrastiveModel,
    tokenizer: Tokenizer,
    block: usize,
}

impl Grounder {
    /// `block`: the BERT layer whose cross-attention is used; by default the notebook's 8, or the
    /// last layer of a smaller model.
    pub fn load(
        config: &Path,
        checkpoint: &Path,
        text_encoder: &Path,
        device: &Device,
        block: Option<usize>,
    ) -> Result<Self> {
        let cfg = model_config_from_file(config)?;
        let tokenizer = Tokenizer::from_path(text_encoder)?;
        if tokenizer.vocab_size() != cfg.bert.vocab_size {
            bail!(
                "the tokenizer in {} has {} tokens but {} says vocab_size {}",
                text_encoder.display(),
                tokenizer.vocab_size(),
                config.display(),
                cfg.bert.vocab_size
            );
        }
        let last = cfg.bert.num_hidden_layers.saturating_sub(1);
        let block = block.unwrap_or(8.min(last));
        if block < cfg.bert.fusion_layer || block > last {
            bail!(
                "block {block}: a BERT layer with cross-attention, {}..={last} for this model",
                cfg.bert.fusion_layer
            );
        }
        let model = ContrastiveModel::new(&cfg, Objective::Retrieval, device, 0)?;
        load_checkpoint(&model, Task::Grounding, checkpoint, true, TeacherInit::FromLoaded)?;
        Ok(Self { model, tokenizer, block })
    }

    /// The Grad-CAM of the whole `text` drawn over `image`, blurred as the notebook draws it. The
    /// picture is at most `max_side` pixels wide or high (the blur costs grow with the area).
    pub fn heatmap(&self, image: &RgbImage, text: &str, max_side: u32) -> Result<image::RgbImage> {
        if pre_caption(text, 30).is_empty() {
            bail!("the text is empty");
        }
        let m = pair_maps(&self.model, &self.tokenizer, image, text, self.block)?;
        let shown = shrink(image, max_side);
        Ok(overlay(&shown, &m.expression, m.grid.0, m.grid.1, true))
    }
}

/// `img` scaled down (aspect kept) to fit in `max_side` × `max_side`; as it is when it fits.
fn shrink(img: &RgbImage, max_side: u32) -> RgbImage {
    let (w, h) = (img.width as u32, img.height as u32);
    if w.max(h) <= max_side {
        return img.clone();
    }
    let s = max_side as f64 / w.max(h) as f64;
    let (nw, nh) = (((w as f64 * s).round() as u32).max(1), ((h as f64 * s).round() as u32).max(1));
    let src = plain(img);
    let small = image::imageops::resize(&src, nw, nh, image::imageops::FilterType::Triangle);
    RgbImage { width: nw as usize, height: nh as usize, data: small.into_raw() }
}
