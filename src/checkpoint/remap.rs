//! The reference's per-task key remapping when a checkpoint is loaded (§2.4), in one place.

//!
//! The remaps are written over `name → V` maps: the values are tensors (a state dict in memory)
//! or source names (`name in the model → name in the file`, so that tensors are read from the
//! file only once they are loaded, one at a time).

use crate::task::Task;
use std::collections::BTreeMap;

/// What a checkpoint file looks like, judged from its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// `ALBEF.pth`-style: `text_encoder.bert.*` (BertForMaskedLM), 12 layers.
    Pretrained,
    /// Already in a task model's naming (`text_encoder.encoder.*`, released fine-tuned files, TA).
    TaskLayout,
}

pub fn source_kind<V>(sd: &BTreeMap<String, V>) -> SourceKind {
    if sd.keys().any(|k| k.starts_with("text_encoder.bert.")) {
        SourceKind::Pretrained
    } else {
        SourceKind::TaskLayout
    }
}

/// Applies the remap the reference script for `task` applies (`evaluate` = its `--evaluate`
/// flag). Unlike the reference, a remap meant for pre-trained files is skipped on a file that is
/// already in task layout (issues #7, #101); the returned notes say what was done.
pub fn remap<V: Clone>(
    task: Task,
    sd: BTreeMap<String, V>,
    evaluate: bool,
    fusion_layer: usize,
) -> (BTreeMap<String, V>, Vec<String>) {
    let kind = source_kind(&sd);
    let mut notes = Vec::new();
    let wants = match task {
        Task::Retrieval | Task::Grounding => true,
        Task::Ve | Task::Vqa => !evaluate,
        Task::NlvrPretrain => true,
        Task::Nlvr | Task::Pretrain => false,
    };
    if !wants {
        return (sd, notes);
    }
    if kind != SourceKind::Pretrained {
        if task == Task::Vqa {
            notes.push(
                "checkpoint is already in VQA layout: decoder remap skipped (the reference would break it, issue #101)"
                    .into(),
            );
        }
        return (sd, notes);
    }
    let out = match task {
        Task::Retrieval | Task::Grounding | Task::Ve => strip_bert(sd),
        Task::Vqa => vqa_decoder_from_encoder(sd, fusion_layer),
        Task::NlvrPretrain => nlvr_duplicate_layers(strip_bert(sd), fusion_layer),
        Task::Nlvr | Task::Pretrain => sd,
    };
    notes.push(format!("applied the {task} remap of pre-trained keys"));
    (out, notes)
}

/// Every key containing `bert` loses its first `bert.`: `text_encoder.bert.X → text_encoder.X`.
fn strip_bert<V>(sd: BTreeMap<String, V>) -> BTreeMap<String, V> {
    sd.into_iter().map(|(k, v)| if k.contains("bert") { (k.replacen("bert.", "", 1), v) } else { (k, v) }).collect()
}

/// VQA.py: the encoder keeps all layers (copies without `bert.`); the decoder gets the
/// embeddings, the MLM head and encoder layers `fusion_layer..` renumbered from 0.
fn vqa_decoder_from_encoder<V: Clone>(sd: BTreeMap<String, V>, fusion_layer: usize) -> BTreeMap<String, V> {
    let mut out = BTreeMap::new();
    for (key, value) in sd {
        if key.contains("bert") {
            out.insert(key.replacen("bert.", "", 1), value.clone());
        }
        if !key.contains("text_encoder") {
            out.insert(key, value);
            continue;
        }
        let mut new_key = key.clone();
        if key.contains("layer") {
            let parts: Vec<&str> = key.split('.').collect();
            let Some(n) = parts.get(4).and_then(|s| s.parse::<usize>().ok()) else {
                continue;
            };
            if n < fusion_layer {
                continue;
            }
            let mut parts: Vec<String> = parts.iter().map(|s| s.to_string()).collect();
            parts[4] = (n - fusion_layer).to_string();
            new_key = parts.join(".");
        }
        out.insert(new_key.replacen("text_encoder", "text_decoder", 1), value);
    }
    out
}

/// Pretrain_nlvr.py: fusion layer n ≥ f becomes layers f + 2(n − f) and f + 2(n − f) + 1.
fn nlvr_duplicate_layers<V: Clone>(sd: BTreeMap<String, V>, fusion_layer: usize) -> BTreeMap<String, V> {
    let mut out = BTreeMap::new();
    for (key, value) in sd {
        let parts: Vec<&str> = key.split('.').collect();
        let layer = if key.contains("layer") { parts.get(3).and_then(|s| s.parse::<usize>().ok()) } else { None };
        match layer {
            Some(n) if n >= fusion_layer => {
                for new in [fusion_layer + 2 * (n - fusion_layer), fusion_layer + 2 * (n - fusion_layer) + 1] {
                    let mut p: Vec<String> = parts.iter().map(|s| s.to_string()).collect();
                    p[3] = new.to_string();
                    out.insert(p.join("."), value.clone());
                }
            }
            _ => {
                out.insert(key, value);
            }
        }
    }
    out
}
