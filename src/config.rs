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
    /// albef extension: VQA decoder depth (the reference hard-codes 6).
    pub decoder_layers: Option<usize>,
    /// albef extension: NLVR2 encoder depth (the reference hard-codes 18).
    pub nlvr_layers: Option<usize>,
    /// albef extension: random-initialisation std (0.02 as the reference).
    pub init_std: Option<f64>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
    /// Folder of the YAML file, for resolving relative paths.
    #[serde(skip)]
    pub dir: PathBuf,
}

impl TaskConfig {
    pub fn from_yaml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        let mut cfg: TaskConfig =
            serde_norway::from_str(&text).with_context(|| format!("{} is not a valid task config", path.display()))?;
        cfg.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(cfg)
    }

    /// Finds a path the config names: as given (relative to the working directory, as the
    /// reference does), else next to the YAML file, else one folder up.
    pub fn resolve(&self, name: &str) -> Result<PathBuf> {
        let given = PathBuf::from(name);
        let candidates = [given.clone(), self.dir.join(&given), self.dir.join("..").join(&given)];
        candidates.iter().find(|p| p.exists()).cloned().with_context(|| {
            format!(
                "config names {name:?}, which exists at none of: {}",
                candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// Errors listing every key of `keys` the config lacks.
    pub fn require(&self, source: &Path, keys: &[&str]) -> Result<()> {
        let known = serde_json::to_value(self)?;
        let missing: Vec<&str> = keys.iter().copied().filter(|k| known.get(*k).is_none_or(|v| v.is_null())).collect();
        if !missing.is_empty() {
            bail!(
                "config {} is missing {}: {}",
                source.display(),
                if missing.len() == 1 { "a key" } else { "keys" },
                missing.join(", ")
            );
        }
        Ok(())
    }

    fn extra_value(&self, key: &str) -> Result<&serde_json::Value> {
        self.extra.get(key).with_context(|| format!("config has no '{key}'"))
    }

    pub fn str(&self, key: &str) -> Result<String> {
        self.extra_value(key)?
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("config key '{key}' must be a string"))
    }

    /// A path or a list of paths (`train_file`).
    pub fn strings(&self, key: &str) -> Result<Vec<String>> {
        match self.extra_value(key)? {
            serde_json::Value::String(s) => Ok(vec![s.clone()]),
            serde_json::Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).with_context(|| format!("config key '{key}' must list strings"))
                })
                .collect(),
            _ => bail!("config key '{key}' must be a string or a list of strings"),
        }
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.extra_value(key)?
            .as_u64()
            .map(|v| v as usize)
            .with_context(|| format!("config key '{key}' must be a non-negative integer"))
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.extra.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().with_context(|| format!("config key '{key}' must be True or False")),
        }
    }

    /// A nested block (`optimizer:`, `schedular:`) as a typed struct.
    pub fn block<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        serde_json::from_value(self.extra_value(key)?.clone())
            .with_context(|| format!("config block '{key}' is malformed"))
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
        if !vision.image_res.is_multiple_of(vision.patch_size) {
            bail!("image_res {} is not a multiple of the patch size {}", vision.image_res, vision.patch_size);
        }
        if let Some(w) = self.vision_width {
            if w != vision.embed_dim {
                bail!(
                    "vision_width {w} disagrees with the image encoder width {} (vision.embed_dim)",
                    vision.embed_dim
                );
            }
        }
        if bert.encoder_width != vision.embed_dim {
            bail!(
                "bert_config encoder_width {} must equal the image encoder width {}",
                bert.encoder_width,
                vision.embed_dim
            );
        }
        Ok(ModelConfig {
            vision,
            bert,
            embed_dim: self.embed_dim.unwrap_or(d.embed_dim),
            temp: self.temp.unwrap_or(d.temp),
            queue_size: self.queue_size.unwrap_or(d.queue_size),
            momentum: self.momentum.unwrap_or(d.momentum),
            distill: self.distill.unwrap_or(d.distill),
            decoder_layers: self.decoder_layers.unwrap_or(d.decoder_layers),
            nlvr_layers: self.nlvr_layers.unwrap_or(d.nlvr_layers),
            init_std: self.init_std.unwrap_or(d.init_std),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_yaml_and_bert_json() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cfg = TaskConfig::from_yaml_file(&root.join("configs/tiny/fixture.yaml")).unwrap();
        assert_eq!(cfg.k_test, Some(2));
        // `bert_config` is relative to the working directory, the package root under cargo test.
        let m = cfg.model_config().unwrap();
        assert_eq!(m.vision.image_res, 48);
        assert_eq!(m.vision.embed_dim, 32);
        assert_eq!(m.bert.hidden_size, 32);
        assert_eq!(m.bert.fusion_layer, 2);
        assert_eq!(m.embed_dim, 16);
        assert_eq!(m.queue_size, 16);
        assert_eq!(cfg.extra.get("alpha"), None, "alpha is a known key");
    }

    #[test]
    fn inconsistent_widths_are_rejected() {
        let mut cfg: TaskConfig = serde_norway::from_str("image_res: 384\nvision_width: 512\n").unwrap();
        cfg.dir = PathBuf::from(".");
        let e = cfg.model_config().unwrap_err().to_string();
        assert!(e.contains("vision_width 512"), "{e}");
        let cfg: TaskConfig = serde_norway::from_str("image_res: 380\n").unwrap();
        assert!(cfg.model_config().unwrap_err().to_string().contains("multiple of the patch size"));
    }
}

#[cfg(test)]
mod reference_configs {
    use super::*;

    #[test]
    fn shipped_retrieval_configs_match_the_reference() {
        for (file, k, epochs) in [("configs/Retrieval_flickr.yaml", 128, 10), ("configs/Retrieval_coco.yaml", 256, 5)] {
            let cfg = TaskConfig::from_yaml_file(Path::new(file)).unwrap();
            let m = cfg.model_config().unwrap();
            assert_eq!(m, ModelConfig::default(), "{file}: ViT-B/16 + bert-base at 384");
            assert_eq!(cfg.k_test, Some(k));
            assert_eq!(cfg.usize("batch_size_train").unwrap(), 32);
            let s: crate::train::schedule::ScheduleConfig = cfg.block("schedular").unwrap();
            assert_eq!((s.lr, s.min_lr, s.epochs, s.warmup_epochs), (1e-5, 1e-6, epochs, 1));
        }
    }
}
