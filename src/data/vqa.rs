//! VQA v2 / Visual Genome QA examples (`dataset/vqa_dataset.py`).

use super::annotations::{entries, read_list, Entry};
use super::augment::train_augment;
use super::loader::Dataset;
use super::retrieval::ImageRef;
use super::text::pre_question;
use super::transform::{eval_transform_host, to_normalized_chw};
use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use std::path::{Path, PathBuf};

pub struct Question {
    pub image: ImageRef,
    pub question: String,
    /// Training: distinct answers with their weights. Evaluation: the annotators' answers, if the
    /// file has them (for accuracy).
    pub answers: Vec<String>,
    pub weights: Vec<f32>,
    pub question_id: Option<i64>,
}

pub struct VqaDataset {
    pub questions: Vec<Question>,
    res: usize,
    train: bool,
}

pub struct VqaSample {
    pub pixels: Vec<f32>,
    pub question: String,
    pub answers: Vec<String>,
    pub weights: Vec<f32>,
    pub question_id: Option<i64>,
}

fn image_of(e: &Entry, vqa_root: &Path, vg_root: &Path) -> Result<ImageRef> {
    let root = match e.str("dataset")? {
        "vqa" => vqa_root,
        "vg" => vg_root,
        other => bail!("{}: entry {}, 'dataset' must be \"vqa\" or \"vg\", not {other:?}", e.file.display(), e.index),
    };
    Ok(ImageRef { path: root.join(e.str("image")?), origin: e.location() })
}

impl VqaDataset {
    /// Training files: VQA answers become distinct answers weighted by their share of the
    /// annotators; a VG answer gets weight 0.5. `eos` is appended to every answer.
    pub fn train(files: &[PathBuf], vqa_root: &Path, vg_root: &Path, res: usize, eos: &str) -> Result<Self> {
        let mut questions = Vec::new();
        for file in files {
            let items = read_list(file)?;
            for e in entries(file, &items) {
                let image = image_of(&e, vqa_root, vg_root)?;
                let (answers, weights) = if e.str("dataset")? == "vqa" {
                    let all = e.strings("answer")?;
                    if all.is_empty() {
                        bail!("{}: entry {} has an empty 'answer' list", file.display(), e.index);
                    }
                    let mut distinct: Vec<(String, f32)> = Vec::new();
                    for a in &all {
                        match distinct.iter_mut().find(|(d, _)| d == a) {
                            Some((_, w)) => *w += 1.0 / all.len() as f32,
                            None => distinct.push((a.to_string(), 1.0 / all.len() as f32)),
                        }
                    }
                    distinct.into_iter().unzip()
                } else {
                    (vec![e.str("answer")?.to_string()], vec![0.5])
                };
                let answers = answers.into_iter().map(|a: String| format!("{a}{eos}")).collect();
                questions.push(Question {
                    image,
                    question: pre_question(e.str("question")?, 30),
                    answers,
                    weights,
                    question_id: None,
                });
            }
        }
        Ok(Self { questions, res, train: true })
    }

    /// Test files: `question_id` required; annotator answers kept when present.
    pub fn test(files: &[PathBuf], vqa_root: &Path, vg_root: &Path, res: usize) -> Result<Self> {
        let mut questions = Vec::new();
        for file in files {
            let items = read_list(file)?;
            for e in entries(file, &items) {
                let qid = e.get("question_id")?;
                let question_id = qid.as_i64().with_context(|| {
                    format!("{}: entry {}, 'question_id' must be an integer", file.display(), e.index)
                })?;
                let answers = if e.value.get("answer").is_some() {
                    e.strings("answer")?.into_iter().map(String::from).collect()
                } else {
                    Vec::new()
                };
                questions.push(Question {
                    image: image_of(&e, vqa_root, vg_root)?,
                    question: pre_question(e.str("question")?, 50),
                    answers,
                    weights: Vec::new(),
                    question_id: Some(question_id),
                });
            }
        }
        Ok(Self { questions, res, train: false })
    }

    pub fn images(&self) -> impl Iterator<Item = &ImageRef> {
        self.questions.iter().map(|q| &q.image)
    }
}

impl Dataset for VqaDataset {
    type Item = VqaSample;
    fn len(&self) -> usize {
        self.questions.len()
    }
    fn get(&self, index: usize, rng: &mut StdRng) -> Result<VqaSample> {
        let q = &self.questions[index];
        let img = q.image.open()?;
        let pixels = if self.train {
            to_normalized_chw(&train_augment(&img, self.res, 0.5, rng))
        } else {
            eval_transform_host(&img, self.res)
        };
        Ok(VqaSample {
            pixels,
            question: q.question.clone(),
            answers: q.answers.clone(),
            weights: q.weights.clone(),
            question_id: q.question_id,
        })
    }
}

/// `answer_list.json`: a non-empty list of answer strings.
pub fn read_answer_list(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the answer list {}", path.display()))?;
    let list: Vec<String> = serde_json::from_str(&text)
        .with_context(|| format!("{} must be a JSON list of answer strings", path.display()))?;
    if list.is_empty() {
        bail!("the answer list {} is empty", path.display());
    }
    Ok(list)
}
