//! Task assembly: build the model a task needs and load a checkpoint into it the way the
//! reference script for that task does.

pub mod classify;
pub mod demo;
pub mod nlvr_pretrain;
pub mod retrieval;
pub mod vqa;

use crate::checkpoint::{classify, load_into, read_checkpoint, remap, CheckpointKind, KeyReport, StateDict, Task};
use crate::model::{
    ClassifierKind, ClassifierModel, ContrastiveModel, ModelConfig, Objective, TextAssignModel, VqaModel,
};
use crate::nn::ParamStore;
use anyhow::{bail, Result};
use candle_core::Device;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What every task run takes: the reference scripts' common flags, plus resuming and stopping.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The task YAML.
    pub config: PathBuf,
    pub output_dir: PathBuf,
    /// Local `bert-base-uncased` folder or vocab file.
    pub text_encoder: PathBuf,
    pub checkpoint: Option<PathBuf>,
    pub evaluate: bool,
    /// Continue from `output_dir/checkpoint_last.safetensors`.
    pub resume: bool,
    pub seed: u64,
    pub device: Device,
    /// Loader worker threads (default: one per core).
    pub workers: Option<usize>,
    /// Stop after this many completed epochs (continue later with `resume`).
    pub stop_after_epoch: Option<usize>,
}

impl RunOptions {
    /// A fresh CPU run with the reference's seed.
    pub fn new(config: impl Into<PathBuf>, output_dir: impl Into<PathBuf>, text_encoder: impl Into<PathBuf>) -> Self {
        Self {
            config: config.into(),
            output_dir: output_dir.into(),
            text_encoder: text_encoder.into(),
            checkpoint: None,
            evaluate: false,
            resume: false,
            seed: 42,
            device: Device::Cpu,
            workers: None,
            stop_after_epoch: None,
        }
    }
}

/// Any of the task models.
pub enum TaskModel {
    Contrastive(ContrastiveModel),
    Vqa(VqaModel),
    Classifier(ClassifierModel),
    TextAssign(TextAssignModel),
}

impl TaskModel {
    pub fn new(task: Task, cfg: &ModelConfig, device: &Device, seed: u64) -> Result<Self> {
        Ok(match task {
            Task::Pretrain => Self::Contrastive(ContrastiveModel::new(cfg, Objective::Pretrain, device, seed)?),
            Task::Retrieval | Task::Grounding => {
                Self::Contrastive(ContrastiveModel::new(cfg, Objective::Retrieval, device, seed)?)
            }
            Task::Vqa => Self::Vqa(VqaModel::new(cfg, device, seed)?),
            Task::Ve => Self::Classifier(ClassifierModel::new(cfg, ClassifierKind::VisualEntailment, device, seed)?),
            Task::Nlvr => Self::Classifier(ClassifierModel::new(cfg, ClassifierKind::Nlvr2, device, seed)?),
            Task::NlvrPretrain => Self::TextAssign(TextAssignModel::new(cfg, device, seed)?),
        })
    }

    pub fn store(&self) -> &ParamStore {
        match self {
            Self::Contrastive(m) => &m.store,
            Self::Vqa(m) => &m.store,
            Self::Classifier(m) => &m.store,
            Self::TextAssign(m) => &m.store,
        }
    }

    /// Teacher ← student (`copy_params`), where the model has a teacher.
    pub fn copy_teacher(&self) -> Result<()> {
        match self {
            Self::Contrastive(m) => m.ema.copy()?,
            Self::Vqa(m) => m.ema.as_ref().map(|e| e.copy()).transpose().map(|_| ())?,
            Self::Classifier(m) => m.ema.as_ref().map(|e| e.copy()).transpose().map(|_| ())?,
            Self::TextAssign(_) => {}
        }
        Ok(())
    }
}

/// How the teacher is set when the checkpoint has no momentum weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TeacherInit {
    /// As the reference: the teacher keeps the values it had before loading (NLVR.py calls
    /// `copy_params()` before `load_state_dict`, so its teacher starts random / bert-base).
    Reference,
    /// Copy the loaded student weights into the teacher (LAVIS's fix).
    FromLoaded,
}

/// The reference's default for each task: only NLVR2 has the quirk.
pub fn default_teacher_init(task: Task) -> TeacherInit {
    if task == Task::Nlvr {
        TeacherInit::Reference
    } else {
        TeacherInit::FromLoaded
    }
}

/// Reads `path`, applies `task`'s remap (`evaluate` as the script's `--evaluate`) and loads it.
pub fn load_checkpoint(
    model: &TaskModel,
    task: Task,
    cfg: &ModelConfig,
    path: &Path,
    evaluate: bool,
    teacher: TeacherInit,
) -> Result<KeyReport> {
    let ckpt = read_checkpoint(path, model.store().device())?;
    let kind = classify(&ckpt);
    if kind == CheckpointKind::Other {
        bail!(
            "{} is {kind}; expected an ALBEF checkpoint (ALBEF.pth, a fine-tuned file or one albef wrote)",
            path.display()
        );
    }
    if let CheckpointKind::FineTuned { task: Some(t), .. } = &kind {
        let compatible =
            *t == task || matches!((t, task), (Task::Retrieval, Task::Grounding) | (Task::NlvrPretrain, Task::Nlvr));
        if !compatible {
            bail!("{} is a fine-tuned {t:?} checkpoint; it cannot initialise a {task:?} model (use a pre-training checkpoint such as ALBEF.pth)", path.display());
        }
    }
    if task == Task::Nlvr && matches!(kind, CheckpointKind::Pretraining { .. }) {
        bail!(
            "{} is {kind}; NLVR2 fine-tuning starts from the text-assignment checkpoint (the output of \
             `albef nlvr-pretrain`, or the released pretrain_model_nlvr.pth)",
            path.display()
        );
    }
    let (sd, notes): (StateDict, Vec<String>) = remap(task, ckpt.tensors, evaluate, cfg.bert.fusion_layer);
    let mut report = load_into(model.store(), &sd)?;
    report.notes.insert(0, format!("{}: {kind}", path.display()));
    report.notes.extend(notes);
    if report.teacher_missing(model.store()) {
        match teacher {
            TeacherInit::FromLoaded => {
                model.copy_teacher()?;
                report.notes.push("no momentum weights in the checkpoint: teacher initialised from the loaded weights".into());
            }
            TeacherInit::Reference => report
                .notes
                .push("no momentum weights in the checkpoint: teacher keeps its initial weights (reference behaviour; see --teacher-from-checkpoint)".into()),
        }
    }
    Ok(report)
}

/// Saves a model as safetensors (atomically), tagged with the task so `inspect` recognises it.
pub fn save_model(model: &TaskModel, task: Task, path: &Path, extra: &BTreeMap<String, String>) -> Result<()> {
    let tensors: StateDict = model.store().named_tensors().into_iter().collect();
    let mut meta = extra.clone();
    meta.insert("albef_task".into(), format!("{task:?}").to_lowercase());
    meta.insert("albef_version".into(), env!("CARGO_PKG_VERSION").into());
    crate::checkpoint::save_safetensors(&tensors, &meta, path)
}
