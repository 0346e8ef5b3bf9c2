//! Weakly-supervised grounding data (`dataset/grounding_dataset.py`, `refTools/refer_python3.py`):
//! the RefCOCO+ expression files, the REFER refs with COCO `instances.json`, and the MAttNet
//! proposals (`dets.json`).

use super::annotations::{entries, read_list};
use super::augment::{hflip, random_augment};
use super::loader::Dataset;
use super::retrieval::{ImageRef, TrainSample};
use super::text::pre_caption;
use super::transform::{eval_transform_host, pillow_resize_bicubic, to_normalized_chw};
use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::Rng;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const MAX_WORDS: usize = 30;

/// `grounding_dataset(mode='train')`: one entry per expression; `idx` numbers the image *file
/// names* (`ann['image'].split('/')[-1]`) 0, 1, … in order of first appearance.
pub struct GroundingTrain {
    entries: Vec<(ImageRef, String, i64)>,
    res: usize,
}

impl GroundingTrain {
    pub fn new(files: &[PathBuf], image_root: &Path, res: usize) -> Result<Self> {
        let mut ids: HashMap<String, i64> = HashMap::new();
        let mut out = Vec::new();
        for file in files {
            let items = read_list(file)?;
            for e in entries(file, &items) {
                let image = e.str("image")?;
                let text = e.str("text")?;
                let name = image.rsplit('/').next().unwrap_or(image).to_string();
                let n = ids.len() as i64;
                let idx = *ids.entry(name).or_insert(n);
                out.push((
                    ImageRef { path: image_root.join(image), origin: e.location() },
                    pre_caption(text, MAX_WORDS),
                    idx,
                ));
            }
        }
        Ok(Self { entries: out, res })
    }

    pub fn images(&self) -> impl Iterator<Item = &ImageRef> {
        self.entries.iter().map(|e| &e.0)
    }
}

impl Dataset for GroundingTrain {
    type Item = TrainSample;
    fn len(&self) -> usize {
        self.entries.len()
    }
    /// Grounding's train transform: `Resize((R, R), BICUBIC)` → flip → RandomAugment(2, 7) (no
    /// random crop, unlike retrieval). Reference quirk kept: the flip does not swap "left" and
    /// "right" in the expression.
    fn get(&self, index: usize, rng: &mut StdRng) -> Result<TrainSample> {
        let (image, caption, idx) = &self.entries[index];
        let img = pillow_resize_bicubic(&image.open()?, self.res, self.res);
        let img = if rng.random::<f64>() < 0.5 { hflip(&img) } else { img };
        let img = random_augment(&img, 2, 7.0, rng);
        Ok(TrainSample { pixels: to_normalized_chw(&img), caption: caption.clone(), idx: *idx })
    }
}

/// One evaluation expression.
#[derive(Clone, Debug)]
pub struct Expression {
    pub image: ImageRef,
    /// `pre_caption(text, 30)`, what the model reads.
    pub text: String,
    pub ref_id: i64,
}

/// `grounding_dataset(mode='test')`: the test files in order (val, then test).
pub struct GroundingEval {
    pub expressions: Vec<Expression>,
    res: usize,
}

impl GroundingEval {
    pub fn new(files: &[PathBuf], image_root: &Path, res: usize) -> Result<Self> {
        let mut expressions = Vec::new();
        for file in files {
            let items = read_list(file)?;
            for e in entries(file, &items) {
                let image = e.str("image")?;
                let text = e.str("text")?;
                let ref_id = e.get("ref_id")?.as_i64().with_context(|| {
                    format!("{}: entry {}, field 'ref_id' must be an integer", file.display(), e.index)
                })?;
                expressions.push(Expression {
                    image: ImageRef { path: image_root.join(image), origin: e.location() },
                    text: pre_caption(text, MAX_WORDS),
                    ref_id,
                });
            }
        }
        Ok(Self { expressions, res })
    }
}

impl Dataset for GroundingEval {
    type Item = Vec<f32>;
    fn len(&self) -> usize {
        self.expressions.len()
    }
    fn get(&self, index: usize, _rng: &mut StdRng) -> Result<Vec<f32>> {
        Ok(eval_transform_host(&self.expressions[index].image.open()?, self.res))
    }
}

/// What the evaluation needs of one REFER ref: its split, its image and the box of its COCO
/// annotation (`refer.refToAnn[ref_id]['bbox']`).
#[derive(Clone, Debug, PartialEq)]
pub struct RefInfo {
    pub split: String,
    pub image_id: i64,
    /// [x, y, w, h] of the annotation in `instances.json`.
    pub bbox: [f64; 4],
    pub width: usize,
    pub height: usize,
}

/// The REFER refs of one dataset and split-by, indexed by `ref_id`.
pub struct Refer {
    pub refs: HashMap<i64, RefInfo>,
    pub refs_file: PathBuf,
    pub instances_file: PathBuf,
}

/// Names of the refs file for `refcoco+`, `unc` (Grounding.py's `REFER(data, 'refcoco+', 'unc')`):
/// the reference's pickle, or the JSON `albef data prepare refcoco` writes.
const REFS_NAMES: [&str; 3] = ["refs(unc).p", "refs(unc).json", "refs(unc+).json"];

/// Finds `refs(unc).p` (or its JSON) and `instances.json` under `refcoco_data/refcoco+/` (the
/// REFER layout) or directly in `refcoco_data/` (where `data prepare refcoco --out` puts them).
pub fn find_refer(refcoco_data: &Path) -> Result<(PathBuf, PathBuf)> {
    let dirs = [refcoco_data.join("refcoco+"), refcoco_data.to_path_buf()];
    let mut tried = Vec::new();
    for dir in &dirs {
        for name in REFS_NAMES {
            let refs = dir.join(name);
            let instances = dir.join("instances.json");
            if refs.is_file() && instances.is_file() {
                return Ok((refs, instances));
            }
            tried.push(refs.display().to_string());
        }
    }
    bail!(
        "refcoco_data {}: no REFER refs with an instances.json beside them; looked for {}",
        refcoco_data.display(),
        tried.join(", ")
    )
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

fn int(v: &Value, key: &str, at: &dyn Fn() -> String) -> Result<i64> {
    v[key].as_i64().with_context(|| format!("{} has no integer '{key}'", at()))
}

impl Refer {
    /// Reads the refs (pickle or JSON list) and `instances.json`.
    pub fn open(refs_file: &Path, instances_file: &Path) -> Result<Self> {
        let refs_value = if refs_file.extension().is_some_and(|e| e == "p") {
            super::refcoco::read_pickle(refs_file)?
        } else {
            read_json(refs_file)?
        };
        let list =
            refs_value.as_array().with_context(|| format!("{}: expected a list of refs", refs_file.display()))?;
        let inst = read_json(instances_file)?;
        let section =
            |k: &str| inst[k].as_array().with_context(|| format!("{}: no '{k}' list", instances_file.display()));
        let mut sizes: HashMap<i64, (usize, usize)> = HashMap::new();
        for (i, im) in section("images")?.iter().enumerate() {
            let at = || format!("{}: image {i}", instances_file.display());
            sizes.insert(int(im, "id", &at)?, (int(im, "width", &at)? as usize, int(im, "height", &at)? as usize));
        }
        let mut boxes: HashMap<i64, [f64; 4]> = HashMap::new();
        for (i, a) in section("annotations")?.iter().enumerate() {
            let at = || format!("{}: annotation {i}", instances_file.display());
            let b: Vec<f64> =
                a["bbox"].as_array().map(|b| b.iter().filter_map(Value::as_f64).collect()).unwrap_or_default();
            if b.len() != 4 {
                bail!("{} has no 'bbox' of 4 numbers", at());
            }
            boxes.insert(int(a, "id", &at)?, [b[0], b[1], b[2], b[3]]);
        }
        let mut refs = HashMap::new();
        for (i, r) in list.iter().enumerate() {
            let at = || format!("{}: ref {i}", refs_file.display());
            let (ref_id, image_id, ann_id) = (int(r, "ref_id", &at)?, int(r, "image_id", &at)?, int(r, "ann_id", &at)?);
            let split = r["split"].as_str().with_context(|| format!("{} has no 'split'", at()))?.to_string();
            let bbox = *boxes
                .get(&ann_id)
                .with_context(|| format!("{}: annotation {ann_id} is not in {}", at(), instances_file.display()))?;
            let (width, height) = *sizes
                .get(&image_id)
                .with_context(|| format!("{}: image {image_id} is not in {}", at(), instances_file.display()))?;
            refs.insert(ref_id, RefInfo { split, image_id, bbox, width, height });
        }
        Ok(Self { refs, refs_file: refs_file.to_path_buf(), instances_file: instances_file.to_path_buf() })
    }
}

/// `dets.json`: per COCO image id (as a string), proposals `[x, y, w, h, …]`; only the box is
/// read (the reference uses `det[:4]`).
pub struct Dets {
    pub boxes: HashMap<String, Vec<[f64; 4]>>,
    pub file: PathBuf,
}

impl Dets {
    pub fn open(file: &Path) -> Result<Self> {
        let v = read_json(file)?;
        let map = v.as_object().with_context(|| format!("{}: expected an object keyed by image id", file.display()))?;
        let mut boxes = HashMap::with_capacity(map.len());
        for (image_id, dets) in map {
            let list = dets
                .as_array()
                .with_context(|| format!("{}: image {image_id}: expected a list of boxes", file.display()))?;
            let mut out = Vec::with_capacity(list.len());
            for (j, d) in list.iter().enumerate() {
                let b: Vec<f64> =
                    d.as_array().map(|b| b.iter().take(4).filter_map(Value::as_f64).collect()).unwrap_or_default();
                if b.len() != 4 {
                    bail!("{}: image {image_id}, box {j} is not a list starting with 4 numbers", file.display());
                }
                out.push([b[0], b[1], b[2], b[3]]);
            }
            boxes.insert(image_id.clone(), out);
        }
        Ok(Self { boxes, file: file.to_path_buf() })
    }

    pub fn get(&self, image_id: i64) -> Option<&[[f64; 4]]> {
        self.boxes.get(&image_id.to_string()).map(Vec::as_slice)
    }
}

/// Fails, naming the first few, unless every expression's ref is in the REFER refs and every
/// ref's image has proposals (the reference would stop with a `KeyError` after evaluating).
pub fn check_coverage(eval: &GroundingEval, refer: &Refer, dets: &Dets) -> Result<()> {
    let mut problems = Vec::new();
    let mut count = 0;
    for e in &eval.expressions {
        let problem = match refer.refs.get(&e.ref_id) {
            None => Some(format!("ref_id {} ({}) is not in {}", e.ref_id, e.image.origin, refer.refs_file.display())),
            Some(r) if dets.get(r.image_id).is_none() => Some(format!(
                "image {} of ref_id {} ({}) has no proposals in {}",
                r.image_id,
                e.ref_id,
                e.image.origin,
                dets.file.display()
            )),
            _ => None,
        };
        if let Some(p) = problem {
            count += 1;
            if problems.len() < 5 {
                problems.push(p);
            }
        }
    }
    if count > 0 {
        bail!("{count} evaluation expression(s) cannot be scored, e.g.:\n  {}", problems.join("\n  "));
    }
    Ok(())
}
