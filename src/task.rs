//! What a task is: one name per reference script, shared by the CLI, the configs, checkpoint
//! metadata and remapping, `data check` and the training loop.

use anyhow::{bail, Result};
use std::fmt;
use std::str::FromStr;

/// One reference script's task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Task {
    /// `Pretrain.py`: ITC + ITM + MLM.
    Pretrain,
    /// `Retrieval.py`: Flickr30K / COCO.
    Retrieval,
    /// `Grounding.py`: RefCOCO+ (the retrieval model).
    Grounding,
    /// `VQA.py`.
    Vqa,
    /// `Pretrain_nlvr.py`: text-assignment pre-training for NLVR2.
    NlvrPretrain,
    /// `NLVR.py`.
    Nlvr,
    /// `VE.py`: SNLI-VE.
    Ve,
}

impl Task {
    pub const ALL: [Task; 7] =
        [Task::Pretrain, Task::Retrieval, Task::Grounding, Task::Vqa, Task::NlvrPretrain, Task::Nlvr, Task::Ve];

    /// The name used on the command line and in checkpoint metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Pretrain => "pretrain",
            Task::Retrieval => "retrieval",
            Task::Grounding => "grounding",
            Task::Vqa => "vqa",
            Task::NlvrPretrain => "nlvr-pretrain",
            Task::Nlvr => "nlvr",
            Task::Ve => "ve",
        }
    }

    /// Whether a checkpoint trained for `source` may initialise this task's model: its own task,
    /// and the hand-overs of the reference's pipelines (pre-training → every task but NLVR2,
    /// retrieval → grounding, text assignment → NLVR2).
    pub fn accepts_checkpoint_of(self, source: Task) -> bool {
        source == self
            || (source == Task::Pretrain && self != Task::Nlvr)
            || matches!((source, self), (Task::Retrieval, Task::Grounding) | (Task::NlvrPretrain, Task::Nlvr))
    }

    /// The reference's image resolution for a task when no config says otherwise.
    pub fn default_image_res(self) -> usize {
        match self {
            Task::Pretrain | Task::NlvrPretrain => 256,
            _ => 384,
        }
    }
}

impl Task {
    /// The task of a config named as the reference names its configs (`Retrieval_coco.yaml`,
    /// `VQA.yaml`, `NLVR_pretrain.yaml`, …).
    pub fn of_reference_config(path: &std::path::Path) -> Result<Task> {
        let stem = path.file_stem().map(|s| s.to_string_lossy().to_lowercase()).unwrap_or_default();
        let task = match stem.as_str() {
            "pretrain" => Task::Pretrain,
            s if s.starts_with("retrieval") => Task::Retrieval,
            "grounding" => Task::Grounding,
            "vqa" => Task::Vqa,
            "nlvr_pretrain" => Task::NlvrPretrain,
            "nlvr" => Task::Nlvr,
            "ve" => Task::Ve,
            _ => bail!(
                "cannot tell the task of {} from its name; pass --task (one of: {})",
                path.display(),
                Task::ALL.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", ")
            ),
        };
        Ok(task)
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Task {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        // `nlvrpretrain` is what albef 0.1 wrote into text-assignment checkpoints by mistake.
        let s = if s == "nlvrpretrain" { "nlvr-pretrain" } else { s };
        match Task::ALL.iter().find(|t| t.as_str() == s) {
            Some(t) => Ok(*t),
            None => bail!(
                "unknown task {s:?} (one of: {})",
                Task::ALL.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in Task::ALL {
            assert_eq!(t.as_str().parse::<Task>().unwrap(), t);
        }
        assert_eq!("nlvrpretrain".parse::<Task>().unwrap(), Task::NlvrPretrain);
        assert!("retreival".parse::<Task>().unwrap_err().to_string().contains("retrieval"));
    }

    #[test]
    fn checkpoint_hand_overs() {
        assert!(Task::Vqa.accepts_checkpoint_of(Task::Pretrain));
        assert!(!Task::Nlvr.accepts_checkpoint_of(Task::Pretrain));
        assert!(Task::Nlvr.accepts_checkpoint_of(Task::NlvrPretrain));
        assert!(Task::Grounding.accepts_checkpoint_of(Task::Retrieval));
        assert!(!Task::Retrieval.accepts_checkpoint_of(Task::Vqa));
        assert!(!Task::Ve.accepts_checkpoint_of(Task::Nlvr));
    }
}
