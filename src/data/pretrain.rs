//! Image-caption pairs in the pre-training format (`pretrain_dataset`): `{"image": path,
//! "caption": str | [str]}`; a caption list yields one caption chosen at random per access.

use super::annotations::{entries, read_list};
use super::augment::{hflip, random_augment, random_resized_crop};
use super::loader::Dataset;
use super::retrieval::ImageRef;
use super::text::pre_caption;
use super::transform::to_normalized_chw;
use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::Rng;
use std::path::{Path, PathBuf};

pub struct PretrainDataset {
    pub items: Vec<(ImageRef, Vec<String>)>,
    res: usize,
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
        Ok(Self { items, res })
    }

    pub fn images(&self) -> impl Iterator<Item = &ImageRef> {
        self.items.iter().map(|i| &i.0)
    }
}

impl Dataset for PretrainDataset {
    type Item = CaptionSample;
    fn len(&self) -> usize {
        self.items.len()
    }
    /// The pre-training transform: crop (scale 0.2–1) → flip → RandomAugment(2, 7).
    fn get(&self, index: usize, rng: &mut StdRng) -> Result<CaptionSample> {
        let (image, captions) = &self.items[index];
        let caption = captions[rng.random_range(0..captions.len())].clone();
        let img = random_resized_crop(&image.open()?, self.res, (0.2, 1.0), rng);
        let img = if rng.random::<f64>() < 0.5 { hflip(&img) } else { img };
        Ok(CaptionSample { pixels: to_normalized_chw(&random_augment(&img, 2, 7.0, rng)), caption })
    }
}
