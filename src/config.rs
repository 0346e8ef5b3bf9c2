//! Task configuration: the reference's YAML files (`configs/*.yaml`) with their keys, plus our
//! `vision:` extension. The model sizes come from here and from the JSON `bert_config` names.

use crate::checkpoint::Task;
use crate::model::{BertConfig, ModelConfig, VisionConfig};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The keys the model reads; everything else in the YAML is kept in `extra` for the tasks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskConfig {
    pub image_res: Option<usize>,
    pub bert_config: Option<String>,
    pub embed_dim: Option<usize>,
    pub vision_width: Option<usize>,
    pub temp: Option<f64>,
    pub queue_size: Option<usize>,
    pub momentum: Option<f64>,
    pub alpha: Option<f64>,
    pub distill: Option<bool>,
    pub mlm_probability: Option<f64>,
    pub k_test: Option<usize>,
    pub vision: Option<VisionConfig>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
    /// Folder of the YAML file, for resolving relative paths.
    #[serde(skip)]
    pub dir: PathBuf,
}

impl TaskConfig {
    pub fn from_yaml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        let mut cfg: TaskConfig = serde_norway::from_str(&text).with_context(|| format!("{} is not a valid task config", path.display()))?;
        cfg.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(cfg)
    }

    /// Finds a path the config names: as given (relative to the working directory, as the
    /// reference does), else next to the YAML file, else one folder up.
    pub fn resolve(&self, name: &str) -> Result<PathBuf> {
        let given = PathBuf::from(name);
        let candidates = [given.clone(), self.dir.join(&given), self.dir.join("..").join(&given)];
        candidates.iter().find(|p| p.exists()).cloned().with_context(|| {
            format!("config names {name:?}, which exists at none of: {}", candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))
        })
    }

    /// The model sizes this config describes.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let d = ModelConfig::default();
        let bert = match &self.bert_config {
            Some(p) => BertConfig::from_json_file(&self.resolve(p)?)?,
            None => BertConfig::default(),
        };
        let mut vision = self.vision.clone().unwrap_or_default();
        vision.image_res = self.image_res.unwrap_or(vision.image_res);
        if vision.image_res % vision.patch_size != 0 {
            bail!("image_res {} is not a multiple of the patch size {}", vision.image_res, vision.patch_size);
        }
        if let Some(w) = self.vision_width {
            if w != vision.embed_dim {
                bail!("vision_width {w} disagrees with the image encoder width {} (vision.embed_dim)", vision.embed_dim);
            }
        }
        if bert.encoder_width != vision.embed_dim {
            bail!("bert_config encoder_width {} must equal the image encoder width {}", bert.encoder_width, vision.embed_dim);
        }
        Ok(ModelConfig {
            vision,
            bert,
            embed_dim: self.embed_dim.unwrap_or(d.embed_dim),
            temp: self.temp.unwrap_or(d.temp),
            queue_size: self.queue_size.unwrap_or(d.queue_size),
            momentum: self.momentum.unwrap_or(d.momentum),
            distill: self.distill.unwrap_or(d.distill),
            ..d
        })
    }
}

/// The reference's model sizes for a task when no config is given (ViT-B/16 + bert-base).
pub fn default_model_config(task: Task) -> ModelConfig {
    let mut cfg = ModelConfig::default();
    cfg.vision.image_res = match task {
        Task::Pretrain | Task::NlvrPretrain => 256,
        _ => 384,
    };
    cfg
}
