//! Classification over fused image-text states: SNLI-VE (`model_ve.py`, one image, 3 classes)
//! and NLVR2 (`model_nlvr.py`, two images, 2 classes, 18-layer encoder whose fusion layers
//! alternate between the images and share cross-attention key/value in pairs).

use super::bert::{BertModel, CrossStates, Layout, Mode};
use super::config::{BertConfig, ModelConfig};
use super::heads::{cls, ClsHead};
use super::momentum::{Ema, Teacher};
use super::vit::VisionTransformer;
use crate::nn::{cross_entropy, soft_cross_entropy_per_row, softmax, ParamBuilder, ParamStore};
use candle_core::{Device, Result, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClassifierKind {
    /// SNLI-VE: contradiction 0, neutral 1, entailment 2.
    VisualEntailment,
    /// NLVR2: False 0, True 1; the input holds both images, `cat([image0, image1])`.
    Nlvr2,
}

impl ClassifierKind {
    pub fn classes(self) -> usize {
        match self {
            Self::VisualEntailment => 3,
            Self::Nlvr2 => 2,
        }
    }
}

/// The NLVR2 encoder config: `num_hidden_layers` forced to 18 by the reference.
pub fn nlvr_bert_config(cfg: &ModelConfig) -> BertConfig {
    BertConfig { num_hidden_layers: cfg.nlvr_layers, ..cfg.bert.clone() }
}

struct Branch {
    visual: VisionTransformer,
    text: BertModel,
    head: ClsHead,
}

impl Branch {
    fn new(pb: &ParamBuilder, cfg: &ModelConfig, kind: ClassifierKind, suffix: &str) -> Result<Self> {
        let (bert_cfg, layout) = match kind {
            ClassifierKind::VisualEntailment => (cfg.bert.clone(), Layout::Encoder),
            ClassifierKind::Nlvr2 => (nlvr_bert_config(cfg), Layout::SharedCrossKv),
        };
        Ok(Self {
            visual: VisionTransformer::new(&pb.pp(format!("visual_encoder{suffix}")), &cfg.vision)?,
            text: BertModel::new(&pb.pp(format!("text_encoder{suffix}")), &bert_cfg, layout)?,
            head: ClsHead::new(&pb.pp(format!("cls_head{suffix}")), cfg.bert.hidden_size, kind.classes())?,
        })
    }

    fn logits(&self, image: &Tensor, ids: &Tensor, mask: &Tensor, kind: ClassifierKind, train: bool) -> Result<Tensor> {
        let image_embeds = self.visual.forward(image)?;
        let cross = match kind {
            ClassifierKind::VisualEntailment => vec![CrossStates::image(&image_embeds)],
            ClassifierKind::Nlvr2 => {
                let b = ids.dim(0)?;
                vec![
                    CrossStates::image(&image_embeds.narrow(0, 0, b)?),
                    CrossStates::image(&image_embeds.narrow(0, b, b)?),
                ]
            }
        };
        let h = self.text.forward_ids(ids, mask, &cross, Mode::MultiModal, train)?;
        self.head.forward(&cls(&h)?)
    }
}

pub struct ClassifierModel {
    pub store: ParamStore,
    pub cfg: ModelConfig,
    pub kind: ClassifierKind,
    online: Branch,
    teacher: Option<Teacher<Branch>>,
}

impl ClassifierModel {
    pub fn new(cfg: &ModelConfig, kind: ClassifierKind, device: &Device, seed: u64) -> Result<Self> {
        let store = cfg.new_store(device, seed);
        let online = Branch::new(&store.root(true), cfg, kind, "")?;
        let teacher = (cfg.distill && cfg.builds_teacher())
            .then(|| Teacher::build(&store, cfg.momentum, |pb, suffix| Branch::new(pb, cfg, kind, suffix)))
            .transpose()?;
        Ok(Self { store, cfg: cfg.clone(), kind, online, teacher })
    }

    /// The teacher's EMA, when the model distils.
    pub fn ema(&self) -> Option<&Ema> {
        self.teacher.as_ref().map(|t| &t.ema)
    }

    /// Class logits (B, C). For NLVR2 `image` is (2B, 3, R, R): all left images, then all right.
    pub fn logits(&self, image: &Tensor, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.online.logits(image, ids, mask, self.kind, false)
    }

    /// `(1−α)·CE + α·soft-CE against the teacher` when distilling, else CE.
    pub fn forward_train(
        &self,
        image: &Tensor,
        ids: &Tensor,
        mask: &Tensor,
        targets: &Tensor,
        alpha: f64,
        train: bool,
    ) -> Result<Tensor> {
        let logits = self.online.logits(image, ids, mask, self.kind, train)?;
        let ce = cross_entropy(&logits, targets)?;
        match &self.teacher {
            Some(Teacher { branch: teacher, ema }) => {
                ema.update()?;
                let soft = softmax(&teacher.logits(image, ids, mask, self.kind, train)?)?;
                let kd = soft_cross_entropy_per_row(&logits, &soft)?.mean_all()?;
                (ce * (1.0 - alpha))? + (kd * alpha)?
            }
            None => Ok(ce),
        }
    }
}
