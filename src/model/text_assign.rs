//! The text-assignment (TA) pre-training model for NLVR2 (`model_pretrain_nlvr.py`): the
//! 18-layer two-image encoder with a 3-way head that says which of two images a caption
//! describes (0: the first, 1: the second, 2: neither). No teacher.

use super::bert::{BertModel, CrossStates, Layout, Mode};
use super::classifier::nlvr_bert_config;
use super::config::ModelConfig;
use super::contrastive::sample_index;
use super::heads::cls;
use super::vit::VisionTransformer;
use crate::nn::{cross_entropy, l2_normalize, softmax, Init, Linear, ParamStore};
use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;

pub struct TextAssignModel {
    pub store: ParamStore,
    pub cfg: ModelConfig,
    visual: VisionTransformer,
    text: BertModel,
    vision_proj: Linear,
    pub ta_head: Linear,
}

/// One training example of the TA task: images (first, second) and the label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub first: usize,
    pub second: usize,
    pub label: i64,
}

impl TextAssignModel {
    pub fn new(cfg: &ModelConfig, device: &Device, seed: u64) -> Result<Self> {
        let store = cfg.new_store(device, seed);
        let pb = store.root(true);
        let visual = VisionTransformer::new(&pb.pp("visual_encoder"), &cfg.vision)?;
        let text = BertModel::new(&pb.pp("text_encoder"), &nlvr_bert_config(cfg), Layout::SharedCrossKv)?;
        let vision_proj = Linear::new(&pb.pp("vision_proj"), cfg.vision.embed_dim, cfg.embed_dim)?;
        // Loaded and saved as the reference does, though TA never uses them.
        Linear::new(&pb.pp("text_proj"), cfg.bert.hidden_size, cfg.embed_dim)?;
        pb.get((), "temp", Init::Const(cfg.temp))?;
        let ta_head = Linear::new(&pb.pp("ta_head"), cfg.bert.hidden_size, 3)?;
        Ok(Self { store, cfg: cfg.clone(), visual, text, vision_proj, ta_head })
    }

    /// The reference's pairing: image similarity softmax (τ = 0.07, diagonal zeroed) picks hard
    /// partner images; 2/3 of captions get (own, other) in random order, 1/3 two other images.
    pub fn sample_assignments<R: Rng>(&self, image_embeds: &Tensor, rng: &mut R) -> Result<Vec<Assignment>> {
        let feat = l2_normalize(&self.vision_proj.forward(&cls(image_embeds)?.detach())?)?;
        let b = feat.dim(0)?;
        let sim = (feat.matmul(&feat.t()?)? / 0.07)?;
        let mut w = softmax(&sim)?.to_vec2::<f32>()?;
        for (i, row) in w.iter_mut().enumerate() {
            row[i] = 0.0;
        }
        let mut out = Vec::with_capacity(b);
        for (i, row) in w.iter().enumerate() {
            if rng.random::<f64>() < 2.0 / 3.0 {
                let j = sample_index(row, i, rng);
                out.push(if rng.random::<f64>() < 0.5 {
                    Assignment { first: i, second: j, label: 0 }
                } else {
                    Assignment { first: j, second: i, label: 1 }
                });
            } else {
                let j1 = sample_index(row, i, rng);
                let mut row2 = row.clone();
                row2[j1] = 0.0;
                let j2 = sample_index(&row2, i, rng);
                out.push(Assignment { first: j1, second: j2, label: 2 });
            }
        }
        Ok(out)
    }

    /// TA loss for a batch of (image, caption) pairs.
    pub fn forward_train<R: Rng>(
        &self,
        image: &Tensor,
        ids: &Tensor,
        mask: &Tensor,
        rng: &mut R,
        train: bool,
    ) -> Result<Tensor> {
        let image_embeds = self.visual.forward(image)?;
        let assignments = self.sample_assignments(&image_embeds, rng)?;
        self.loss_for(&image_embeds, ids, mask, &assignments, train)
    }

    pub fn loss_for(
        &self,
        image_embeds: &Tensor,
        ids: &Tensor,
        mask: &Tensor,
        assignments: &[Assignment],
        train: bool,
    ) -> Result<Tensor> {
        let dev = image_embeds.device();
        let pick = |f: fn(&Assignment) -> usize| -> Result<Tensor> {
            let idx: Vec<u32> = assignments.iter().map(|a| f(a) as u32).collect();
            image_embeds.index_select(&Tensor::from_vec(idx, assignments.len(), dev)?, 0)
        };
        let cross = [CrossStates::image(&pick(|a| a.first)?), CrossStates::image(&pick(|a| a.second)?)];
        let h = self.text.forward_ids(ids, mask, &cross, Mode::MultiModal, train)?;
        let logits = self.ta_head.forward(&cls(&h)?)?;
        let labels = Tensor::from_vec(assignments.iter().map(|a| a.label).collect::<Vec<_>>(), assignments.len(), dev)?;
        cross_entropy(&logits, &labels.to_dtype(DType::I64)?)
    }
}
