//! The tasks: one module per reference script, each holding only what is specific to it (its
//! datasets, its batch step, its validation and its outputs). [`harness`] does the rest.

pub mod classify;
pub mod demo;
pub mod gradcam;
pub mod grounding;
pub mod harness;
pub mod nlvr_pretrain;
pub mod pretrain;
pub mod retrieval;
pub mod search;
pub mod vqa;

use crate::checkpoint::{classify_file, load_with, remap, CheckpointFile, CheckpointKind, KeyReport, StateDict};
use crate::config::Overrides;
use crate::model::{
    ClassifierKind, ClassifierModel, ContrastiveModel, ModelConfig, Objective, TaskModel, TextAssignModel, VqaModel,
};
use crate::task::Task;
use crate::util::mem;
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
    /// Non-finite training steps tolerated (skipped) over the run; 0: the first one stops it.
    pub skip_nonfinite: u64,
    /// Batch sizes and resolution given on the command line, in place of the config's.
    pub overrides: Overrides,
    /// The communicator of a data-parallel run (`albef launch`, torchrun, SLURM); `None` on one
    /// process.
    pub dist: Option<crate::dist::Comm>,
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
            skip_nonfinite: 0,
            overrides: Overrides::default(),
            dist: None,
        }
    }
}

/// The model a task trains, for callers that only know the task (`checkpoint inspect`).
pub fn build_model(task: Task, cfg: &ModelConfig, device: &Device, seed: u64) -> Result<Box<dyn TaskModel>> {
    Ok(match task {
        Task::Pretrain => Box::new(ContrastiveModel::new(cfg, Objective::Pretrain, device, seed)?),
        Task::Retrieval | Task::Grounding => Box::new(ContrastiveModel::new(cfg, Objective::Retrieval, device, seed)?),
        Task::Vqa => Box::new(VqaModel::new(cfg, device, seed)?),
        Task::Ve => Box::new(ClassifierModel::new(cfg, ClassifierKind::VisualEntailment, device, seed)?),
        Task::Nlvr => Box::new(ClassifierModel::new(cfg, ClassifierKind::Nlvr2, device, seed)?),
        Task::NlvrPretrain => Box::new(TextAssignModel::new(cfg, device, seed)?),
    })
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

/// Refuses a checkpoint that cannot initialise `task`'s model, explaining why.
fn check_kind(path: &Path, kind: &CheckpointKind, task: Task) -> Result<()> {
    let source = match kind {
        CheckpointKind::Other => bail!(
            "{} is {kind}; expected an ALBEF checkpoint (ALBEF.pth, a fine-tuned file or one albef wrote)",
            path.display()
        ),
        CheckpointKind::Pretraining { .. } => Task::Pretrain,
        CheckpointKind::Ours { task } => *task,
        CheckpointKind::FineTuned { task: Some(t), .. } => *t,
        CheckpointKind::FineTuned { task: None, .. } => return Ok(()),
    };
    if task.accepts_checkpoint_of(source) {
        return Ok(());
    }
    if task == Task::Nlvr && source == Task::Pretrain {
        bail!(
            "{} is {kind}; NLVR2 fine-tuning starts from the text-assignment checkpoint (the output of \
             `albef nlvr-pretrain`, or the released pretrain_model_nlvr.pth)",
            path.display()
        );
    }
    bail!(
        "{} is {kind}; it cannot initialise a {task:?} model (use a pre-training checkpoint such as ALBEF.pth)",
        path.display()
    )
}

/// Reads `path`, applies `task`'s remap (`evaluate` as the script's `--evaluate`) and loads it.
pub fn load_checkpoint(
    model: &dyn TaskModel,
    task: Task,
    path: &Path,
    evaluate: bool,
    teacher: TeacherInit,
) -> Result<KeyReport> {
    let file = CheckpointFile::open(path)?;
    mem::stage("read checkpoint index");
    let kind = classify_file(&file);
    check_kind(path, &kind, task)?;
    let fusion_layer = model.config().bert.fusion_layer;
    // The remap works on names: model name → file name; tensors are read only when loaded. Our
    // `checkpoint_last` carries the optimizer state, which only `--resume` reads.
    let ours = matches!(kind, CheckpointKind::Ours { .. });
    let names: BTreeMap<String, String> = file
        .tensors()
        .keys()
        .filter(|k| !(ours && k.starts_with("optimizer.")))
        .map(|k| (k.clone(), k.clone()))
        .collect();
    let (sources, notes) = remap(task, names, evaluate, fusion_layer);
    let shapes: BTreeMap<String, Vec<usize>> =
        sources.iter().map(|(k, src)| (k.clone(), file.tensors()[src].shape.clone())).collect();
    mem::stage("key remap");
    let store = model.store();
    let device = store.device().clone();
    let dry = store.mode().placeholders;
    let mut fetch = |key: &str| file.load(&sources[key], &device);
    let mut report = load_with(store, &shapes, if dry { None } else { Some(&mut fetch) })?;
    mem::stage("load into store");
    report.notes.insert(0, format!("{}: {kind}", path.display()));
    report.notes.extend(notes);
    if report.teacher_missing(model.store()) {
        match teacher {
            TeacherInit::FromLoaded => {
                // Placeholders are never written (a report, not a model to run).
                if !dry {
                    model.copy_teacher()?;
                }
                report.notes.push("no momentum weights in the checkpoint: teacher initialised from the loaded weights".into());
                mem::stage("teacher copy");
            }
            TeacherInit::Reference => report
                .notes
                .push("no momentum weights in the checkpoint: teacher keeps its initial weights (reference behaviour; see --teacher-from-checkpoint)".into()),
        }
    }
    Ok(report)
}

/// Saves a model as safetensors (atomically), tagged with its task so that loading it into
/// another task's model is refused.
pub fn save_model(model: &dyn TaskModel, task: Task, path: &Path, extra: &BTreeMap<String, String>) -> Result<()> {
    let tensors: StateDict = model.store().named_tensors().into_iter().collect();
    let mut meta = crate::checkpoint::albef_metadata(task);
    meta.extend(extra.clone());
    crate::checkpoint::save_safetensors(&tensors, &meta, path)
}
