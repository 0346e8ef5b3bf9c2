//! Image-caption pairs in the pre-training format (`pretrain_dataset`): `{"image": path,
//! "caption": str | [str]}`; a caption list yields one caption chosen at random per access.

use super::annotations::{entries, read_list};
use super::augment::{hflip, random_augment, random_resized_crop};
use super::loader::{BatchSource, Dataset, Loader, LoaderConfig, TrainSet};
use super::retrieval::ImageRef;
use super::shards::{RawSample, ShardCorpus, StreamCounts};
use super::text::pre_caption;
use super::transform::to_normalized_chw;
use super::transform::{eval_transform_host, RgbImage};
use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::Rng;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct PretrainDataset {
    pub items: Vec<(ImageRef, Vec<String>)>,
    res: usize,
    augment: bool,
}

pub struct CaptionSample {
    pub pixels: Vec<f32>,
    pub caption: String,
}

impl PretrainDataset {
    /// `image_root` prefixes relative paths (the reference's files hold absolute paths).
    pub fn new(files: &[PathBuf], image_root: Option<&Path>, res: usize) -> Result<Self> {
        let mut items = Vec::new();
        for file in files {
            let list = read_list(file)?;
            for e in entries(file, &list) {
                let image = e.str("image")?;
                let captions: Vec<String> = e.strings("caption")?.iter().map(|c| pre_caption(c, 30)).collect();
                if captions.is_empty() {
                    bail!("{}: entry {} has no caption", file.display(), e.index);
                }
                let path = match image_root {
                    Some(root) => root.join(image),
                    None => PathBuf::from(image),
                };
                items.push((ImageRef { path, origin: e.location() }, captions));
            }
        }
        Ok(Self { items, res, augment: true })
    }

    /// `false`: resize only, no crop, flip or RandomAugment (our `train_transform: resize`).
    pub fn with_augmentation(mut self, augment: bool) -> Self {
        self.augment = augment;
        self
    }

    pub fn images(&self) -> impl Iterator<Item = &ImageRef> {
        self.items.iter().map(|i| &i.0)
    }
}

/// The JSON lists' entries as they are (image path under `image_root`, captions without
/// `pre_caption`), for `albef data shard`.
pub fn raw_entries(files: &[PathBuf], image_root: Option<&Path>) -> Result<Vec<(PathBuf, Vec<String>)>> {
    let mut out = Vec::new();
    for file in files {
        let list = read_list(file)?;
        for e in entries(file, &list) {
            let image = e.str("image")?;
            let captions: Vec<String> = e.strings("caption")?.iter().map(|c| c.to_string()).collect();
            if captions.is_empty() {
                bail!("{}: entry {} has no caption", file.display(), e.index);
            }
            out.push((image_root.map_or_else(|| PathBuf::from(image), |r| r.join(image)), captions));
        }
    }
    Ok(out)
}

impl Dataset for PretrainDataset {
    type Item = CaptionSample;
    fn len(&self) -> usize {
        self.items.len()
    }
    fn get(&self, index: usize, rng: &mut StdRng) -> Result<CaptionSample> {
        let (image, captions) = &self.items[index];
        let caption = pick_caption(captions, rng);
        Ok(CaptionSample { pixels: pretrain_pixels(&image.open()?, self.res, self.augment, rng), caption })
    }
}

/// One caption of a list, chosen uniformly (a fresh choice per epoch, as `pretrain_dataset`).
/// Drawn before the image transform: the JSON lists and the shards use the RNG in the same order.
pub fn pick_caption(captions: &[String], rng: &mut StdRng) -> String {
    captions[rng.random_range(0..captions.len())].clone()
}

/// The pre-training transform: crop (scale 0.2–1) → flip → RandomAugment(2, 7); or, without
/// augmentation, the evaluation resize.
pub fn pretrain_pixels(img: &RgbImage, res: usize, augment: bool, rng: &mut StdRng) -> Vec<f32> {
    if !augment {
        return eval_transform_host(img, res);
    }
    let img = random_resized_crop(img, res, (0.2, 1.0), rng);
    let img = if rng.random::<f64>() < 0.5 { hflip(&img) } else { img };
    to_normalized_chw(&random_augment(&img, 2, 7.0, rng))
}

/// Pre-training data: the JSON lists (random access) or tar shards (streamed).
pub enum PretrainCorpus {
    Json { data: Arc<PretrainDataset>, shuffle: bool },
    Shards(ShardCorpus<CaptionSample>),
}

impl PretrainCorpus {
    pub fn len(&self) -> usize {
        match self {
            Self::Json { data, .. } => data.len(),
            Self::Shards(s) => s.set.total(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What shard reading dropped since the last call (zero for JSON lists, whose loader stops
    /// at a bad image instead).
    pub fn take_counts(&self) -> Option<StreamCounts> {
        match self {
            Self::Json { .. } => None,
            Self::Shards(s) => Some(s.counters.take()),
        }
    }
}

impl TrainSet for PretrainCorpus {
    type Item = CaptionSample;
    fn source(self: Arc<Self>, cfg: LoaderConfig) -> Result<Box<dyn BatchSource<Item = CaptionSample>>> {
        match &*self {
            Self::Json { data, shuffle } => {
                Ok(Box::new(Loader::new(data.clone(), LoaderConfig { shuffle: *shuffle, ..cfg })))
            }
            Self::Shards(s) => Ok(Box::new(s.stream(&cfg))),
        }
    }
}

/// Image members a shard sample may have, in order of preference.
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// A shard sample as a pre-training item: the image member decoded, the caption from `.txt`
/// (WebDataset's convention) or else the `.json`'s `caption` (a string or a list, as in the
/// JSON lists), `pre_caption` applied; then the same RNG use as [`PretrainDataset`]'s `get`.
pub fn shard_sample(raw: &RawSample, res: usize, augment: bool, rng: &mut StdRng) -> Result<CaptionSample> {
    let captions: Vec<String> = match (raw.get("txt"), raw.get("json")) {
        (Some(txt), _) => vec![String::from_utf8_lossy(txt).into_owned()],
        (None, Some(json)) => {
            let v: serde_json::Value =
                serde_json::from_slice(json).map_err(|e| anyhow::anyhow!("its .json is not valid JSON ({e})"))?;
            match &v["caption"] {
                serde_json::Value::String(s) => vec![s.clone()],
                serde_json::Value::Array(a) => a.iter().filter_map(|c| c.as_str().map(str::to_string)).collect(),
                _ => bail!("no caption: no .txt member, and its .json has no \"caption\" string or list"),
            }
        }
        (None, None) => bail!("no caption (no .txt or .json member)"),
    };
    if captions.is_empty() {
        bail!("its caption list is empty");
    }
    let captions: Vec<String> = captions.iter().map(|c| pre_caption(c, 30)).collect();
    let Some((ext, bytes)) = IMAGE_EXTENSIONS.iter().find_map(|e| raw.get(e).map(|b| (e, b))) else {
        bail!("no image (no .jpg, .jpeg or .png member)");
    };
    let caption = pick_caption(&captions, rng);
    let img = RgbImage::decode(bytes, &format!("{}.{ext}", raw.key))?;
    Ok(CaptionSample { pixels: pretrain_pixels(&img, res, augment, rng), caption })
}
