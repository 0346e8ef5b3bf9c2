//! Retrieval datasets (`dataset/caption_dataset.py`): `re_train` (one entry per caption, image ids
//! mapped to consecutive ints) and `re_eval` (one entry per image with its captions).

use super::annotations::{entries, read_list};
use super::augment::train_augment;
use super::loader::Dataset;
use super::text::pre_caption;
use super::transform::{eval_transform_host, RgbImage};
use anyhow::{Context, Result};
use rand::rngs::StdRng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// An image with the annotation it came from, for error messages.
#[derive(Clone, Debug)]
pub struct ImageRef {
    pub path: PathBuf,
    pub origin: String,
}

impl ImageRef {
    pub fn open(&self) -> Result<RgbImage> {
        RgbImage::open(&self.path).with_context(|| format!("image of {}", self.origin))
    }
}

/// One training sample: (C, R, R) pixels, caption, image index.
pub struct TrainSample {
    pub pixels: Vec<f32>,
    pub caption: String,
    pub idx: i64,
}

pub struct RetrievalTrain {
    entries: Vec<(ImageRef, String, i64)>,
    res: usize,
    scale_min: f64,
    augment: bool,
}

impl RetrievalTrain {
    pub fn new(files: &[PathBuf], image_root: &Path, res: usize, max_words: usize) -> Result<Self> {
        let mut ids: HashMap<String, i64> = HashMap::new();
        let mut out = Vec::new();
        for file in files {
            let items = read_list(file)?;
            for e in entries(file, &items) {
                let image = e.str("image")?;
                let caption = e.str("caption")?;
                // Any JSON value identifies the image; ids become 0, 1, … in order of appearance.
                let key = e.get("image_id")?.to_string();
                let n = ids.len() as i64;
                let idx = *ids.entry(key).or_insert(n);
                out.push((
                    ImageRef { path: image_root.join(image), origin: e.location() },
                    pre_caption(caption, max_words),
                    idx,
                ));
            }
        }
        Ok(Self { entries: out, res, scale_min: 0.5, augment: true })
    }

    /// `false`: train on the evaluation transform (our `train_transform: resize`; the synthetic
    /// captions say "left of", which a horizontal flip would make false).
    pub fn with_augmentation(mut self, augment: bool) -> Self {
        self.augment = augment;
        self
    }

    pub fn images(&self) -> impl Iterator<Item = &ImageRef> {
        self.entries.iter().map(|e| &e.0)
    }
}

impl Dataset for RetrievalTrain {
    type Item = TrainSample;
    fn len(&self) -> usize {
        self.entries.len()
    }
    fn get(&self, index: usize, rng: &mut StdRng) -> Result<TrainSample> {
        let (image, caption, idx) = &self.entries[index];
        let img = image.open()?;
        let pixels = if self.augment {
            super::transform::to_normalized_chw(&train_augment(&img, self.res, self.scale_min, rng))
        } else {
            eval_transform_host(&img, self.res)
        };
        Ok(TrainSample { pixels, caption: caption.clone(), idx: *idx })
    }
}

/// An evaluation split: images, all their captions, and the ground truth in both directions.
pub struct RetrievalEval {
    pub images: Vec<ImageRef>,
    pub texts: Vec<String>,
    pub img2txt: Vec<Vec<usize>>,
    pub txt2img: Vec<usize>,
    res: usize,
}

impl RetrievalEval {
    pub fn new(file: &Path, image_root: &Path, res: usize, max_words: usize) -> Result<Self> {
        let items = read_list(file)?;
        let (mut images, mut texts, mut img2txt, mut txt2img) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for e in entries(file, &items) {
            let image = e.str("image")?;
            let captions = e.strings("caption")?;
            let img_id = images.len();
            images.push(ImageRef { path: image_root.join(image), origin: e.location() });
            let mut mine = Vec::new();
            for c in captions {
                mine.push(texts.len());
                txt2img.push(img_id);
                texts.push(pre_caption(c, max_words));
            }
            img2txt.push(mine);
        }
        Ok(Self { images, texts, img2txt, txt2img, res })
    }
}

impl Dataset for RetrievalEval {
    type Item = Vec<f32>;
    fn len(&self) -> usize {
        self.images.len()
    }
    fn get(&self, index: usize, _rng: &mut StdRng) -> Result<Vec<f32>> {
        Ok(eval_transform_host(&self.images[index].open()?, self.res))
    }
}

/// Fails, naming the first missing files and their annotation entries, unless every image
/// exists (a cheap check before a long run; `albef data check` also decodes them).
pub fn check_images_exist<'a>(images: impl IntoIterator<Item = &'a ImageRef>) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    let mut missing = Vec::new();
    let mut count = 0usize;
    for im in images {
        if seen.insert(&im.path) && !im.path.is_file() {
            count += 1;
            if missing.len() < 5 {
                missing.push(format!("{} ({})", im.path.display(), im.origin));
            }
        }
    }
    if count > 0 {
        anyhow::bail!(
            "{count} image file{} missing, e.g.:\n  {}",
            if count == 1 { " is" } else { "s are" },
            missing.join("\n  ")
        );
    }
    Ok(())
}
