//! Model sizes: the reference's `config_bert.json` plus our `vision:` extension.

use crate::nn::{ParamStore, StoreMode};
use serde::{Deserialize, Serialize};

/// `configs/config_bert.json` (HF BertConfig keys ALBEF reads; unknown keys are ignored).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_dropout_prob: f32,
    pub attention_probs_dropout_prob: f32,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
    /// First layer with cross-attention; layers below it are the text encoder.
    pub fusion_layer: usize,
    /// Width of the image states the cross-attention reads.
    pub encoder_width: usize,
}

impl Default for BertConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            fusion_layer: 6,
            encoder_width: 768,
        }
    }
}

impl BertConfig {
    pub fn from_json_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read BERT config {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{} is not a valid BERT config: {e}", path.display()))
    }
}

/// The image encoder. The reference hard-codes ViT-B/16; the task YAML may override it with
/// `vision: {patch_size, embed_dim, depth, num_heads, mlp_ratio}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct VisionConfig {
    pub patch_size: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_ratio: f64,
    pub layer_norm_eps: f64,
    /// Set from the task's `image_res`; the reference fixes the resolution at construction.
    #[serde(skip)]
    pub image_res: usize,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            patch_size: 16,
            embed_dim: 768,
            depth: 12,
            num_heads: 12,
            mlp_ratio: 4.0,
            layer_norm_eps: 1e-6,
            image_res: 384,
        }
    }
}

impl VisionConfig {
    pub fn grid(&self) -> usize {
        self.image_res / self.patch_size
    }
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }
}

/// Everything needed to build one of the ALBEF task models.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub vision: VisionConfig,
    pub bert: BertConfig,
    /// ITC projection size (`embed_dim`).
    pub embed_dim: usize,
    pub temp: f64,
    pub queue_size: usize,
    pub momentum: f64,
    /// Build momentum (teacher) copies.
    pub distill: bool,
    /// Layers of the VQA answer decoder (the reference hard-codes 6).
    pub decoder_layers: usize,
    /// Layers of the NLVR2 encoder (the reference hard-codes 18).
    pub nlvr_layers: usize,
    /// Standard deviation of the random initialisation (0.02 as the reference; only matters for
    /// weights no checkpoint provides).
    pub init_std: f64,
    /// How the parameters are made. `inference`: built for evaluation only — no autograd graph
    /// and no momentum (teacher) copies, which no task's evaluation uses (retrieval, VQA, VE and
    /// NLVR2 all score with the online model, as the reference does). `placeholders`: names and
    /// shapes only, for key reports.
    pub mode: StoreMode,
    /// Share of eligible tokens masked for pre-training's MLM (`mlm_probability`, 0.15).
    pub mlm_probability: f64,
}

impl ModelConfig {
    /// Whether momentum (teacher) copies are built: never for an evaluation-only model.
    pub fn builds_teacher(&self) -> bool {
        !self.mode.inference
    }

    /// A new store for this model (seeded, with the config's init std and mode).
    pub fn new_store(&self, device: &candle_core::Device, seed: u64) -> ParamStore {
        let store = ParamStore::new(device, seed);
        store.set_init_std(self.init_std);
        store.set_mode(self.mode);
        store
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vision: VisionConfig::default(),
            bert: BertConfig::default(),
            embed_dim: 256,
            temp: 0.07,
            queue_size: 65536,
            momentum: 0.995,
            distill: true,
            decoder_layers: 6,
            nlvr_layers: 18,
            init_std: 0.02,
            mode: StoreMode::default(),
            mlm_probability: 0.15,
        }
    }
}
