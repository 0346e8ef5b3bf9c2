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
