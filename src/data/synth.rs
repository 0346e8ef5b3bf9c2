//! A synthetic "shapes" world in the exact layouts the real tasks read, so everything can run
//! with no download: PNG images of one to three coloured shapes, captions from a small grammar,
//! and a `vocab.txt` of whole words at the usual BERT special-token ids.

use crate::util::write_atomic;
use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::path::Path;

pub const COLORS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [235, 215, 40]),
    ("purple", [140, 60, 190]),
    ("orange", [245, 140, 30]),
    ("white", [245, 245, 245]),
    ("black", [20, 20, 20]),
];
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
pub const SIZES: [&str; 2] = ["small", "large"];
const BACKGROUND: [u8; 3] = [128, 128, 128];

/// Every word the grammar can produce (the vocabulary after the special tokens).
pub const WORDS: [&str; 46] = [
    "a", "an", "the", "and", "of", "to", "is", "there", "are", "in", "on", "image", "picture", "left", "right",
    "above", "below", "small", "large", "circle", "square", "triangle", "red", "green", "blue", "yellow", "purple",
    "orange", "white", "black", "one", "two", "three", "shape", "shapes", "with", "contains", "what", "color", "how",
    "many", "yes", "no", "1", "2", "3",
];

/// Ids 0..103 as in bert-base-uncased: [PAD] 0, [unused*], [UNK] 100, [CLS] 101, [SEP] 102,
/// [MASK] 103; then the words.
pub fn vocab() -> Vec<String> {
    let mut v: Vec<String> =
        (0..100).map(|i| if i == 0 { "[PAD]".into() } else { format!("[unused{}]", i - 1) }).collect();
    v.extend(["[UNK]", "[CLS]", "[SEP]", "[MASK]"].map(String::from));
    v.extend(WORDS.iter().map(|w| w.to_string()));
    v
}

pub fn vocab_size() -> usize {
    104 + WORDS.len()
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    pub color: usize,
    pub kind: usize,
    pub large: bool,
    /// Centre, in [0, 1).
    pub x: f32,
    pub y: f32,
}

impl Shape {
    pub fn phrase(&self, with_size: bool) -> String {
        let size = if self.large { "large" } else { "small" };
        if with_size {
            format!("a {size} {} {}", COLORS[self.color].0, SHAPES[self.kind])
        } else {
            format!("a {} {}", COLORS[self.color].0, SHAPES[self.kind])
        }
    }
}

/// A scene: its shapes, left to right.
#[derive(Clone, Debug)]
pub struct Scene {
    pub shapes: Vec<Shape>,
}

impl Scene {
    pub fn random(rng: &mut StdRng, max_shapes: usize) -> Self {
        let n = rng.random_range(1..=max_shapes);
        // Distinct horizontal slots keep shapes apart and "left of" well defined.
        let width = 1.0 / n as f32;
        let shapes = (0..n)
            .map(|slot| Shape {
                color: rng.random_range(0..COLORS.len()),
                kind: rng.random_range(0..SHAPES.len()),
                large: rng.random_bool(0.5),
                x: width * (slot as f32 + 0.5) + rng.random_range(-0.1..0.1) * width,
                y: rng.random_range(0.35..0.65),
            })
            .collect();
        Self { shapes }
    }

    /// Two captions: one with sizes and relations, one shorter.
    pub fn captions(&self) -> Vec<String> {
        let s = &self.shapes;
        match s.len() {
            1 => vec![s[0].phrase(true), format!("there is {} in the image", s[0].phrase(false))],
            2 => vec![
                format!("{} to the left of {}", s[0].phrase(true), s[1].phrase(true)),
                format!("{} and {}", s[0].phrase(false), s[1].phrase(false)),
            ],
            _ => vec![
                format!("{} to the left of {} and {}", s[0].phrase(true), s[1].phrase(true), s[2].phrase(true)),
                format!("three shapes {} {} and {}", s[0].phrase(false), s[1].phrase(false), s[2].phrase(false)),
            ],
        }
    }

    pub fn render(&self, size: usize) -> image::RgbImage {
        let mut img = image::RgbImage::from_pixel(size as u32, size as u32, image::Rgb(BACKGROUND));
        for sh in &self.shapes {
            let r = if sh.large { 0.16 } else { 0.09 } * size as f32;
            let (cx, cy) = (sh.x * size as f32, sh.y * size as f32);
            let color = image::Rgb(COLORS[sh.color].1);
            for py in 0..size {
                for px in 0..size {
                    let (dx, dy) = (px as f32 + 0.5 - cx, py as f32 + 0.5 - cy);
                    let inside = match sh.kind {
                        0 => dx * dx + dy * dy <= r * r,
                        1 => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
                        _ => dy <= r * 0.8 && dy >= -r && dx.abs() <= (dy + r) * 0.6,
                    };
                    if inside {
                        img.put_pixel(px as u32, py as u32, color);
                    }
                }
            }
        }
        img
    }
}

#[derive(Clone, Debug)]
pub struct SynthConfig {
    pub seed: u64,
    pub train: usize,
    pub val: usize,
    pub test: usize,
    pub image_size: usize,
    pub max_shapes: usize,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self { seed: 0, train: 1000, val: 100, test: 100, image_size: 64, max_shapes: 2 }
    }
}

/// Counts written per split.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SynthSummary {
    pub images: [usize; 3],
    pub train_captions: usize,
}

/// Writes `images/`, `retrieval_{train,val,test}.json`, the VQA / NLVR2 / SNLI-VE files, the
/// pre-training corpus (`pretrain.json` and `shards/`) and `vocab.txt` under `out`.
pub fn generate(out: &Path, cfg: &SynthConfig) -> Result<SynthSummary> {
    let images_dir = out.join("images");
    std::fs::create_dir_all(&images_dir).with_context(|| format!("cannot create {}", images_dir.display()))?;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut summary = SynthSummary::default();
    let mut scenes: [Vec<Scene>; 3] = Default::default();
    for (split_i, (split, n)) in [("train", cfg.train), ("val", cfg.val), ("test", cfg.test)].into_iter().enumerate() {
        let mut entries = Vec::new();
        let mut used = std::collections::HashSet::new();
        for i in 0..n {
            // Evaluation images get distinct descriptions, so every query has one right answer.
            // (Up to a point: a small world may not have enough distinct scenes.)
            let mut attempts = 0;
            let scene = loop {
                let s = Scene::random(&mut rng, cfg.max_shapes);
                let captions = s.captions();
                attempts += 1;
                if split == "train" || attempts > 1000 || captions.iter().all(|c| !used.contains(c)) {
                    used.extend(captions);
                    break s;
                }
            };
            let name = format!("{split}_{i:05}.png");
            let path = images_dir.join(&name);
            let mut png = Vec::new();
            scene.render(cfg.image_size).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
            write_atomic(&path, &png)?;
            let captions = scene.captions();
            scenes[split_i].push(scene.clone());
            if split == "train" {
                for c in &captions {
                    entries.push(
                        json!({"image": format!("images/{name}"), "caption": c, "image_id": format!("{split}_{i}")}),
                    );
                    summary.train_captions += 1;
                }
            } else {
                entries.push(json!({"image": format!("images/{name}"), "caption": captions}));
            }
        }
        summary.images[split_i] = n;
        write_atomic(&out.join(format!("retrieval_{split}.json")), serde_json::to_string_pretty(&entries)?.as_bytes())?;
    }
    write_task_files(out, cfg, &scenes)?;
    write_pretrain_corpus(out, &scenes[0])?;
    write_atomic(&out.join("vocab.txt"), (vocab().join("\n") + "\n").as_bytes())?;
    Ok(summary)
}

/// Samples per shard of the synthetic pre-training corpus.
pub const SHARD_SIZE: usize = 128;

/// The pre-training corpus over the training images: `pretrain.json` (the reference's format,
/// both captions of an image as a list, paths relative to `out`) and the same samples as tar
/// shards, `shards/{000000..}.tar`.
fn write_pretrain_corpus(out: &Path, scenes: &[Scene]) -> Result<()> {
    let entries: Vec<serde_json::Value> = scenes
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"image": format!("images/train_{i:05}.png"), "caption": s.captions()}))
        .collect();
    write_atomic(&out.join("pretrain.json"), serde_json::to_string_pretty(&entries)?.as_bytes())?;
    let samples: Vec<(std::path::PathBuf, Vec<String>)> =
        scenes.iter().enumerate().map(|(i, s)| (out.join(format!("images/train_{i:05}.png")), s.captions())).collect();
    if !samples.is_empty() {
        super::shards::write_shards(&samples, &out.join("shards"), SHARD_SIZE, true)?;
    }
    Ok(())
}

/// Answers the synthetic VQA questions can have (`answer_list.json`).
pub fn answer_list() -> Vec<String> {
    let mut a: Vec<String> = COLORS.iter().map(|c| c.0.to_string()).collect();
    // Counts as digits, as VQA v2 annotators write them (the official evaluation maps number
    // words in predictions to digits, not in the ground truth).
    a.extend(["1", "2", "3", "yes", "no"].map(String::from));
    a
}

const NUMBERS: [&str; 4] = ["0", "1", "2", "3"];

/// VQA, NLVR2 and SNLI-VE files over the same scenes:
/// `vqa_{split}.json` (+ `answer_list.json`), `nlvr_{split}.json`, `ve_{split}.json` (+ JPEG
/// copies under `ve_images/`, as SNLI-VE names images by id and reads `<id>.jpg`).
fn write_task_files(out: &Path, cfg: &SynthConfig, scenes: &[Vec<Scene>; 3]) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x7a5c);
    std::fs::create_dir_all(out.join("ve_images"))?;
    let mut qid = 0u64;
    for (split_i, split) in ["train", "val", "test"].into_iter().enumerate() {
        let scenes = &scenes[split_i];
        let image = |i: usize| format!("images/{split}_{i:05}.png");
        let (mut vqa, mut nlvr, mut ve) = (Vec::new(), Vec::new(), Vec::new());
        for (i, scene) in scenes.iter().enumerate() {
            // VQA: a colour question about a shape kind that occurs once, a count, a yes/no.
            let mut qa = vec![("how many shapes are there".to_string(), NUMBERS[scene.shapes.len()].to_string())];
            let s0 = scene.shapes[rng.random_range(0..scene.shapes.len())];
            if scene.shapes.iter().filter(|s| s.kind == s0.kind).count() == 1 {
                qa.push((format!("what color is the {}", SHAPES[s0.kind]), COLORS[s0.color].0.to_string()));
            }
            let (c, k) = if rng.random_bool(0.5) {
                (s0.color, s0.kind)
            } else {
                (rng.random_range(0..COLORS.len()), rng.random_range(0..SHAPES.len()))
            };
            let present = scene.shapes.iter().any(|s| s.color == c && s.kind == k);
            qa.push((
                format!("is there a {} {}", COLORS[c].0, SHAPES[k]),
                if present { "yes" } else { "no" }.to_string(),
            ));
            for (q, a) in qa {
                let mut e = json!({"dataset": "vqa", "image": image(i), "question": q, "answer": vec![a; 10]});
                if split != "train" {
                    e["question_id"] = json!(qid);
                }
                qid += 1;
                vqa.push(e);
            }
            // NLVR2: is a described shape in the left image?
            let j = (i + 1 + rng.random_range(0..scenes.len().max(2) - 1)) % scenes.len().max(1);
            let target = if rng.random_bool(0.5) { scene.shapes[0] } else { scenes[j].shapes[0] };
            let truth = scene.shapes.iter().any(|s| s.color == target.color && s.kind == target.kind);
            let sentence = format!("the left image contains a {} {}", COLORS[target.color].0, SHAPES[target.kind]);
            nlvr.push(json!({"images": [image(i), image(j)], "sentence": sentence, "label": if truth { "True" } else { "False" }}));
            // SNLI-VE: entailment = a true phrase, contradiction = wrong colour, neutral = wrong size.
            if split != "train" || i < 500 {
                let id = format!("{split}_{i:05}");
                scene.render(cfg.image_size).save(out.join("ve_images").join(format!("{id}.jpg")))?;
                let s = scene.shapes[0];
                let wrong_color =
                    Shape { color: (s.color + 1 + rng.random_range(0..COLORS.len() - 1)) % COLORS.len(), ..s };
                let wrong_size = Shape { large: !s.large, ..s };
                for (hyp, label) in [
                    (s.phrase(true), "entailment"),
                    (wrong_color.phrase(true), "contradiction"),
                    (wrong_size.phrase(true), "neutral"),
                ] {
                    ve.push(json!({"image": id, "sentence": format!("there is {hyp}"), "label": label}));
                }
            }
        }
        for (name, entries) in [("vqa", vqa), ("nlvr", nlvr), ("ve", ve)] {
            write_atomic(
                &out.join(format!("{name}_{split}.json")),
                serde_json::to_string_pretty(&entries)?.as_bytes(),
            )?;
        }
    }
    write_atomic(&out.join("answer_list.json"), serde_json::to_string(&answer_list())?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Tokenizer;

    #[test]
    fn captions_tokenize_without_unknowns() {
        let tok = Tokenizer::from_tokens(vocab(), true);
        assert_eq!(tok.vocab_size(), vocab_size());
        assert_eq!(tok.id("[CLS]"), Some(101));
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..200 {
            for c in Scene::random(&mut rng, 3).captions() {
                let ids = tok.encode(&crate::data::text::pre_caption(&c, 30), None);
                assert!(!ids.contains(&crate::data::tokenizer::UNK), "{c}");
            }
        }
    }
}
