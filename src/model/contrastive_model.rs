//! The ITC + ITM model of pre-training (`model_pretrain.py`, with MLM) and of retrieval /
//! grounding fine-tuning (`model_retrieval.py`). One struct, because the two differ only in the
//! points listed on [`Objective`].

use super::bert::{BertModel, CrossStates, Layout, MlmHead, Mode};
use super::config::ModelConfig;
use super::contrastive::{identity_targets, idx_targets, itc, itm, negative_weights, ItcInputs, Negatives};
use super::heads::cls;
use super::momentum::{Ema, Queues, Teacher};
use super::vit::VisionTransformer;
use crate::nn::{
    cross_entropy, l2_normalize, soft_cross_entropy_per_row, softmax, Init, Linear, ParamBuilder, ParamStore,
};
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::Rng;

/// What distinguishes pre-training from retrieval fine-tuning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Objective {
    /// `text_encoder.bert.*` + MLM head; identity ITC targets; diagonal excluded from negatives;
    /// τ clamped to [0.001, 0.5]; always distils.
    Pretrain,
    /// `text_encoder.*` (no MLM); `idx_queue`; positives = same image idx; negatives exclude the
    /// same idx; no τ clamp; distils when `distill` is set.
    Retrieval,
}

struct Encoders {
    visual: VisionTransformer,
    text: BertModel,
    mlm: Option<MlmHead>,
    vision_proj: Linear,
    text_proj: Linear,
}

impl Encoders {
    fn new(pb: &ParamBuilder, cfg: &ModelConfig, objective: Objective, suffix: &str) -> Result<Self> {
        let visual = VisionTransformer::new(&pb.pp(format!("visual_encoder{suffix}")), &cfg.vision)?;
        let text_root = pb.pp(format!("text_encoder{suffix}"));
        let bert_pb = if objective == Objective::Pretrain { text_root.pp("bert") } else { text_root.clone() };
        let text = BertModel::new(&bert_pb, &cfg.bert, Layout::Encoder)?;
        let mlm = if objective == Objective::Pretrain {
            Some(MlmHead::new(&text_root.pp("cls.predictions"), &bert_pb, &cfg.bert, &text.embeddings)?)
        } else {
            None
        };
        let vision_proj = Linear::new(&pb.pp(format!("vision_proj{suffix}")), cfg.vision.embed_dim, cfg.embed_dim)?;
        let text_proj = Linear::new(&pb.pp(format!("text_proj{suffix}")), cfg.bert.hidden_size, cfg.embed_dim)?;
        Ok(Self { visual, text, mlm, vision_proj, text_proj })
    }

    fn image(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        let embeds = self.visual.forward(image)?;
        let feat = l2_normalize(&self.vision_proj.forward(&cls(&embeds)?)?)?;
        Ok((embeds, feat))
    }

    /// The image feature alone, from the encoder's [CLS] row alone.
    fn image_feat(&self, image: &Tensor) -> Result<Tensor> {
        l2_normalize(&self.vision_proj.forward(&self.visual.forward_cls(image)?)?)
    }

    fn text(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let embeds = self.text.forward_ids(ids, mask, &[], Mode::Text, train)?;
        let feat = l2_normalize(&self.text_proj.forward(&cls(&embeds)?)?)?;
        Ok((embeds, feat))
    }
}

/// Recorded random choices of one training step (negatives and MLM masking), to replay it.
#[derive(Clone, Debug)]
pub struct Replay {
    pub neg_image: Vec<usize>,
    pub neg_text: Vec<usize>,
    pub mlm_ids: Option<Tensor>,
    pub mlm_labels: Option<Tensor>,
}

#[derive(Debug)]
pub struct ContrastiveLosses {
    pub ita: Tensor,
    pub itm: Tensor,
    pub mlm: Option<Tensor>,
    /// MLM predictions (student argmax) that hit the label, and masked tokens: (correct, masked).
    pub mlm_hits: Option<(usize, usize)>,
}

impl ContrastiveLosses {
    pub fn total(&self) -> Result<Tensor> {
        let t = (&self.ita + &self.itm)?;
        match &self.mlm {
            Some(m) => t + m,
            None => Ok(t),
        }
    }
}

pub struct ContrastiveModel {
    pub store: ParamStore,
    pub cfg: ModelConfig,
    pub objective: Objective,
    online: Encoders,
    /// Absent only in an evaluation-only model (`ModelConfig::mode.inference`).
    teacher: Option<Teacher<Encoders>>,
    pub itm_head: Linear,
    temp: Var,
    pub queues: Queues,
    mlm_probability: f64,
}

impl ContrastiveModel {
    pub fn new(cfg: &ModelConfig, objective: Objective, device: &Device, seed: u64) -> Result<Self> {
        let store = cfg.new_store(device, seed);
        let pb = store.root(true);
        pb.get((), "temp", Init::Const(cfg.temp))?;
        let temp = store.get("temp").expect("temp was just created");
        let online = Encoders::new(&pb, cfg, objective, "")?;
        let itm_head = Linear::new(&pb.pp("itm_head"), cfg.bert.hidden_size, 2)?;
        // The reference builds the teacher even when `distill` is off (its features feed the ITC
        // keys and the queues), so it is present here too, unless the model is only evaluated.
        let teacher = cfg
            .builds_teacher()
            .then(|| Teacher::build(&store, cfg.momentum, |pb, suffix| Encoders::new(pb, cfg, objective, suffix)))
            .transpose()?;
        let queues = Queues::new(&pb, cfg.embed_dim, cfg.queue_size, objective == Objective::Retrieval)?;
        Ok(Self {
            store,
            cfg: cfg.clone(),
            objective,
            online,
            teacher,
            itm_head,
            temp,
            queues,
            mlm_probability: cfg.mlm_probability,
        })
    }

    /// The teacher's EMA (none in an evaluation-only model).
    pub fn ema(&self) -> Option<&Ema> {
        self.teacher.as_ref().map(|t| &t.ema)
    }

    pub fn with_mlm_probability(mut self, p: f64) -> Self {
        self.mlm_probability = p;
        self.cfg.mlm_probability = p;
        self
    }

    pub fn temp(&self) -> Tensor {
        self.temp.as_tensor().clone()
    }

    pub fn visual(&self) -> &VisionTransformer {
        &self.online.visual
    }

    /// (image states (B, 1+N, Dv), normalised ITC feature (B, E)).
    pub fn encode_image(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        self.online.image(image)
    }

    /// (text-mode states (B, L, D), normalised ITC feature (B, E)).
    pub fn encode_text(&self, ids: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
        self.online.text(ids, mask, false)
    }

    /// Fusion layers on text states against image states: (B, L, D).
    pub fn fuse(&self, text_embeds: &Tensor, mask: &Tensor, image_embeds: &Tensor) -> Result<Tensor> {
        self.online.text.forward_embeds(text_embeds, mask, &[CrossStates::image(image_embeds)], Mode::Fusion, false)
    }

    /// ITM logits (B, 2) of fused states.
    pub fn itm_logits(&self, fused: &Tensor) -> Result<Tensor> {
        self.itm_head.forward(&cls(fused)?)
    }

    /// Grad-CAM's `itm` mode (Grounding.py `val`): the ITM logits (B, 2) of the full encoder
    /// on `ids` cross-attending the image, with the cross-attention probabilities (B, H, L, 1+N)
    /// of BERT layer `layer` as a [`Var`] whose gradient a backward pass gives (`perturb`, if
    /// given, is added to the probabilities the layer reads).
    pub fn itm_probe(
        &self,
        image: &Tensor,
        ids: &Tensor,
        mask: &Tensor,
        layer: usize,
        perturb: Option<&Tensor>,
    ) -> Result<(Tensor, Var)> {
        // Only the probabilities' gradient is wanted: the image encoder is not differentiated.
        let image_embeds = self.online.visual.forward(image)?.detach();
        let (h, probs) = self.online.text.forward_probing_cross(ids, mask, &image_embeds, layer, perturb)?;
        Ok((self.itm_head.forward(&cls(&h)?)?, probs))
    }

    /// Grad-CAM's `itc` mode: the diagonal of `image_feat · text_featᵀ / τ` (B,) with the
    /// self-attention probabilities (B, H, 1+N, 1+N) of ViT block `block` as a [`Var`].
    pub fn itc_probe(
        &self,
        image: &Tensor,
        ids: &Tensor,
        mask: &Tensor,
        block: usize,
        perturb: Option<&Tensor>,
    ) -> Result<(Tensor, Var)> {
        let (embeds, probs) = self.online.visual.forward_probe(image, block, perturb)?;
        let image_feat = l2_normalize(&self.online.vision_proj.forward(&cls(&embeds)?)?)?;
        let (_, text_feat) = self.online.text(ids, mask, false)?;
        let diag = (image_feat * text_feat.detach())?.sum(1)?.broadcast_div(self.temp.as_tensor())?;
        Ok((diag, probs))
    }

    /// BERT layer count and first fusion layer.
    pub fn text_layers(&self) -> (usize, usize) {
        (self.online.text.num_layers(), self.online.text.fusion_layer())
    }

    /// MLM logits (B, L, V) of the full encoder on `ids` cross-attending `image_embeds`.
    pub fn mlm_logits(&self, ids: &Tensor, mask: &Tensor, image_embeds: &Tensor) -> Result<Tensor> {
        let head =
            self.online.mlm.as_ref().ok_or_else(|| candle_core::Error::Msg("this model has no MLM head".into()))?;
        let h =
            self.online.text.forward_ids(ids, mask, &[CrossStates::image(image_embeds)], Mode::MultiModal, false)?;
        head.forward(&h)
    }

    /// One training forward: ITC (+ distillation), ITM with hard negatives and, for
    /// pre-training, MLM. Updates the teacher first and the queues after the ITC loss, as the
    /// reference does. `idx` (B,) is the image index (retrieval only).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_train<R: Rng>(
        &self,
        image: &Tensor,
        ids: &Tensor,
        mask: &Tensor,
        idx: Option<&Tensor>,
        alpha: f64,
        replay: Option<&Replay>,
        rng: &mut R,
        train: bool,
    ) -> Result<ContrastiveLosses> {
        if self.objective == Objective::Pretrain {
            self.temp.set(&self.temp.as_tensor().detach().clamp(0.001, 0.5)?)?;
        }
        let Some(teacher) = &self.teacher else {
            candle_core::bail!("this model was built for evaluation only (no teacher); it cannot train")
        };
        let dev = image.device();
        let temp = self.temp();
        let (image_embeds, image_feat) = self.online.image(image)?;
        let (text_embeds, text_feat) = self.online.text(ids, mask, train)?;
        let b = image_embeds.dim(0)?;

        teacher.ema.update()?;
        // Only pre-training's MLM distillation reads the teacher's image states; ITC its [CLS].
        let (image_embeds_m, image_feat_m) = match teacher.branch.mlm {
            Some(_) => teacher.branch.image(image).map(|(embeds, feat)| (Some(embeds), feat))?,
            None => (None, teacher.branch.image_feat(image)?),
        };
        // The teacher runs in the same mode as the student (its dropout is active in training, as in
        // PyTorch, where `no_grad` does not switch dropout off).
        let (_, text_feat_m) = teacher.branch.text(ids, mask, train)?;
        let total = b + self.queues.size()?;
        let targets = match (self.objective, idx) {
            (Objective::Retrieval, Some(idx)) => {
                let q = self.queues.idx.as_ref().expect("retrieval model has an idx queue").as_tensor().detach();
                idx_targets(idx, &q)?
            }
            (Objective::Retrieval, None) => {
                candle_core::bail!("retrieval training needs the image idx of every caption")
            }
            (Objective::Pretrain, _) => identity_targets(b, total, dev)?,
        };
        let distill = self.objective == Objective::Pretrain || self.cfg.distill;
        let out = itc(
            &ItcInputs {
                image_feat: &image_feat,
                text_feat: &text_feat,
                image_feat_m: &image_feat_m,
                text_feat_m: &text_feat_m,
                temp: &temp,
                targets: &targets,
                alpha: distill.then_some(alpha),
            },
            &self.queues,
        )?;
        self.queues.enqueue(&image_feat_m, &text_feat_m, idx)?;

        // Pre-training excludes the diagonal; retrieval every pair showing the same image.
        // (Retrieval adds 1e-4 inside the softmax: a no-op, left out.)
        let forbidden = match idx {
            Some(idx) => idx.reshape((b, 1))?.broadcast_eq(&idx.reshape((1, b))?)?,
            None => Tensor::eye(b, DType::U8, dev)?,
        };
        let w_i2t = negative_weights(&out.sim_i2t, &forbidden)?;
        let w_t2i = negative_weights(&out.sim_t2i, &forbidden)?;
        let negatives = match replay {
            Some(r) => Negatives::Given { image: r.neg_image.clone(), text: r.neg_text.clone() },
            None => Negatives::Sample(&mut *rng),
        };
        let (loss_itm, _, _, _) = itm(
            &self.online.text,
            &self.itm_head,
            &text_embeds,
            mask,
            &image_embeds,
            &w_i2t,
            &w_t2i,
            negatives,
            train,
        )?;

        let mut mlm_hits = None;
        let mlm = match &self.online.mlm {
            None => None,
            Some(head) => {
                let (mlm_ids, labels) = match replay.and_then(|r| r.mlm_ids.clone().zip(r.mlm_labels.clone())) {
                    Some(given) => given,
                    None => mask_tokens(ids, self.cfg.bert.vocab_size, self.mlm_probability, rng)?,
                };
                let teacher_head = teacher.branch.mlm.as_ref().expect("teacher mirrors the online model");
                let image_embeds_m = image_embeds_m.as_ref().expect("an MLM teacher keeps its image states");
                let cross_m = [CrossStates::image(image_embeds_m)];
                let logits_m = teacher_head.forward(&teacher.branch.text.forward_ids(
                    &mlm_ids,
                    mask,
                    &cross_m,
                    Mode::MultiModal,
                    train,
                )?)?;
                let h = self.online.text.forward_ids(
                    &mlm_ids,
                    mask,
                    &[CrossStates::image(&image_embeds)],
                    Mode::MultiModal,
                    train,
                )?;
                let logits = head.forward(&h)?;
                let v = logits.dim(2)?;
                let flat = logits.reshape(((), v))?;
                let labels = labels.flatten_all()?;
                mlm_hits = Some(masked_hits(&flat, &labels)?);
                let ce = cross_entropy(&flat, &labels)?;
                let soft = softmax(&logits_m.reshape(((), v))?)?;
                let valid = labels.ge(0i64)?.to_dtype(DType::F32)?;
                let kd = soft_cross_entropy_per_row(&flat, &soft)?
                    .mul(&valid)?
                    .sum_all()?
                    .broadcast_div(&valid.sum_all()?)?;
                Some(((ce * (1.0 - alpha))? + (kd * alpha)?)?)
            }
        };
        Ok(ContrastiveLosses { ita: out.loss, itm: loss_itm, mlm, mlm_hits })
    }
}

/// (argmax hits, labelled rows) of logits (N, V) against labels (N,) with −100 = unlabelled.
fn masked_hits(logits: &Tensor, labels: &Tensor) -> Result<(usize, usize)> {
    let pred = logits.detach().argmax(1)?.to_vec1::<u32>()?;
    let labels = labels.to_vec1::<i64>()?;
    let masked = labels.iter().filter(|&&l| l >= 0).count();
    let hits = pred.iter().zip(&labels).filter(|(p, l)| **l >= 0 && **p as i64 == **l).count();
    Ok((hits, masked))
}

/// BERT-style masking (`ALBEF.mask`): each token is chosen with probability `p` (never [PAD] or
/// [CLS]); chosen tokens become [MASK] 80%, a random id 10%, unchanged 10%. Returns (ids, labels)
/// with labels −100 where not chosen.
pub fn mask_tokens<R: Rng>(ids: &Tensor, vocab: usize, p: f64, rng: &mut R) -> Result<(Tensor, Tensor)> {
    let shape = ids.shape().clone();
    let mut input = ids.flatten_all()?.to_vec1::<i64>()?;
    let mut labels = input.clone();
    for (tok, label) in input.iter_mut().zip(labels.iter_mut()) {
        let chosen = rng.random::<f64>() < p && *tok != 0 && *tok != 101;
        if !chosen {
            *label = -100;
            continue;
        }
        if rng.random::<f64>() < 0.8 {
            *tok = 103;
        } else if rng.random::<f64>() < 0.5 {
            *tok = rng.random_range(0..vocab as i64);
        }
    }
    let dev = ids.device();
    Ok((Tensor::from_vec(input, shape.clone(), dev)?, Tensor::from_vec(labels, shape, dev)?))
}
