//! The ALBEF models, sized by [`config::ModelConfig`].

pub mod bert;
pub mod classifier;
pub mod config;
pub mod contrastive;
pub mod contrastive_model;
pub mod heads;
pub mod momentum;
pub mod text_assign;
pub mod vit;
pub mod vqa;

pub use classifier::{ClassifierKind, ClassifierModel};
pub use config::{BertConfig, ModelConfig, VisionConfig};
pub use contrastive_model::{ContrastiveModel, Objective};
pub use text_assign::TextAssignModel;
pub use vqa::VqaModel;

use crate::nn::ParamStore;
use momentum::Ema;

/// What the task harness needs of any task model: its parameters, its sizes and, where it has a
/// teacher, the EMA that pairs the teacher with the student.
pub trait TaskModel {
    fn store(&self) -> &ParamStore;
    fn config(&self) -> &ModelConfig;
    fn ema(&self) -> Option<&Ema>;

    /// The ITC queues, where the model has them (gathered over ranks in a data-parallel run).
    fn queues(&self) -> Option<&momentum::Queues> {
        None
    }

    /// Teacher ← student (`copy_params`), where the model has a teacher.
    fn copy_teacher(&self) -> candle_core::Result<()> {
        self.ema().map_or(Ok(()), Ema::copy)
    }
}

impl TaskModel for ContrastiveModel {
    fn store(&self) -> &ParamStore {
        &self.store
    }
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn ema(&self) -> Option<&Ema> {
        self.ema()
    }
    fn queues(&self) -> Option<&momentum::Queues> {
        Some(&self.queues)
    }
}

impl TaskModel for VqaModel {
    fn store(&self) -> &ParamStore {
        &self.store
    }
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn ema(&self) -> Option<&Ema> {
        self.ema()
    }
}

impl TaskModel for ClassifierModel {
    fn store(&self) -> &ParamStore {
        &self.store
    }
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn ema(&self) -> Option<&Ema> {
        self.ema()
    }
}

impl TaskModel for TextAssignModel {
    fn store(&self) -> &ParamStore {
        &self.store
    }
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn ema(&self) -> Option<&Ema> {
        None
    }
}
