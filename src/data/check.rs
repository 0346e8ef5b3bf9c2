//! `albef data check --config C`: before a long run, read every annotation file a task config
//! names with the task's own readers, and open and decode every image they reference (in
//! parallel), reporting what is missing or broken.

use super::classify::{ClassifyDataset, Format};
use super::pretrain::PretrainDataset;
use super::retrieval::{ImageRef, RetrievalEval, RetrievalTrain};
use super::transform::RgbImage;
use super::vqa::{read_answer_list, VqaDataset};
use crate::config::TaskConfig;
use crate::train::Progress;
use anyhow::{bail, Result};
use rayon::prelude::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What a check found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// (annotation file, entries read, distinct images they name): NLVR2 entries name two
    /// images each, and several sentences share a pair.
    pub files: Vec<(PathBuf, usize, usize)>,
    pub images: usize,
    pub missing: Vec<String>,
    pub broken: Vec<String>,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.missing.is_empty() && self.broken.is_empty()
    }
}

/// The task a config is for, from its keys (the reference's configs differ in them).
fn task_kind(cfg: &TaskConfig) -> &'static str {
    let has = |k: &str| cfg.extra.contains_key(k);
    if has("answer_list") {
        "vqa"
    } else if cfg.k_test.is_some() && has("val_file") {
        "retrieval"
    } else if has("batch_size") && has("val_file") {
        "nlvr"
    } else if has("val_file") {
        "ve"
    } else {
        "pretrain"
    }
}

fn files(cfg: &TaskConfig, key: &str) -> Result<Vec<PathBuf>> {
    if !cfg.extra.contains_key(key) {
        return Ok(Vec::new());
    }
    cfg.strings(key)?.iter().map(|p| cfg.resolve(p)).collect()
}

/// Reads the config's annotation files (errors in them stop the check, naming file and entry)
/// and checks every image.
pub fn check_config(path: &Path) -> Result<CheckReport> {
    check(&TaskConfig::from_yaml_file(path)?, path)
}

/// The shipped configs' data folders, for `--root`.
pub const LAYOUT: [(&str, &str); 5] = [
    ("flickr30k", "configs/Retrieval_flickr.yaml"),
    ("coco", "configs/Retrieval_coco.yaml"),
    ("vqa", "configs/VQA.yaml"),
    ("nlvr2", "configs/NLVR.yaml"),
    ("snli_ve", "configs/VE.yaml"),
];

/// Rewrites every `data/…` path of a config to `root/…`.
fn rebase(v: &mut serde_json::Value, root: &Path) {
    match v {
        serde_json::Value::String(s) => {
            if let Some(rest) = s.strip_prefix("data/") {
                *s = root.join(rest).display().to_string();
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|x| rebase(x, root)),
        _ => {}
    }
}

/// Checks every dataset of the standard layout present under `root` against the shipped config
/// that reads it: (dataset, report, or the error that stopped its check). Absent folders are
/// skipped.
pub fn check_root(root: &Path, configs_dir: &Path) -> Vec<(String, Result<CheckReport>)> {
    LAYOUT
        .iter()
        .filter(|(dir, _)| root.join(dir).is_dir())
        .map(|(dir, cfg)| {
            let path = configs_dir.join(cfg.trim_start_matches("configs/"));
            let result = TaskConfig::from_yaml_file(&path).and_then(|mut c| {
                c.extra.values_mut().for_each(|v| rebase(v, root));
                check(&c, &path)
            });
            (dir.to_string(), result)
        })
        .collect()
}

fn check(cfg: &TaskConfig, path: &Path) -> Result<CheckReport> {
    let res = cfg.image_res.unwrap_or(384);
    let mut report = CheckReport::default();
    let mut images: Vec<ImageRef> = Vec::new();
    let kind = task_kind(cfg);
    let root = || -> Result<PathBuf> { Ok(PathBuf::from(cfg.str("image_root")?)) };
    for key in ["train_file", "val_file", "test_file"] {
        for file in files(cfg, key)? {
            let mut entries = None;
            let found: Vec<ImageRef> = match (kind, key) {
                ("retrieval", "train_file") => {
                    RetrievalTrain::new(std::slice::from_ref(&file), &root()?, res, 30)?.images().cloned().collect()
                }
                ("retrieval", _) => RetrievalEval::new(&file, &root()?, res, 30)?.images,
                ("vqa", _) => {
                    let vqa_root = PathBuf::from(cfg.str("vqa_root")?);
                    let vg_root = cfg.str("vg_root").map(PathBuf::from).unwrap_or_else(|_| vqa_root.clone());
                    let one = std::slice::from_ref(&file);
                    let d = if key == "train_file" {
                        VqaDataset::train(one, &vqa_root, &vg_root, res, "")?
                    } else {
                        VqaDataset::test(one, &vqa_root, &vg_root, res)?
                    };
                    d.images().cloned().collect()
                }
                ("nlvr", _) | ("ve", _) => {
                    let format = if kind == "nlvr" { Format::Nlvr2 } else { Format::SnliVe };
                    let d = ClassifyDataset::new(std::slice::from_ref(&file), &root()?, format, res, false)?;
                    entries = Some(d.examples.len());
                    d.images().cloned().collect()
                }
                _ => {
                    let r = cfg.str("image_root").ok().map(PathBuf::from);
                    PretrainDataset::new(std::slice::from_ref(&file), r.as_deref(), res)?.images().cloned().collect()
                }
            };
            let distinct = found.iter().map(|im| &im.path).collect::<BTreeSet<_>>().len();
            report.files.push((file, entries.unwrap_or(found.len()), distinct));
            images.extend(found);
        }
    }
    if kind == "vqa" {
        let list = cfg.resolve(&cfg.str("answer_list")?)?;
        let n = read_answer_list(&list)?.len();
        report.files.push((list, n, 0));
    }
    if report.files.is_empty() {
        bail!("{} names no annotation files (train_file, val_file, test_file)", path.display());
    }
    // Each distinct image once.
    let mut seen = BTreeSet::new();
    images.retain(|im| seen.insert(im.path.clone()));
    report.images = images.len();
    let progress = Progress::new("Checking images", images.len());
    let done = std::sync::atomic::AtomicUsize::new(0);
    let problems: Vec<(bool, String)> = images
        .par_iter()
        .filter_map(|im| {
            let i = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            progress.step(i, String::new);
            if !im.path.is_file() {
                return Some((true, format!("{} ({})", im.path.display(), im.origin)));
            }
            RgbImage::open(&im.path).err().map(|e| (false, format!("{} ({}): {e:#}", im.path.display(), im.origin)))
        })
        .collect();
    progress.finish();
    for (missing, what) in problems {
        if missing {
            report.missing.push(what);
        } else {
            report.broken.push(what);
        }
    }
    report.missing.sort();
    report.broken.sort();
    Ok(report)
}
