//! `albef data prepare`: official dataset files → the JSON layouts the tasks read (§6.1).
//! Every converter reads its inputs fully (errors name file and record), then writes its outputs
//! atomically, refusing to replace existing ones unless forced.

use crate::util::write_atomic;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// What a conversion wrote: (file, entries).
pub type Written = Vec<(PathBuf, usize)>;

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// JSON Lines: one object per line (blank lines skipped).
fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}: cannot read line {}", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line)
                .with_context(|| format!("{}: line {} is not a JSON object", path.display(), i + 1))?,
        );
    }
    Ok(out)
}

fn field<'a>(v: &'a Value, key: &str, file: &Path, record: &str) -> Result<&'a Value> {
    v.get(key).with_context(|| format!("{}: {record} has no field '{key}'", file.display()))
}

fn string(v: &Value, key: &str, file: &Path, record: &str) -> Result<String> {
    field(v, key, file, record)?
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("{}: {record}, field '{key}' must be a string", file.display()))
}

/// Writes all outputs, or none if any exists and `force` is off.
pub fn write_all(outputs: Vec<(PathBuf, Value)>, force: bool) -> Result<Written> {
    if !force {
        let existing: Vec<String> =
            outputs.iter().filter(|(p, _)| p.exists()).map(|(p, _)| p.display().to_string()).collect();
        if !existing.is_empty() {
            bail!("refusing to overwrite {} (use --force)", existing.join(", "));
        }
    }
    let mut written = Vec::new();
    for (path, value) in outputs {
        let n = value.as_array().map_or(1, |a| a.len());
        write_atomic(&path, serde_json::to_string(&value)?.as_bytes())?;
        written.push((path, n));
    }
    Ok(written)
}

/// Karpathy splits (`dataset_flickr30k.json` / `dataset_coco.json`) → retrieval files. Training
/// has one entry per caption (`restval` joins `train`, as ALBEF's COCO training set does); val
/// and test one entry per image with all captions. `image_prefix` maps an image to its path
/// relative to the image root.
fn karpathy(
    input: &Path,
    out: &Path,
    names: [&str; 3],
    image_path: &dyn Fn(&Value, &str) -> Result<String>,
    force: bool,
) -> Result<Written> {
    let doc = read_json(input)?;
    let images = doc
        .get("images")
        .and_then(Value::as_array)
        .with_context(|| format!("{}: no 'images' list (not a Karpathy split file?)", input.display()))?;
    let (mut train, mut val, mut test) = (Vec::new(), Vec::new(), Vec::new());
    for (i, img) in images.iter().enumerate() {
        let record = format!("image {i}");
        let split = string(img, "split", input, &record)?;
        let path = image_path(img, &record)?;
        let sentences = field(img, "sentences", input, &record)?
            .as_array()
            .with_context(|| format!("{}: {record}, 'sentences' must be a list", input.display()))?;
        let captions: Vec<String> =
            sentences.iter().map(|s| string(s, "raw", input, &record)).collect::<Result<_>>()?;
        let id = img.get("cocoid").or_else(|| img.get("imgid")).cloned().unwrap_or(json!(i));
        match split.as_str() {
            "train" | "restval" => {
                train.extend(captions.into_iter().map(|c| json!({"image": path, "caption": c, "image_id": id})))
            }
            "val" => val.push(json!({"image": path, "caption": captions})),
            "test" => test.push(json!({"image": path, "caption": captions})),
            other => bail!("{}: {record} has unknown split {other:?}", input.display()),
        }
    }
    write_all(
        vec![
            (out.join(names[0]), Value::Array(train)),
            (out.join(names[1]), Value::Array(val)),
            (out.join(names[2]), Value::Array(test)),
        ],
        force,
    )
}

/// Flickr30K: images under `images/`; writes `train.json`, `val.json`, `test.json`. When the
/// official archive's `flickr30k-images/` is in `out` and `images` is not, `images` is made a
/// relative link to it (see [`link_official_images`]).
pub fn flickr30k(input: &Path, out: &Path, force: bool) -> Result<Written> {
    let name = |img: &Value, record: &str| -> Result<String> {
        Ok(format!("images/{}", string(img, "filename", input, record)?))
    };
    let written = karpathy(input, out, ["train.json", "val.json", "test.json"], &name, force)?;
    link_official_images(out)?;
    Ok(written)
}

/// The official Flickr30K archive unpacks to `flickr30k-images/`, while both configs that read
/// Flickr30K (retrieval, and SNLI-VE's `image_root`) expect `images/`: a link serves both without
/// moving 31,783 files. An existing `images` (folder or link) is left alone.
fn link_official_images(out: &Path) -> Result<()> {
    let (images, official) = (out.join("images"), out.join("flickr30k-images"));
    if std::fs::symlink_metadata(&images).is_ok() || !official.is_dir() {
        return Ok(());
    }
    #[cfg(unix)]
    let linked = std::os::unix::fs::symlink("flickr30k-images", &images);
    #[cfg(windows)]
    let linked = std::os::windows::fs::symlink_dir("flickr30k-images", &images);
    linked.with_context(|| {
        format!("cannot link {} to flickr30k-images/ (rename that folder to images/)", images.display())
    })
}

/// COCO 2014 (Karpathy; test = 5,000 val2014 images): paths `<filepath>/<filename>` under the
/// COCO root; writes `annotations/retrieval_{train,val,test}.json`.
pub fn coco(input: &Path, out: &Path, force: bool) -> Result<Written> {
    let name = |img: &Value, record: &str| -> Result<String> {
        Ok(format!("{}/{}", string(img, "filepath", input, record)?, string(img, "filename", input, record)?))
    };
    karpathy(
        input,
        &out.join("annotations"),
        ["retrieval_train.json", "retrieval_val.json", "retrieval_test.json"],
        &name,
        force,
    )
}

/// VQA v2: official question (+ annotation) files per split → `vqa_{train,val,test}.json` with
/// COCO image paths, and `answer_list.json` of the `top_answers` most frequent answers of the
/// annotated splits, counted by each question's `multiple_choice_answer` (not its ten annotator
/// answers), the rule the reference's list came from.
pub fn vqa(
    splits: &[(String, PathBuf, Option<PathBuf>)],
    out: &Path,
    top_answers: usize,
    force: bool,
) -> Result<Written> {
    let mut outputs = Vec::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for (split, questions_file, annotations_file) in splits {
        let coco_split = match split.as_str() {
            "train" => "train2014",
            "val" => "val2014",
            "test" | "test-dev" => "test2015",
            other => bail!("unknown VQA split {other:?} (train, val, test)"),
        };
        let q = read_json(questions_file)?;
        let questions = q
            .get("questions")
            .and_then(Value::as_array)
            .with_context(|| format!("{}: no 'questions' list", questions_file.display()))?;
        let answers: HashMap<i64, Vec<String>> = match annotations_file {
            None => HashMap::new(),
            Some(f) => {
                let a = read_json(f)?;
                let anns = a
                    .get("annotations")
                    .and_then(Value::as_array)
                    .with_context(|| format!("{}: no 'annotations' list", f.display()))?;
                let mut map = HashMap::new();
                for (i, ann) in anns.iter().enumerate() {
                    let record = format!("annotation {i}");
                    let qid = field(ann, "question_id", f, &record)?
                        .as_i64()
                        .with_context(|| format!("{}: {record}, 'question_id' must be an integer", f.display()))?;
                    let list = field(ann, "answers", f, &record)?
                        .as_array()
                        .with_context(|| format!("{}: {record}, 'answers' must be a list", f.display()))?;
                    let list: Vec<String> =
                        list.iter().map(|x| string(x, "answer", f, &record)).collect::<Result<_>>()?;
                    if let Some(mc) = ann.get("multiple_choice_answer").and_then(Value::as_str) {
                        *counts.entry(mc.to_string()).or_default() += 1;
                    }
                    map.insert(qid, list);
                }
                map
            }
        };
        let mut entries = Vec::with_capacity(questions.len());
        for (i, item) in questions.iter().enumerate() {
            let record = format!("question {i}");
            let qid = field(item, "question_id", questions_file, &record)?
                .as_i64()
                .with_context(|| format!("{}: {record}, 'question_id' must be an integer", questions_file.display()))?;
            let image_id = field(item, "image_id", questions_file, &record)?
                .as_i64()
                .with_context(|| format!("{}: {record}, 'image_id' must be an integer", questions_file.display()))?;
            let mut e = json!({"dataset": "vqa", "image": format!("{coco_split}/COCO_{coco_split}_{image_id:012}.jpg"),
                               "question": string(item, "question", questions_file, &record)?, "question_id": qid});
            if annotations_file.is_some() {
                let a = answers.get(&qid).with_context(|| {
                    format!("{}: {record} (question_id {qid}) has no annotation", questions_file.display())
                })?;
                e["answer"] = json!(a);
            }
            entries.push(e);
        }
        outputs.push((out.join(format!("vqa_{split}.json")), Value::Array(entries)));
    }
    if !counts.is_empty() {
        let mut ranked: Vec<(String, usize)> = counts.into_iter().filter(|(a, _)| !a.is_empty()).collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let list: Vec<String> = ranked.into_iter().take(top_answers).map(|(a, _)| a).collect();
        outputs.push((out.join("answer_list.json"), json!(list)));
    }
    write_all(outputs, force)
}

/// Where NLVR2's image folder `name` (`train`, `dev`, `test1`) is, relative to `<out>/images/`
/// (NLVR.yaml's `image_root`): `<out>/images/<name>/` or `<out>/<name>/`, whichever exists; when
/// neither does yet, the layout the official image archives unpack to: train under
/// `images/train/`, dev and test1 to `dev/` and `test1/` beside `images/`.
fn nlvr2_folder(out: &Path, name: &str) -> String {
    let under_images = if out.join("images").join(name).is_dir() {
        true
    } else if out.join(name).is_dir() {
        false
    } else {
        name == "train"
    };
    if under_images {
        name.to_string()
    } else {
        format!("../{name}")
    }
}

/// NLVR2: official JSON-lines (`train.json`, `dev.json`, `test1.json`) → `{images, sentence,
/// label}` with the official image names `<split dir>/<identifier minus sentence index>-img{0,1}.png`
/// (train images sit in numbered sub-folders given by `directory`), as paths from `<out>/images/`
/// that resolve in the layout the official archives unpack to (see [`nlvr2_folder`]).
pub fn nlvr2(splits: &[(String, PathBuf)], out: &Path, force: bool) -> Result<Written> {
    let mut outputs = Vec::new();
    let mut folders: HashMap<String, String> = HashMap::new();
    for (split, file) in splits {
        let mut entries = Vec::new();
        for (i, rec) in read_jsonl(file)?.iter().enumerate() {
            let record = format!("line {}", i + 1);
            let identifier = string(rec, "identifier", file, &record)?;
            let stem = identifier.rsplit_once('-').map(|(s, _)| s.to_string()).with_context(|| {
                format!(
                    "{}: {record}, identifier {identifier:?} is not <split>-<set>-<pair>-<sentence>",
                    file.display()
                )
            })?;
            let name = identifier.split('-').next().unwrap_or(split);
            let folder = folders.entry(name.to_string()).or_insert_with(|| nlvr2_folder(out, name)).clone();
            let dir = match rec.get("directory") {
                Some(d) => format!(
                    "{folder}/{}",
                    d.as_i64().map(|n| n.to_string()).or_else(|| d.as_str().map(str::to_string)).unwrap_or_default()
                ),
                None => folder,
            };
            let label = string(rec, "label", file, &record)?;
            if label != "True" && label != "False" {
                bail!("{}: {record}, label {label:?} is neither \"True\" nor \"False\"", file.display());
            }
            entries.push(json!({"images": [format!("{dir}/{stem}-img0.png"), format!("{dir}/{stem}-img1.png")],
                                "sentence": string(rec, "sentence", file, &record)?, "label": label}));
        }
        outputs.push((out.join(format!("{split}.json")), Value::Array(entries)));
    }
    write_all(outputs, force)
}

/// SNLI-VE: official JSON-lines → `{image: Flickr30K id, sentence: hypothesis, label}`; the
/// image key may be `Flickr30K_ID` or the original release's `Flikr30kID`.
pub fn snli_ve(splits: &[(String, PathBuf)], out: &Path, force: bool) -> Result<Written> {
    let mut outputs = Vec::new();
    for (split, file) in splits {
        let mut entries = Vec::new();
        for (i, rec) in read_jsonl(file)?.iter().enumerate() {
            let record = format!("line {}", i + 1);
            let label = string(rec, "gold_label", file, &record)?;
            if !["entailment", "neutral", "contradiction"].contains(&label.as_str()) {
                bail!("{}: {record}, gold_label {label:?} is not entailment, neutral or contradiction", file.display());
            }
            // The originally released files spell the key `Flikr30kID` (sic) and give the file
            // name ("2677109430.jpg"); later copies `Flickr30K_ID`. The output is the bare id.
            let (key, image) = ["Flickr30K_ID", "Flikr30kID"]
                .into_iter()
                .find_map(|k| rec.get(k).map(|v| (k, v)))
                .with_context(|| format!("{}: {record} has no field 'Flickr30K_ID' or 'Flikr30kID'", file.display()))?;
            let image = image
                .as_str()
                .map(|s| s.strip_suffix(".jpg").unwrap_or(s).to_string())
                .or_else(|| image.as_i64().map(|n| n.to_string()))
                .with_context(|| format!("{}: {record}, '{key}' must be a string or integer", file.display()))?;
            entries.push(json!({"image": image, "sentence": string(rec, "sentence2", file, &record)?, "label": label}));
        }
        outputs.push((out.join(format!("ve_{split}.json")), Value::Array(entries)));
    }
    write_all(outputs, force)
}
