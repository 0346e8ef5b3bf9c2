//! What a checkpoint file is, judged from its keys (for `albef checkpoint inspect` and for
//! errors that explain a checkpoint of the wrong kind).

use super::io::{Checkpoint, CheckpointFile};
use crate::task::Task;
use std::collections::BTreeMap;
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckpointKind {
    /// Written by albef (safetensors with `albef_task` metadata).
    Ours { task: Task },
    /// `ALBEF.pth` / `ALBEF_4M.pth` style pre-training state (with or without teacher).
    Pretraining { with_teacher: bool },
    /// A task model's state dict (released fine-tuned files, or reference training checkpoints).
    FineTuned { task: Option<Task>, with_teacher: bool },
    /// Not recognisably an ALBEF checkpoint (e.g. DeiT or bert-base weights).
    Other,
}

impl fmt::Display for CheckpointKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let teacher = |t: &bool| {
            if *t {
                "with momentum (teacher) weights"
            } else {
                "without momentum weights"
            }
        };
        match self {
            Self::Ours { task } => write!(f, "albef checkpoint (task {task})"),
            Self::Pretraining { with_teacher } => write!(f, "ALBEF pre-training checkpoint, {}", teacher(with_teacher)),
            Self::FineTuned { task: Some(t), with_teacher } => {
                write!(f, "fine-tuned {t:?} checkpoint, {}", teacher(with_teacher))
            }
            Self::FineTuned { task: None, with_teacher } => {
                write!(f, "fine-tuned checkpoint of unknown task, {}", teacher(with_teacher))
            }
            Self::Other => write!(f, "not an ALBEF checkpoint (no visual_encoder.* / text_encoder.* keys)"),
        }
    }
}

/// The task whose model has exactly these heads.
fn task_from_keys(has: &dyn Fn(&str) -> bool, max_layer: Option<usize>) -> Option<Task> {
    if has("text_decoder.") {
        Some(Task::Vqa)
    } else if has("ta_head.") {
        Some(Task::NlvrPretrain)
    } else if has("cls_head.") {
        Some(if max_layer.is_some_and(|l| l >= 12) { Task::Nlvr } else { Task::Ve })
    } else if has("itm_head.") {
        Some(Task::Retrieval)
    } else {
        None
    }
}

pub fn classify(ckpt: &Checkpoint) -> CheckpointKind {
    classify_names(&mut ckpt.tensors.keys().map(String::as_str), &ckpt.metadata)
}

/// [`classify`] of an open file, from its names alone.
pub fn classify_file(file: &CheckpointFile) -> CheckpointKind {
    classify_names(&mut file.tensors().keys().map(String::as_str), &file.metadata)
}

fn classify_names(names: &mut dyn Iterator<Item = &str>, metadata: &BTreeMap<String, String>) -> CheckpointKind {
    if let Some(task) = metadata.get("albef_task").and_then(|t| t.parse().ok()) {
        return CheckpointKind::Ours { task };
    }
    let keys: Vec<&str> = names.collect();
    let has = |prefix: &str| keys.iter().any(|k| k.starts_with(prefix));
    if !has("visual_encoder.") && !has("text_encoder.") {
        return CheckpointKind::Other;
    }
    let with_teacher = has("visual_encoder_m.");
    if has("text_encoder.bert.") && has("text_encoder.cls.") {
        return CheckpointKind::Pretraining { with_teacher };
    }
    let max_layer = keys
        .iter()
        .filter_map(|k| k.strip_prefix("text_encoder.encoder.layer."))
        .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
        .max();
    CheckpointKind::FineTuned { task: task_from_keys(&has, max_layer), with_teacher }
}
