//! Task configuration: the reference's YAML files (`configs/*.yaml`), parsed once into typed
//! structs. A config is three parts read from the same top-level keys: [`ModelKeys`] (sizes, every
//! task), [`TrainKeys`] (the training loop) and the task's own keys (`T`, e.g. [`RetrievalKeys`]).
//!
//! An unknown key is an error naming the file and the closest known key (the reference silently
//! ignores a misspelt key); so is a value albef does not implement (`sched: step`).

use crate::model::{BertConfig, ModelConfig, VisionConfig};
use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_aux::serde_introspection::serde_introspect;
use serde_norway::{Mapping, Value};
use std::path::{Path, PathBuf};

/// The keys that size the model. The reference hard-codes what our extensions make configurable.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ModelKeys {
    pub image_res: Option<usize>,
    pub bert_config: Option<String>,
    pub embed_dim: Option<usize>,
    pub vision_width: Option<usize>,
    pub temp: Option<f64>,
    pub queue_size: Option<usize>,
    pub momentum: Option<f64>,
    pub distill: Option<bool>,
    /// albef extension: the image encoder's size (the reference hard-codes ViT-B/16).
    pub vision: Option<VisionConfig>,
    /// albef extension: VQA decoder depth (the reference hard-codes 6).
    pub decoder_layers: Option<usize>,
    /// albef extension: NLVR2 encoder depth (the reference hard-codes 18).
    pub nlvr_layers: Option<usize>,
    /// albef extension: random-initialisation std (0.02 as the reference).
    pub init_std: Option<f64>,
    /// Pre-training: share of eligible tokens masked for MLM (0.15).
    pub mlm_probability: Option<f64>,
    /// albef extension: `fp32` (default) or `bf16` mixed precision (see [`crate::nn::Precision`]).
    pub precision: Option<crate::nn::Precision>,
}

/// The YAML `optimizer:` block. Only AdamW exists in the reference configs; `lr` is overwritten
/// by the schedule (as in the reference, whose scheduler sets the rate before the first step).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OptimizerConfig {
    pub opt: String,
    pub lr: Option<f64>,
    pub weight_decay: f64,
}

/// The YAML `schedular:` block (sic), timm's `create_scheduler` arguments.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ScheduleConfig {
    pub sched: String,
    pub lr: f64,
    pub epochs: usize,
    pub min_lr: f64,
    pub warmup_lr: f64,
    pub warmup_epochs: usize,
    /// timm's cycle decay: with the reference's single cosine cycle it changes nothing.
    pub decay_rate: Option<f64>,
    /// timm adds it to the epoch count it returns, which the reference scripts ignore (they loop
    /// over `schedular.epochs`); the same here.
    pub cooldown_epochs: Option<usize>,
}

/// The training-loop keys (needed only when training).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainKeys {
    pub optimizer: Option<OptimizerConfig>,
    pub schedular: Option<ScheduleConfig>,
    /// Distillation weight; tasks without distillation have none.
    pub alpha: Option<f64>,
    /// Ramp α over the first epoch (default on, as every reference config but VE's).
    pub warm_up: Option<bool>,
    /// albef extension: micro-batches whose averaged gradients make one optimizer step (1).
    pub accum_steps: Option<usize>,
}

/// What training needs from [`TrainKeys`], checked present.
#[derive(Clone, Debug)]
pub struct Training {
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleConfig,
    pub alpha: f64,
    pub warm_up: bool,
    /// Micro-batches per optimizer step (≥ 1), see [`crate::train::LoopConfig::accum_steps`].
    pub accum_steps: usize,
    pub batch_size: usize,
    pub train_file: Files,
}

/// One path or a list of paths (`train_file: [a, b]` or `val_file: a`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Files {
    One(String),
    Many(Vec<String>),
}

impl Files {
    pub fn names(&self) -> Vec<&str> {
        match self {
            Files::One(s) => vec![s.as_str()],
            Files::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// A task's own keys: its data keys (`Data`: annotation files and image folders, all that
/// `albef data check` reads) and the rest (batch sizes, `k_test`, …).
pub trait TaskKeys: Clone + Serialize + DeserializeOwned {
    type Data: Clone + Serialize + DeserializeOwned;
    /// Keys of the task's own that training needs (checked with `optimizer` and `schedular`,
    /// so that one error lists everything missing).
    const TRAINING_KEYS: &'static [&'static str];
    /// The annotation files to train on, if the config names them.
    fn train_file(data: &Self::Data) -> Option<&Files>;
    /// Training batch size, if the config gives one (and its key, for errors).
    fn train_batch(&self) -> (Option<usize>, &'static str);
    /// The keys of the training and the evaluation batch size (`--batch_size_train`,
    /// `--batch_size_test` set them); NLVR.yaml and NLVR_pretrain.yaml have one for both.
    const BATCH_KEYS: (&'static str, &'static str) = ("batch_size_train", "batch_size_test");
    /// Refuses values albef does not implement.
    fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// Command-line values that replace the config's (the memory levers: batch sizes, resolution).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    pub batch_size_train: Option<usize>,
    pub batch_size_test: Option<usize>,
    pub image_res: Option<usize>,
    pub precision: Option<crate::nn::Precision>,
    pub accum_steps: Option<usize>,
}

/// A parsed task config.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(bound = "T: TaskKeys")]
pub struct Config<T: TaskKeys> {
    #[serde(flatten)]
    pub model: ModelKeys,
    #[serde(flatten)]
    pub train: TrainKeys,
    #[serde(flatten)]
    pub data: T::Data,
    #[serde(flatten)]
    pub task: T,
    /// The YAML file, for errors and for resolving relative paths.
    #[serde(skip)]
    pub path: PathBuf,
}

/// Reads a YAML file as a mapping (so that keys can be checked before typing).
pub fn read_yaml(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
    let value: Value =
        serde_norway::from_str(&text).with_context(|| format!("{} is not a valid YAML file", path.display()))?;
    if !value.is_mapping() {
        bail!("{} is not a task config (expected `key: value` lines)", path.display());
    }
    Ok(value)
}

/// Finds a file that the config at `config` names: as given (relative to the working directory,
/// as the reference does), else next to the YAML file, else one folder up.
pub fn resolve(config: &Path, name: &str) -> Result<PathBuf> {
    let dir = config.parent().unwrap_or(Path::new(""));
    let given = PathBuf::from(name);
    let candidates = [given.clone(), dir.join(&given), dir.join("..").join(&given)];
    candidates.iter().find(|p| p.exists()).cloned().with_context(|| {
        format!(
            "config {} names {name:?}, which exists at none of: {}",
            config.display(),
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    })
}

/// `unknown key 'x'` errors for every key of `map` not in `known`, each with the closest known
/// key when one is near.
fn unknown_keys(map: &Mapping, known: &[&str], prefix: &str) -> Vec<String> {
    map.keys()
        .filter_map(|k| {
            let k = k.as_str().map(str::to_string).unwrap_or_else(|| format!("{k:?}"));
            if known.contains(&k.as_str()) {
                return None;
            }
            let closest = known
                .iter()
                .map(|c| (strsim::levenshtein(&k, c), *c))
                .min()
                .filter(|(d, c)| *d <= 3.max(c.len() / 3))
                .map(|(_, c)| format!(" (did you mean '{prefix}{c}'?)"))
                .unwrap_or_default();
            Some(format!("unknown key '{prefix}{k}'{closest}"))
        })
        .collect()
}

/// One part of a config, typed; an error names the key at fault (`schedular.epochs: …`).
fn typed<P: DeserializeOwned>(value: &Value) -> std::result::Result<P, String> {
    serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })
}

/// The field name in a serde "missing field `x`" message.
fn missing_field(msg: &str) -> Option<String> {
    let rest = msg.split("missing field `").nth(1)?;
    Some(rest.split('`').next()?.to_string())
}

impl<T: TaskKeys> Config<T> {
    /// Reads and checks a config; `training` also requires the keys training needs.
    pub fn load(path: &Path, training: bool) -> Result<Self> {
        Self::from_value(read_yaml(path)?, path, training)
    }

    /// [`Config::load`] with command-line values in place of the file's.
    pub fn load_with(path: &Path, training: bool, overrides: &Overrides) -> Result<Self> {
        let mut value = read_yaml(path)?;
        let (train_key, test_key) = T::BATCH_KEYS;
        if let (true, Some(a), Some(b)) = (train_key == test_key, overrides.batch_size_train, overrides.batch_size_test)
        {
            if a != b {
                bail!(
                    "{} has one '{train_key}' for training and evaluation: --batch_size_train {a} and \
                     --batch_size_test {b} cannot both hold",
                    path.display()
                );
            }
        }
        let map = value.as_mapping_mut().expect("read_yaml returns a mapping");
        for (key, v) in [
            (train_key, overrides.batch_size_train),
            (test_key, overrides.batch_size_test),
            ("image_res", overrides.image_res),
        ] {
            if let Some(v) = v {
                map.insert(Value::from(key), Value::from(v as u64));
            }
        }
        if let Some(n) = overrides.accum_steps {
            map.insert(Value::from("accum_steps"), Value::from(n as u64));
        }
        if let Some(p) = overrides.precision {
            map.insert(Value::from("precision"), Value::from(p.to_string()));
        }
        Self::from_value(value, path, training)
    }

    /// Types a config read by [`read_yaml`] (possibly edited, as `data check --root` does).
    /// Every problem found is reported at once: unknown keys, missing keys, malformed values.
    pub fn from_value(value: Value, path: &Path, training: bool) -> Result<Self> {
        let map = value.as_mapping().with_context(|| format!("{} is not a task config", path.display()))?;
        let mut problems = Self::unknown(map);
        let mut missing = Vec::new();
        if training {
            let needed = ["optimizer", "schedular"].iter().chain(T::TRAINING_KEYS);
            missing.extend(needed.filter(|k| !map.contains_key(**k)).map(|k| k.to_string()));
        }
        let mut part = |r: std::result::Result<(), String>| match r {
            Ok(()) => {}
            Err(e) => match missing_field(&e) {
                Some(f) => missing.push(f),
                None => problems.push(e),
            },
        };
        let (mut model, mut train, mut data, mut task) = (None, None, None, None);
        part(typed::<ModelKeys>(&value).map(|v| model = Some(v)));
        part(typed::<TrainKeys>(&value).map(|v| train = Some(v)));
        part(typed::<T::Data>(&value).map(|v| data = Some(v)));
        part(typed::<T>(&value).map(|v| task = Some(v)));
        if !missing.is_empty() {
            let s = if missing.len() == 1 { "a key" } else { "keys" };
            problems.push(format!("missing {s}: {}", missing.join(", ")));
        }
        let (Some(model), Some(train), Some(data), Some(task), true) = (model, train, data, task, problems.is_empty())
        else {
            bail!("config {}: {}", path.display(), problems.join("; "));
        };
        let cfg = Config { model, train, data, task, path: path.to_path_buf() };
        cfg.validate().with_context(|| format!("config {}", path.display()))?;
        Ok(cfg)
    }

    /// Every key of the config (and of its `optimizer`, `schedular` and `vision` blocks) that
    /// no part of it reads.
    fn unknown(map: &Mapping) -> Vec<String> {
        let known: Vec<&str> = [
            serde_introspect::<ModelKeys>(),
            serde_introspect::<TrainKeys>(),
            serde_introspect::<T::Data>(),
            serde_introspect::<T>(),
        ]
        .concat();
        let mut problems = unknown_keys(map, &known, "");
        for (block, fields) in [
            ("optimizer", serde_introspect::<OptimizerConfig>()),
            ("schedular", serde_introspect::<ScheduleConfig>()),
            ("vision", serde_introspect::<VisionConfig>()),
        ] {
            if let Some(Value::Mapping(inner)) = map.get(block) {
                problems.extend(unknown_keys(inner, fields, &format!("{block}.")));
            }
        }
        problems
    }

    /// The data keys alone, for `albef data check`: the other keys may be absent, but none may be
    /// unknown.
    pub fn data_keys(value: Value, path: &Path) -> Result<(T::Data, ModelKeys)> {
        let map = value.as_mapping().with_context(|| format!("{} is not a task config", path.display()))?;
        let problems = Self::unknown(map);
        if !problems.is_empty() {
            bail!("config {}: {}", path.display(), problems.join("; "));
        }
        let data = typed::<T::Data>(&value).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        let model = typed::<ModelKeys>(&value).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        Ok((data, model))
    }

    fn validate(&self) -> Result<()> {
        if let Some(o) = &self.train.optimizer {
            if !o.opt.eq_ignore_ascii_case("adamw") {
                bail!("optimizer.opt {:?} is not implemented (albef implements the reference's adamW)", o.opt);
            }
        }
        if let Some(s) = &self.train.schedular {
            if s.sched != "cosine" {
                bail!("schedular.sched {:?} is not implemented (albef implements the reference's cosine)", s.sched);
            }
        }
        self.task.validate()
    }

    /// The training keys, all present; errors list every one that is missing.
    pub fn training(&self) -> Result<Training> {
        let (batch, batch_key) = self.task.train_batch();
        let mut missing = Vec::new();
        if T::train_file(&self.data).is_none() {
            missing.push("train_file");
        }
        if batch.is_none() {
            missing.push(batch_key);
        }
        if self.train.optimizer.is_none() {
            missing.push("optimizer");
        }
        if self.train.schedular.is_none() {
            missing.push("schedular");
        }
        if !missing.is_empty() {
            let s = if missing.len() == 1 { "a key" } else { "keys" };
            bail!("config {} is missing {s} needed for training: {}", self.path.display(), missing.join(", "));
        }
        Ok(Training {
            optimizer: self.train.optimizer.clone().expect("checked"),
            schedule: self.train.schedular.clone().expect("checked"),
            alpha: self.train.alpha.unwrap_or(0.0),
            warm_up: self.train.warm_up.unwrap_or(true),
            accum_steps: self.train.accum_steps.unwrap_or(1),
            batch_size: batch.expect("checked"),
            train_file: T::train_file(&self.data).expect("checked").clone(),
        })
    }

    /// Finds a file the config names: as given (relative to the working directory, as the
    /// reference does), else next to the YAML file, else one folder up.
    pub fn resolve(&self, name: &str) -> Result<PathBuf> {
        resolve(&self.path, name)
    }

    pub fn files(&self, files: &Files) -> Result<Vec<PathBuf>> {
        files.names().into_iter().map(|n| self.resolve(n)).collect()
    }

    /// The model sizes this config describes.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let keys = &self.model;
        let d = ModelConfig::default();
        if self.train.accum_steps == Some(0) {
            bail!("accum_steps must be at least 1");
        }
        if let Some(p) = keys.mlm_probability {
            if !(0.0..=1.0).contains(&p) {
                bail!("mlm_probability {p} is not in [0, 1]");
            }
        }
        let bert = match &keys.bert_config {
            Some(p) => BertConfig::from_json_file(&self.resolve(p)?)?,
            None => BertConfig::default(),
        };
        let mut vision = keys.vision.clone().unwrap_or_default();
        vision.image_res = keys.image_res.unwrap_or(vision.image_res);
        if !vision.image_res.is_multiple_of(vision.patch_size) {
            bail!("image_res {} is not a multiple of the patch size {}", vision.image_res, vision.patch_size);
        }
        if let Some(w) = keys.vision_width {
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
            embed_dim: keys.embed_dim.unwrap_or(d.embed_dim),
            temp: keys.temp.unwrap_or(d.temp),
            queue_size: keys.queue_size.unwrap_or(d.queue_size),
            momentum: keys.momentum.unwrap_or(d.momentum),
            distill: keys.distill.unwrap_or(d.distill),
            decoder_layers: keys.decoder_layers.unwrap_or(d.decoder_layers),
            nlvr_layers: keys.nlvr_layers.unwrap_or(d.nlvr_layers),
            init_std: keys.init_std.unwrap_or(d.init_std),
            mode: d.mode,
            mlm_probability: keys.mlm_probability.unwrap_or(d.mlm_probability),
        })
    }

    /// The config as the run folder keeps it (`config.yaml`).
    pub fn to_yaml(&self) -> Result<String> {
        Ok(serde_norway::to_string(self)?)
    }
}

/// A file that only sizes a model (`configs/tiny/fixture.yaml`, `checkpoint inspect --config`):
/// every task key is allowed and ignored, the model keys are checked.
pub fn model_config_from_file(path: &Path) -> Result<ModelConfig> {
    let mut value = read_yaml(path)?;
    let model_keys = serde_introspect::<ModelKeys>();
    if let Some(map) = value.as_mapping_mut() {
        map.retain(|k, _| k.as_str().is_some_and(|k| model_keys.contains(&k)));
    }
    Config::<ModelOnly>::from_value(value, path, false)?.model_config()
}

/// No task keys.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelOnly {}

impl TaskKeys for ModelOnly {
    type Data = ModelOnly;
    const TRAINING_KEYS: &'static [&'static str] = &[];
    fn train_file(_: &ModelOnly) -> Option<&Files> {
        None
    }
    fn train_batch(&self) -> (Option<usize>, &'static str) {
        (None, "batch_size_train")
    }
}

/// The reference's model sizes for a task when no config is given (ViT-B/16 + bert-base).
pub fn default_model_config(task: crate::task::Task) -> ModelConfig {
    let mut cfg = ModelConfig::default();
    cfg.vision.image_res = task.default_image_res();
    cfg
}

/// The training image transform of retrieval (albef extension).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TrainTransform {
    /// RandomResizedCrop(0.5, 1), flip, RandomAugment(2, 7), as the reference.
    #[default]
    Reference,
    /// Resize only (the demo's synthetic captions say "left of", which a flip would falsify).
    Resize,
}

/// Retrieval data keys (`Retrieval_flickr.yaml`, `Retrieval_coco.yaml`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RetrievalData {
    pub train_file: Option<Files>,
    pub val_file: String,
    pub test_file: String,
    pub image_root: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RetrievalKeys {
    pub batch_size_train: Option<usize>,
    pub batch_size_test: usize,
    pub k_test: usize,
    pub train_transform: Option<TrainTransform>,
}

impl TaskKeys for RetrievalKeys {
    type Data = RetrievalData;
    const TRAINING_KEYS: &'static [&'static str] = &["train_file", "batch_size_train"];
    fn train_file(data: &RetrievalData) -> Option<&Files> {
        data.train_file.as_ref()
    }
    fn train_batch(&self) -> (Option<usize>, &'static str) {
        (self.batch_size_train, "batch_size_train")
    }
}

/// VQA data keys (`VQA.yaml`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VqaData {
    pub train_file: Option<Files>,
    pub test_file: Files,
    pub answer_list: String,
    pub vqa_root: String,
    /// Visual Genome images (default: `vqa_root`).
    pub vg_root: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VqaKeys {
    pub batch_size_train: Option<usize>,
    pub batch_size_test: usize,
    pub k_test: usize,
    /// Appended to every answer (default `[SEP]`).
    pub eos: Option<String>,
}

impl TaskKeys for VqaKeys {
    type Data = VqaData;
    const TRAINING_KEYS: &'static [&'static str] = &["train_file", "batch_size_train"];
    fn train_file(data: &VqaData) -> Option<&Files> {
        data.train_file.as_ref()
    }
    fn train_batch(&self) -> (Option<usize>, &'static str) {
        (self.batch_size_train, "batch_size_train")
    }
}

/// SNLI-VE and NLVR2 data keys (`VE.yaml`, `NLVR.yaml`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClassifyData {
    pub train_file: Option<Files>,
    pub val_file: Files,
    pub test_file: Files,
    pub image_root: String,
}

/// `VE.yaml`: separate train and test batch sizes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VeKeys {
    pub batch_size_train: Option<usize>,
    pub batch_size_test: usize,
}

impl TaskKeys for VeKeys {
    type Data = ClassifyData;
    const TRAINING_KEYS: &'static [&'static str] = &["train_file", "batch_size_train"];
    fn train_file(data: &ClassifyData) -> Option<&Files> {
        data.train_file.as_ref()
    }
    fn train_batch(&self) -> (Option<usize>, &'static str) {
        (self.batch_size_train, "batch_size_train")
    }
}

/// `NLVR.yaml`: one batch size for every loader.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NlvrKeys {
    pub batch_size: usize,
    /// NLVR.yaml has `eval_ema: False`, which NLVR.py never reads.
    pub eval_ema: Option<bool>,
}

impl TaskKeys for NlvrKeys {
    type Data = ClassifyData;
    const BATCH_KEYS: (&'static str, &'static str) = ("batch_size", "batch_size");
    const TRAINING_KEYS: &'static [&'static str] = &["train_file"];
    fn train_file(data: &ClassifyData) -> Option<&Files> {
        data.train_file.as_ref()
    }
    fn train_batch(&self) -> (Option<usize>, &'static str) {
        (Some(self.batch_size), "batch_size")
    }
    fn validate(&self) -> Result<()> {
        if self.eval_ema == Some(true) {
            bail!("eval_ema: True is not implemented (NLVR.py reads no such key; the reference evaluates the student)");
        }
        Ok(())
    }
}

/// `NLVR_pretrain.yaml` data keys.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NlvrPretrainData {
    pub train_file: Files,
    /// Folder the JSON's image paths are relative to (the reference's files hold absolute paths).
    pub image_root: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NlvrPretrainKeys {
    pub batch_size: usize,
}

impl TaskKeys for NlvrPretrainKeys {
    type Data = NlvrPretrainData;
    const BATCH_KEYS: (&'static str, &'static str) = ("batch_size", "batch_size");
    const TRAINING_KEYS: &'static [&'static str] = &[];
    fn train_file(data: &NlvrPretrainData) -> Option<&Files> {
        Some(&data.train_file)
    }
    fn train_batch(&self) -> (Option<usize>, &'static str) {
        (Some(self.batch_size), "batch_size")
    }
}

// --- Grounding (Grounding.yaml) ---

/// Grounding data keys (`Grounding.yaml`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GroundingData {
    pub train_file: Option<Files>,
    /// Evaluation expressions, in order (the reference's val then test file).
    pub test_file: Files,
    /// Folder holding the REFER data (`refcoco+/refs(unc).p`, `refcoco+/instances.json`).
    pub refcoco_data: String,
    /// MAttNet proposals (`dets.json`).
    pub det_file: String,
    /// Loaded and never used by Grounding.py; checked when present.
    pub coco_file: Option<String>,
    pub image_root: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GroundingKeys {
    /// Training and evaluation batch size (the reference uses one for both).
    pub batch_size: usize,
}

impl TaskKeys for GroundingKeys {
    type Data = GroundingData;
    const BATCH_KEYS: (&'static str, &'static str) = ("batch_size", "batch_size");
    const TRAINING_KEYS: &'static [&'static str] = &["train_file"];
    fn train_file(data: &GroundingData) -> Option<&Files> {
        data.train_file.as_ref()
    }
    fn train_batch(&self) -> (Option<usize>, &'static str) {
        (Some(self.batch_size), "batch_size")
    }
}

pub type GroundingConfig = Config<GroundingKeys>;

/// `Pretrain.yaml` data keys: the reference's JSON lists, or (albef extension) tar shards in the
/// WebDataset layout.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PretrainData {
    /// JSON lists of `{"image": path, "caption": str | [str]}`.
    pub train_file: Option<Files>,
    /// Folder the JSON's relative image paths are under (the reference's files hold absolute paths).
    pub image_root: Option<String>,
    /// Tar shards: brace patterns (`data/cc3m/{00000..00331}.tar`) or paths.
    pub train_shards: Option<Files>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PretrainKeys {
    pub batch_size: usize,
    /// albef extension: the DeiT-B/16 file the image encoder starts from
    /// (`deit_base_patch16_224-b5f2ef4d.pth`; the reference downloads it). `--init-deit` overrides.
    pub init_deit: Option<String>,
    /// albef extension: initialise the text encoder from the weights in the `--text_encoder`
    /// folder, as the reference's `from_pretrained` (default true; false trains it from random).
    pub init_bert: Option<bool>,
    pub train_transform: Option<TrainTransform>,
    /// albef extension: shuffle the training data (default true). Off, the JSON lists and the
    /// shards are both read in corpus order (shards written from a list then give its batches).
    pub shuffle: Option<bool>,
    /// Shard samples held for shuffling (default 2000).
    pub shuffle_buffer: Option<usize>,
    /// Shards read at once (default 4).
    pub shard_readers: Option<usize>,
    /// Stop when more than this share of an epoch's shard samples cannot be used (default 0.05).
    pub max_skipped_fraction: Option<f64>,
}

impl TaskKeys for PretrainKeys {
    type Data = PretrainData;
    const BATCH_KEYS: (&'static str, &'static str) = ("batch_size", "batch_size");
    const TRAINING_KEYS: &'static [&'static str] = &[];
    fn train_file(data: &PretrainData) -> Option<&Files> {
        data.train_file.as_ref().or(data.train_shards.as_ref())
    }
    fn train_batch(&self) -> (Option<usize>, &'static str) {
        (Some(self.batch_size), "batch_size")
    }
    fn validate(&self) -> Result<()> {
        if let Some(f) = self.max_skipped_fraction {
            if !(0.0..=1.0).contains(&f) {
                bail!("max_skipped_fraction {f} is not in [0, 1]");
            }
        }
        Ok(())
    }
}

pub type PretrainConfig = Config<PretrainKeys>;
pub type RetrievalConfig = Config<RetrievalKeys>;
pub type VqaConfig = Config<VqaKeys>;
pub type VeConfig = Config<VeKeys>;
pub type NlvrConfig = Config<NlvrKeys>;
pub type NlvrPretrainConfig = Config<NlvrPretrainKeys>;

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("albef-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_yaml_and_bert_json() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        // `bert_config` is relative to the working directory, the package root under cargo test.
        let m = model_config_from_file(&root.join("configs/tiny/fixture.yaml")).unwrap();
        assert_eq!(m.vision.image_res, 48);
        assert_eq!(m.vision.embed_dim, 32);
        assert_eq!(m.bert.hidden_size, 32);
        assert_eq!(m.bert.fusion_layer, 2);
        assert_eq!(m.embed_dim, 16);
        assert_eq!(m.queue_size, 16);
    }

    #[test]
    fn inconsistent_widths_are_rejected() {
        let p = write("w.yaml", "image_res: 384\nvision_width: 512\n");
        let e = model_config_from_file(&p).unwrap_err().to_string();
        assert!(e.contains("vision_width 512"), "{e}");
        let p = write("r.yaml", "image_res: 380\n");
        assert!(model_config_from_file(&p).unwrap_err().to_string().contains("multiple of the patch size"));
    }

    const RETRIEVAL: &str = "val_file: v.json\ntest_file: t.json\nimage_root: img\nbatch_size_test: 4\nk_test: 2\n";

    #[test]
    fn misspelt_keys_are_named_with_the_closest_known_key() {
        let p = write("typo.yaml", &format!("{RETRIEVAL}batch_size_trian: 8\nschedular: {{sched: cosine, lr: 1e-5, epochs: 1, min_lr: 0, warmup_lr: 0, warmup_epochs: 1, warmup_lrr: 1}}\n"));
        let e = RetrievalConfig::load(&p, false).unwrap_err().to_string();
        assert!(e.contains("typo.yaml"), "{e}");
        assert!(e.contains("unknown key 'batch_size_trian' (did you mean 'batch_size_train'?)"), "{e}");
        assert!(e.contains("unknown key 'schedular.warmup_lrr' (did you mean 'schedular.warmup_lr'?)"), "{e}");
        let p = write("far.yaml", &format!("{RETRIEVAL}colour: blue\n"));
        let e = RetrievalConfig::load(&p, false).unwrap_err().to_string();
        assert!(e.contains("unknown key 'colour'") && !e.contains("did you mean"), "{e}");
    }

    #[test]
    fn unimplemented_values_are_refused() {
        let sched = "schedular: {sched: step, lr: 1e-5, epochs: 1, min_lr: 0, warmup_lr: 0, warmup_epochs: 1}\n";
        let p = write("step.yaml", &format!("{RETRIEVAL}{sched}"));
        let e = format!("{:#}", RetrievalConfig::load(&p, false).unwrap_err());
        assert!(e.contains("step.yaml") && e.contains("schedular.sched \"step\" is not implemented"), "{e}");
        let p = write("sgd.yaml", &format!("{RETRIEVAL}optimizer: {{opt: sgd, lr: 1e-5, weight_decay: 0.02}}\n"));
        let e = format!("{:#}", RetrievalConfig::load(&p, false).unwrap_err());
        assert!(e.contains("optimizer.opt \"sgd\" is not implemented"), "{e}");
        let p = write("tt.yaml", &format!("{RETRIEVAL}train_transform: crop\n"));
        let e = format!("{:#}", RetrievalConfig::load(&p, false).unwrap_err());
        assert!(e.contains("train_transform") && e.contains("crop"), "{e}");
    }

    #[test]
    fn missing_keys_are_listed_together() {
        let p = write("missing.yaml", "val_file: v.json\nimage_root: img\nbatch_size_test: 4\n");
        let e = RetrievalConfig::load(&p, false).unwrap_err().to_string();
        assert!(e.contains("missing") && e.contains("test_file"), "{e}");
        let cfg = RetrievalConfig::load(&write("eval.yaml", RETRIEVAL), false).unwrap();
        let e = cfg.training().unwrap_err().to_string();
        assert!(e.contains("train_file, batch_size_train, optimizer, schedular"), "{e}");
    }
}

#[cfg(test)]
mod reference_configs {
    use super::*;

    #[test]
    fn every_shipped_config_loads() {
        for file in
            ["configs/Retrieval_flickr.yaml", "configs/Retrieval_coco.yaml", "configs/tiny/retrieval_synth.yaml"]
        {
            RetrievalConfig::load(Path::new(file), true).unwrap().model_config().unwrap();
        }
        VqaConfig::load(Path::new("configs/VQA.yaml"), true).unwrap().model_config().unwrap();
        VeConfig::load(Path::new("configs/VE.yaml"), true).unwrap().model_config().unwrap();
        NlvrConfig::load(Path::new("configs/NLVR.yaml"), true).unwrap().model_config().unwrap();
        NlvrPretrainConfig::load(Path::new("configs/NLVR_pretrain.yaml"), true).unwrap().model_config().unwrap();
        let g = GroundingConfig::load(Path::new("configs/Grounding.yaml"), true).unwrap();
        assert_eq!(g.model_config().unwrap(), ModelConfig::default(), "Grounding: ViT-B/16 + bert-base at 384");
        assert_eq!(g.task.batch_size, 32);
        assert_eq!(g.data.refcoco_data, "data");
        for file in ["configs/Pretrain.yaml", "configs/tiny/pretrain_synth.yaml"] {
            PretrainConfig::load(Path::new(file), true).unwrap().model_config().unwrap();
        }
    }

    #[test]
    fn shipped_pretrain_config_matches_the_reference() {
        let cfg = PretrainConfig::load(Path::new("configs/Pretrain.yaml"), true).unwrap();
        let m = cfg.model_config().unwrap();
        assert_eq!((m.vision.image_res, m.queue_size, m.momentum, m.embed_dim, m.temp), (256, 65536, 0.995, 256, 0.07));
        assert_eq!(m.bert, crate::model::BertConfig::default());
        assert_eq!(cfg.task.batch_size, 64);
        assert_eq!(m.mlm_probability, 0.15);
        let t = cfg.training().unwrap();
        assert_eq!((t.alpha, t.warm_up), (0.4, true));
        assert_eq!((t.optimizer.lr, t.optimizer.weight_decay), (Some(1e-4), 0.02));
        let s = &t.schedule;
        assert_eq!((s.lr, s.min_lr, s.epochs, s.warmup_lr, s.warmup_epochs), (1e-4, 1e-5, 30, 1e-5, 20));
    }

    #[test]
    fn shipped_retrieval_configs_match_the_reference() {
        for (file, k, epochs) in [("configs/Retrieval_flickr.yaml", 128, 10), ("configs/Retrieval_coco.yaml", 256, 5)] {
            let cfg = RetrievalConfig::load(Path::new(file), true).unwrap();
            let m = cfg.model_config().unwrap();
            assert_eq!(m, ModelConfig::default(), "{file}: ViT-B/16 + bert-base at 384");
            assert_eq!(cfg.task.k_test, k);
            let t = cfg.training().unwrap();
            assert_eq!(t.batch_size, 32);
            let s = &t.schedule;
            assert_eq!((s.lr, s.min_lr, s.epochs, s.warmup_epochs), (1e-5, 1e-6, epochs, 1));
        }
    }
}

#[cfg(test)]
mod overrides {
    use super::*;

    #[test]
    fn command_line_values_replace_the_files() {
        let o = Overrides {
            batch_size_train: Some(4),
            batch_size_test: Some(2),
            image_res: Some(256),
            precision: Some(crate::nn::Precision::Bf16),
            accum_steps: Some(2),
        };
        let cfg = RetrievalConfig::load_with(Path::new("configs/Retrieval_flickr.yaml"), true, &o).unwrap();
        assert_eq!((cfg.training().unwrap().batch_size, cfg.task.batch_size_test), (4, 2));
        assert_eq!(cfg.model_config().unwrap().vision.image_res, 256);
        assert_eq!((cfg.model.precision, cfg.training().unwrap().accum_steps), (Some(crate::nn::Precision::Bf16), 2));
        // NLVR.yaml has one batch size for training and evaluation.
        let cfg = NlvrConfig::load_with(
            Path::new("configs/NLVR.yaml"),
            true,
            &Overrides { batch_size_train: Some(4), ..Default::default() },
        )
        .unwrap();
        assert_eq!(cfg.task.batch_size, 4);
        let e = NlvrConfig::load_with(Path::new("configs/NLVR.yaml"), true, &o).unwrap_err().to_string();
        assert!(e.contains("one 'batch_size'"), "{e}");
    }
}
