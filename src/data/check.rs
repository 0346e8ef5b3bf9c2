//! `albef data check --config C`: before a long run, read every annotation file a task config
//! names with the task's own readers, and open and decode every image they reference (in
//! parallel), reporting what is missing or broken.

use super::classify::{ClassifyDataset, Format};
use super::loader::Dataset;
use super::pretrain::{shard_sample, PretrainDataset};
use super::retrieval::{ImageRef, RetrievalEval, RetrievalTrain};
use super::shards::{resolve_shards, ShardSet};
use super::transform::RgbImage;
use super::vqa::{read_answer_list, VqaDataset};
use crate::config::{
    read_yaml, resolve, GroundingConfig, NlvrConfig, NlvrPretrainConfig, PretrainConfig, RetrievalConfig, VeConfig,
    VqaConfig,
};
use crate::progress::Progress;
use crate::task::Task;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_norway::Value;
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

/// Reads the config's annotation files (errors in them stop the check, naming file and entry)
/// and checks every image.
pub fn check_config(path: &Path, task: Task) -> Result<CheckReport> {
    check(read_yaml(path)?, path, task)
}

/// The shipped configs' data folders, for `--root`.
pub const LAYOUT: [(&str, &str, Task); 6] = [
    ("flickr30k", "configs/Retrieval_flickr.yaml", Task::Retrieval),
    ("coco", "configs/Retrieval_coco.yaml", Task::Retrieval),
    ("vqa", "configs/VQA.yaml", Task::Vqa),
    ("nlvr2", "configs/NLVR.yaml", Task::Nlvr),
    ("snli_ve", "configs/VE.yaml", Task::Ve),
    ("refcoco+", "configs/Grounding.yaml", Task::Grounding),
];

/// Rewrites every `data/…` path of a config to `root/…`.
fn rebase(v: &mut Value, root: &Path) {
    match v {
        Value::String(s) => {
            // Grounding.yaml's `refcoco_data: 'data'` names the folder itself.
            if s == "data" {
                *s = root.display().to_string();
            } else if let Some(rest) = s.strip_prefix("data/") {
                *s = root.join(rest).display().to_string();
            }
        }
        Value::Sequence(items) => items.iter_mut().for_each(|x| rebase(x, root)),
        _ => {}
    }
}

/// Checks every dataset of the standard layout present under `root` against the shipped config
/// that reads it: (dataset, report, or the error that stopped its check). Absent folders are
/// skipped.
pub fn check_root(root: &Path, configs_dir: &Path) -> Vec<(String, Result<CheckReport>)> {
    LAYOUT
        .iter()
        .filter(|(dir, _, _)| root.join(dir).is_dir())
        .map(|(dir, cfg, task)| {
            let path = configs_dir.join(cfg.trim_start_matches("configs/"));
            let result = read_yaml(&path).and_then(|mut value| {
                if let Some(map) = value.as_mapping_mut() {
                    map.values_mut().for_each(|v| rebase(v, root));
                }
                check(value, &path, *task)
            });
            (dir.to_string(), result)
        })
        .collect()
}

/// Every annotation file of a config with its entry count and the images its entries name, read
/// with `task`'s own readers.
fn annotations(value: Value, path: &Path, task: Task) -> Result<Vec<(PathBuf, usize, Vec<ImageRef>)>> {
    let mut out = Vec::new();
    let one = |f: &PathBuf| std::slice::from_ref(f).to_vec();
    match task {
        Task::Retrieval => {
            let (data, model) = RetrievalConfig::data_keys(value, path)?;
            let (res, root) = (model.image_res.unwrap_or(384), PathBuf::from(&data.image_root));
            for f in data.train_file.iter().flat_map(|f| f.names()) {
                let f = resolve(path, f)?;
                let d = RetrievalTrain::new(&one(&f), &root, res, 30)?;
                out.push((f, d.len(), d.images().cloned().collect()));
            }
            for f in [&data.val_file, &data.test_file] {
                let f = resolve(path, f)?;
                let d = RetrievalEval::new(&f, &root, res, 30)?;
                out.push((f, d.images.len(), d.images));
            }
        }
        Task::Vqa => {
            let (data, model) = VqaConfig::data_keys(value, path)?;
            let res = model.image_res.unwrap_or(384);
            let vqa_root = PathBuf::from(&data.vqa_root);
            let vg_root = data.vg_root.as_ref().map_or_else(|| vqa_root.clone(), PathBuf::from);
            for (train, files) in [(true, data.train_file.as_ref()), (false, Some(&data.test_file))] {
                for f in files.iter().flat_map(|f| f.names()) {
                    let f = resolve(path, f)?;
                    let d = if train {
                        VqaDataset::train(&one(&f), &vqa_root, &vg_root, res, "")?
                    } else {
                        VqaDataset::test(&one(&f), &vqa_root, &vg_root, res)?
                    };
                    out.push((f, d.len(), d.images().cloned().collect()));
                }
            }
            let list = resolve(path, &data.answer_list)?;
            let n = read_answer_list(&list)?.len();
            out.push((list, n, Vec::new()));
        }
        Task::Nlvr | Task::Ve => {
            let (data, model) = if task == Task::Nlvr {
                NlvrConfig::data_keys(value, path)?
            } else {
                VeConfig::data_keys(value, path)?
            };
            let format = if task == Task::Nlvr { Format::Nlvr2 } else { Format::SnliVe };
            let (res, root) = (model.image_res.unwrap_or(384), PathBuf::from(&data.image_root));
            let files = [data.train_file.as_ref(), Some(&data.val_file), Some(&data.test_file)];
            for f in files.into_iter().flatten().flat_map(|f| f.names()) {
                let f = resolve(path, f)?;
                let d = ClassifyDataset::new(&one(&f), &root, format, res, false)?;
                out.push((f, d.len(), d.images().cloned().collect()));
            }
        }
        Task::NlvrPretrain => {
            let (data, model) = NlvrPretrainConfig::data_keys(value, path)?;
            let root = data.image_root.as_ref().map(PathBuf::from);
            for f in data.train_file.names() {
                let f = resolve(path, f)?;
                let d = PretrainDataset::new(&one(&f), root.as_deref(), model.image_res.unwrap_or(256))?;
                out.push((f, d.len(), d.images().cloned().collect()));
            }
        }
        Task::Grounding => out.extend(grounding_files(value, path)?),
        Task::Pretrain => {
            let (data, model) = PretrainConfig::data_keys(value, path)?;
            let root = data.image_root.as_ref().map(PathBuf::from);
            for f in data.train_file.iter().flat_map(|f| f.names()) {
                let f = resolve(path, f)?;
                let d = PretrainDataset::new(&one(&f), root.as_deref(), model.image_res.unwrap_or(256))?;
                out.push((f, d.len(), d.images().cloned().collect()));
            }
        }
    }
    Ok(out)
}

// --- Grounding (Grounding.yaml) ---

/// Grounding's files: the expression files (train and test), the REFER refs and
/// `instances.json`, `dets.json` and `cocos.json`; every test expression must have its ref and
/// proposals.
fn grounding_files(value: Value, path: &Path) -> Result<Vec<(PathBuf, usize, Vec<ImageRef>)>> {
    use super::grounding::{check_coverage, find_refer, Dets, GroundingEval, GroundingTrain, Refer};
    let (data, model) = GroundingConfig::data_keys(value, path)?;
    let (res, root) = (model.image_res.unwrap_or(384), PathBuf::from(&data.image_root));
    let mut out = Vec::new();
    for f in data.train_file.iter().flat_map(|f| f.names()) {
        let f = resolve(path, f)?;
        let d = GroundingTrain::new(std::slice::from_ref(&f), &root, res)?;
        out.push((f, d.len(), d.images().cloned().collect()));
    }
    let mut test = Vec::new();
    for f in data.test_file.names() {
        let f = resolve(path, f)?;
        let d = GroundingEval::new(std::slice::from_ref(&f), &root, res)?;
        out.push((f, d.len(), d.expressions.iter().map(|e| e.image.clone()).collect()));
        test.push(d);
    }
    let (refs, instances) = find_refer(&resolve(path, &data.refcoco_data)?)?;
    let refer = Refer::open(&refs, &instances)?;
    out.push((refs, refer.refs.len(), Vec::new()));
    out.push((instances, refer.refs.len(), Vec::new()));
    let dets = Dets::open(&resolve(path, &data.det_file)?)?;
    out.push((dets.file.clone(), dets.boxes.len(), Vec::new()));
    for d in &test {
        check_coverage(d, &refer, &dets)?;
    }
    if let Some(c) = &data.coco_file {
        let c = resolve(path, c)?;
        let text = std::fs::read_to_string(&c).with_context(|| format!("cannot read {}", c.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", c.display()))?;
        let n = v.as_array().map(Vec::len).or_else(|| v.as_object().map(|o| o.len())).unwrap_or(1);
        out.push((c, n, Vec::new()));
    }
    Ok(out)
}

/// Pre-training's `train_shards`: every sample of every shard read and decoded. Adds one line per
/// shard to the report; undecodable samples count as unreadable images, damaged or unopenable
/// shards as missing.
fn check_shards(value: &Value, path: &Path, report: &mut CheckReport) -> Result<()> {
    let (data, model) = PretrainConfig::data_keys(value.clone(), path)?;
    let Some(patterns) = &data.train_shards else { return Ok(()) };
    let set = ShardSet::open(resolve_shards(path, &patterns.names())?)?;
    let res = model.image_res.unwrap_or(256);
    let decode = move |raw: &super::shards::RawSample, rng: &mut rand::rngs::StdRng| shard_sample(raw, res, false, rng);
    let (samples, bad, damaged) = super::shards::check_shards(&set, &decode);
    for (shard, n) in set.shards.iter().zip(&set.counts) {
        report.files.push((shard.clone(), *n, *n));
    }
    report.images += samples;
    report.broken.extend(bad);
    report.missing.extend(damaged.into_iter().map(|d| format!("damaged shard {d}")));
    Ok(())
}

fn check(value: Value, path: &Path, task: Task) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    if task == Task::Pretrain {
        check_shards(&value, path, &mut report)?;
    }
    let mut images: Vec<ImageRef> = Vec::new();
    for (file, entries, found) in annotations(value, path, task)? {
        let distinct = found.iter().map(|im| &im.path).collect::<BTreeSet<_>>().len();
        report.files.push((file, entries, distinct));
        images.extend(found);
    }
    if report.files.is_empty() {
        bail!("{} names no annotation files (train_file, val_file, test_file)", path.display());
    }
    // Each distinct image once.
    let mut seen = BTreeSet::new();
    images.retain(|im| seen.insert(im.path.clone()));
    report.images += images.len();
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
