//! RefCOCO / RefCOCO+ / RefCOCOg for weakly-supervised grounding: from the REFER files
//! (`refs(<split_by>).p` pickle + COCO `instances.json`) or from the Hugging Face parquet release
//! (`jxu124/refcoco` layout, whose corner boxes are converted), to `<dataset>_<split>.json` files
//! with one entry per expression (`image` under the COCO root, `text`, `ref_id`, `image_id`,
//! `bbox` [x, y, w, h]) and, for the REFER input, `refs(<name>).json`, the pickle as JSON.

use super::parquet_guard;
use super::prepare::{write_all, Written};
use crate::util::contain_panics;
use anyhow::{bail, Context, Result};
use arrow_array::{Array, Float64Array, Int64Array, ListArray, RecordBatch, StringArray};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A pickle value as JSON (Python 2 byte strings decoded as UTF-8).
fn to_json(v: serde_pickle::Value) -> Value {
    use serde_pickle::{HashableValue as H, Value as P};
    fn key(k: H) -> String {
        match k {
            H::String(s) => s,
            H::Bytes(b) => String::from_utf8_lossy(&b).into_owned(),
            H::I64(i) => i.to_string(),
            H::Int(i) => i.to_string(),
            H::F64(f) => f.to_string(),
            H::Bool(b) => b.to_string(),
            H::None => "None".into(),
            other => format!("{other:?}"),
        }
    }
    match v {
        P::None => Value::Null,
        P::Bool(b) => json!(b),
        P::I64(i) => json!(i),
        P::Int(i) => i.to_string().parse::<f64>().map(|f| json!(f)).unwrap_or(Value::Null),
        P::F64(f) => json!(f),
        P::String(s) => json!(s),
        P::Bytes(b) => json!(String::from_utf8_lossy(&b)),
        P::List(l) | P::Tuple(l) => Value::Array(l.into_iter().map(to_json).collect()),
        P::Set(s) | P::FrozenSet(s) => Value::Array(s.into_iter().map(|k| json!(key(k))).collect()),
        P::Dict(d) => Value::Object(d.into_iter().map(|(k, v)| (key(k), to_json(v))).collect::<Map<_, _>>()),
    }
}

pub(crate) fn read_pickle(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    crate::checkpoint::pickle_guard::check_data_pickle(&bytes, &path.display().to_string())?;
    let v = serde_pickle::value_from_slice(&bytes, serde_pickle::DeOptions::new().decode_strings())
        .map_err(|e| anyhow::anyhow!("{} is not a readable pickle ({e}); truncated download?", path.display()))?;
    Ok(to_json(v))
}

/// One grounding entry.
fn entry(image: String, text: &str, ref_id: i64, image_id: i64, bbox: &[f64]) -> Value {
    json!({"image": image, "text": text, "ref_id": ref_id, "image_id": image_id, "bbox": bbox})
}

fn write_splits(
    out: &Path,
    dataset: &str,
    splits: BTreeMap<String, Vec<Value>>,
    extra: Vec<(PathBuf, Value)>,
    force: bool,
) -> Result<Written> {
    let mut outputs: Vec<(PathBuf, Value)> =
        splits.into_iter().map(|(split, v)| (out.join(format!("{dataset}_{split}.json")), Value::Array(v))).collect();
    outputs.extend(extra);
    write_all(outputs, force)
}

/// REFER files. `refs_name` is how the converted refs file is named: `refs(<refs_name>).json`.
pub fn from_refer(
    refs: &Path,
    instances: &Path,
    dataset: &str,
    refs_name: &str,
    out: &Path,
    force: bool,
) -> Result<Written> {
    let refs_value = read_pickle(refs)?;
    let list = refs_value.as_array().with_context(|| format!("{}: expected a list of refs", refs.display()))?;
    let inst: Value = serde_json::from_str(
        &std::fs::read_to_string(instances).with_context(|| format!("cannot read {}", instances.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", instances.display()))?;
    let files: HashMap<i64, String> = inst["images"]
        .as_array()
        .with_context(|| format!("{}: no 'images' list", instances.display()))?
        .iter()
        .filter_map(|im| Some((im["id"].as_i64()?, im["file_name"].as_str()?.to_string())))
        .collect();
    let boxes: HashMap<i64, Vec<f64>> = inst["annotations"]
        .as_array()
        .with_context(|| format!("{}: no 'annotations' list", instances.display()))?
        .iter()
        .filter_map(|a| Some((a["id"].as_i64()?, a["bbox"].as_array()?.iter().filter_map(Value::as_f64).collect())))
        .collect();
    let mut splits: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (i, r) in list.iter().enumerate() {
        let at = || format!("{}: ref {i}", refs.display());
        let int = |k: &str| r[k].as_i64().with_context(|| format!("{} has no integer '{k}'", at()));
        let (ref_id, image_id, ann_id) = (int("ref_id")?, int("image_id")?, int("ann_id")?);
        let split = r["split"].as_str().with_context(|| format!("{} has no 'split'", at()))?.to_string();
        let file = files
            .get(&image_id)
            .with_context(|| format!("{}: image {image_id} is not in {}", at(), instances.display()))?;
        let bbox = boxes
            .get(&ann_id)
            .with_context(|| format!("{}: annotation {ann_id} is not in {}", at(), instances.display()))?;
        let sentences = r["sentences"].as_array().with_context(|| format!("{} has no 'sentences' list", at()))?;
        for s in sentences {
            let text = s["sent"]
                .as_str()
                .or_else(|| s["raw"].as_str())
                .with_context(|| format!("{}: a sentence has no 'sent'", at()))?;
            splits.entry(split.clone()).or_default().push(entry(
                format!("train2014/{file}"),
                text,
                ref_id,
                image_id,
                bbox,
            ));
        }
    }
    let refs_json = (out.join(format!("refs({refs_name}).json")), refs_value.clone());
    write_splits(out, dataset, splits, vec![refs_json], force)
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str, file: &Path) -> Result<&'a T> {
    batch
        .column_by_name(name)
        .with_context(|| format!("{}: no column '{name}'", file.display()))?
        .as_any()
        .downcast_ref::<T>()
        .with_context(|| format!("{}: column '{name}' has an unexpected type", file.display()))
}

/// The parquet release's box `[x1, y1, x2, y2]` (its dataset card; x + w, y + h of COCO's boxes)
/// as COCO's `[x, y, w, h]`, which REFER, Grounding.py and our outputs use. The difference
/// carries float error ((103.08 + 7.94) - 103.08 is 7.939999999999998), so each side is the
/// shortest decimal, to 6 places, that gives the stored corner back; COCO's boxes have 2.
fn corners_to_xywh(b: &[f64]) -> Result<Vec<f64>> {
    let side = |lo: f64, hi: f64| -> f64 {
        let d = hi - lo;
        (0..=6)
            .map(|places| {
                let scale = 10f64.powi(places);
                (d * scale).round() / scale
            })
            .find(|&c| lo + c == hi)
            .unwrap_or(d)
    };
    if b[2] < b[0] || b[3] < b[1] {
        bail!("is not x1, y1, x2, y2 (x2 < x1 or y2 < y1); the parquet release stores corners");
    }
    Ok(vec![b[0], b[1], side(b[0], b[2]), side(b[1], b[3])])
}

/// The Hugging Face parquet files (columns `ref_id`, `image_id`, `split`, `bbox` as corners,
/// `captions`).
pub fn from_parquet(files: &[PathBuf], dataset: &str, out: &Path, force: bool) -> Result<Written> {
    let mut splits: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for file in files {
        let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let damaged = || format!("{} is not a readable parquet file", file.display());
        parquet_guard::check_footer(&bytes).with_context(damaged)?;
        let bytes = bytes::Bytes::from(bytes);
        let builder = contain_panics(|| {
            Ok(parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes.clone())?)
        })
        .with_context(damaged)?;
        parquet_guard::check_pages(&bytes, builder.metadata()).with_context(damaged)?;
        let mut reader = contain_panics(|| Ok(builder.build()?)).with_context(damaged)?;
        let mut row = 0usize;
        loop {
            let batch = contain_panics(|| Ok(reader.next().transpose()?))
                .with_context(|| format!("{}: cannot decode rows after row {row}", file.display()))?;
            let Some(batch) = batch else { break };
            let ref_id = column::<Int64Array>(&batch, "ref_id", file)?;
            let image_id = column::<Int64Array>(&batch, "image_id", file)?;
            let split = column::<StringArray>(&batch, "split", file)?;
            let bbox = column::<ListArray>(&batch, "bbox", file)?;
            let captions = column::<ListArray>(&batch, "captions", file)?;
            for r in 0..batch.num_rows() {
                let b = bbox.value(r);
                let b: Vec<f64> = b
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .with_context(|| format!("{}: row {}, 'bbox' is not float64", file.display(), row + r))?
                    .values()
                    .to_vec();
                if b.len() != 4 {
                    bail!("{}: row {}, bbox has {} values (want x1, y1, x2, y2)", file.display(), row + r, b.len());
                }
                let b =
                    corners_to_xywh(&b).with_context(|| format!("{}: row {}, bbox {b:?}", file.display(), row + r))?;
                let caps = captions.value(r);
                let caps = caps.as_any().downcast_ref::<StringArray>().with_context(|| {
                    format!("{}: row {}, 'captions' is not a list of strings", file.display(), row + r)
                })?;
                let image = format!("train2014/COCO_train2014_{:012}.jpg", image_id.value(r));
                for c in 0..caps.len() {
                    splits.entry(split.value(r).to_string()).or_default().push(entry(
                        image.clone(),
                        caps.value(c),
                        ref_id.value(r),
                        image_id.value(r),
                        &b,
                    ));
                }
            }
            row += batch.num_rows();
        }
    }
    write_splits(out, dataset, splits, Vec::new(), force)
}
