//! SNLI-VE (`ve_dataset.py`) and NLVR2 (`nlvr_dataset.py`) examples: image(s), a sentence, a
//! class label.

use super::annotations::{entries, read_list};
use super::augment::train_augment;
use super::loader::Dataset;
use super::retrieval::ImageRef;
use super::text::pre_caption;
use super::transform::{eval_transform_host, to_normalized_chw};
use anyhow::{bail, Result};
use rand::rngs::StdRng;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `{"image": <id>, "sentence", "label": entailment|neutral|contradiction}`, `<root>/<id>.jpg`.
    SnliVe,
    /// `{"images": [p0, p1], "sentence", "label": "True"|"False"}`.
    Nlvr2,
}

impl Format {
    pub fn class_names(self) -> &'static [&'static str] {
        match self {
            Self::SnliVe => &["contradiction", "neutral", "entailment"],
            Self::Nlvr2 => &["False", "True"],
        }
    }
}

pub struct Example {
    pub images: Vec<ImageRef>,
    pub sentence: String,
    pub label: i64,
}

pub struct ClassifyDataset {
    pub examples: Vec<Example>,
    res: usize,
    augment: bool,
}

/// A loaded example: (3, R, R) pixels per image, sentence, label.
pub struct ClassifySample {
    pub pixels: Vec<Vec<f32>>,
    pub sentence: String,
    pub label: i64,
}

impl ClassifyDataset {
    pub fn new(files: &[PathBuf], image_root: &Path, format: Format, res: usize, augment: bool) -> Result<Self> {
        let mut examples = Vec::new();
        for file in files {
            let items = read_list(file)?;
            for e in entries(file, &items) {
                let label_text = e.str("label")?;
                let Some(label) = format.class_names().iter().position(|c| *c == label_text) else {
                    bail!(
                        "{}: entry {}, label {label_text:?} is not one of {}",
                        file.display(),
                        e.index,
                        format.class_names().join(", ")
                    );
                };
                let images = match format {
                    Format::SnliVe => vec![image_root.join(format!("{}.jpg", e.str("image")?))],
                    Format::Nlvr2 => {
                        let list = e.strings("images")?;
                        if list.len() != 2 {
                            bail!(
                                "{}: entry {}, 'images' must list two images, found {}",
                                file.display(),
                                e.index,
                                list.len()
                            );
                        }
                        list.iter().map(|p| image_root.join(p)).collect()
                    }
                };
                examples.push(Example {
                    images: images.into_iter().map(|path| ImageRef { path, origin: e.location() }).collect(),
                    sentence: pre_caption(e.str("sentence")?, 30),
                    label: label as i64,
                });
            }
        }
        Ok(Self { examples, res, augment })
    }

    pub fn images(&self) -> impl Iterator<Item = &ImageRef> {
        self.examples.iter().flat_map(|e| e.images.iter())
    }
}

impl Dataset for ClassifyDataset {
    type Item = ClassifySample;
    fn len(&self) -> usize {
        self.examples.len()
    }
    fn get(&self, index: usize, rng: &mut StdRng) -> Result<ClassifySample> {
        let e = &self.examples[index];
        let pixels = e
            .images
            .iter()
            .map(|im| {
                let img = im.open()?;
                Ok(if self.augment {
                    to_normalized_chw(&train_augment(&img, self.res, 0.5, rng))
                } else {
                    eval_transform_host(&img, self.res)
                })
            })
            .collect::<Result<_>>()?;
        Ok(ClassifySample { pixels, sentence: e.sentence.clone(), label: e.label })
    }
}
