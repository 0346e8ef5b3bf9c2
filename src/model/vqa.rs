//! The VQA model (`model_vqa.py`): an encoder over question + image, and a causal answer
//! decoder whose every layer cross-attends to the encoder's question states.

use super::bert::{BertModel, CrossStates, Layout, MlmHead, Mode};
use super::config::{BertConfig, ModelConfig};
use super::momentum::{Ema, Teacher};
use super::vit::VisionTransformer;
use crate::nn::{cross_entropy_per_row, soft_cross_entropy_per_row, softmax, ParamBuilder, ParamStore};
use crate::util::topk_indices;
use candle_core::{DType, Device, IndexOp, Result, Tensor};

struct Branch {
    visual: VisionTransformer,
    encoder: BertModel,
    decoder: BertModel,
    lm_head: MlmHead,
}

impl Branch {
    fn new(pb: &ParamBuilder, cfg: &ModelConfig, suffix: &str) -> Result<Self> {
        let visual = VisionTransformer::new(&pb.pp(format!("visual_encoder{suffix}")), &cfg.vision)?;
        let encoder = BertModel::new(&pb.pp(format!("text_encoder{suffix}")), &cfg.bert, Layout::Encoder)?;
        let dcfg = decoder_config(cfg);
        let droot = pb.pp(format!("text_decoder{suffix}"));
        let decoder = BertModel::new(&droot.pp("bert"), &dcfg, Layout::Decoder)?;
        let lm_head = MlmHead::new(&droot.pp("cls.predictions"), &droot.pp("bert"), &dcfg, &decoder.embeddings)?;
        Ok(Self { visual, encoder, decoder, lm_head })
    }

    fn question_states(&self, image: &Tensor, q_ids: &Tensor, q_mask: &Tensor, train: bool) -> Result<Tensor> {
        let image_embeds = self.visual.forward(image)?;
        self.encoder.forward_ids(q_ids, q_mask, &[CrossStates::image(&image_embeds)], Mode::MultiModal, train)
    }

    /// Decoder logits (A, La, V) for answers against per-answer question states.
    fn answer_logits(
        &self,
        a_ids: &Tensor,
        a_mask: &Tensor,
        q_states: &Tensor,
        q_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let cross = [CrossStates { states: q_states.clone(), mask: Some(q_mask.clone()), rows: None }];
        let h = self.decoder.forward_ids(a_ids, a_mask, &cross, Mode::MultiModal, train)?;
        self.lm_head.forward(&h)
    }
}

/// The decoder's config: the reference copies the BERT config with `fusion_layer = 0` and
/// `num_hidden_layers = 6`.
pub fn decoder_config(cfg: &ModelConfig) -> BertConfig {
    BertConfig { fusion_layer: 0, num_hidden_layers: cfg.decoder_layers, ..cfg.bert.clone() }
}

/// Repeats row b of `x` `counts[b]` times (`torch.repeat_interleave` on dim 0).
fn repeat_rows(x: &Tensor, counts: &[usize]) -> Result<Tensor> {
    let idx: Vec<u32> = counts.iter().enumerate().flat_map(|(b, &k)| std::iter::repeat_n(b as u32, k)).collect();
    let n = idx.len();
    x.index_select(&Tensor::from_vec(idx, n, x.device())?, 0)
}

/// Summed next-token NLL per answer (A,) from logits (A, La, V): position t predicts token t+1,
/// [PAD] targets ignored — `BertLMHeadModel(labels=…, reduction='none')`.
fn answer_nll(logits: &Tensor, a_ids: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let (a, la, v) = logits.dims3()?;
    let shifted = logits.narrow(1, 0, la - 1)?.reshape((a * (la - 1), v))?;
    let targets = a_ids.narrow(1, 1, la - 1)?;
    let valid = targets.ne(0i64)?;
    let targets =
        valid.where_cond(&targets, &Tensor::full(-100i64, targets.shape(), targets.device())?)?.flatten_all()?;
    let nll = cross_entropy_per_row(&shifted, &targets)?.reshape((a, la - 1))?.sum(1)?;
    Ok((nll, shifted, valid.to_dtype(DType::F32)?.reshape((a, la - 1))?))
}

pub struct VqaModel {
    pub store: ParamStore,
    pub cfg: ModelConfig,
    online: Branch,
    teacher: Option<Teacher<Branch>>,
}

/// Output of answer ranking for a batch of questions.
#[derive(Clone, Debug)]
pub struct Ranking {
    /// (B, k) answer indices, best first.
    pub ids: Vec<Vec<usize>>,
    /// (B, k) softmax over the k re-ranked scores.
    pub probs: Vec<Vec<f32>>,
    /// (B, V) decoder logits of the first step (the [CLS] start token).
    pub first_token_logits: Tensor,
}

impl VqaModel {
    pub fn new(cfg: &ModelConfig, device: &Device, seed: u64) -> Result<Self> {
        let store = cfg.new_store(device, seed);
        let online = Branch::new(&store.root(true), cfg, "")?;
        let teacher = (cfg.distill && cfg.builds_teacher())
            .then(|| Teacher::build(&store, cfg.momentum, |pb, suffix| Branch::new(pb, cfg, suffix)))
            .transpose()?;
        Ok(Self { store, cfg: cfg.clone(), online, teacher })
    }

    /// The teacher's EMA, when the model distils.
    pub fn ema(&self) -> Option<&Ema> {
        self.teacher.as_ref().map(|t| &t.ema)
    }

    pub fn image_embeds(&self, image: &Tensor) -> Result<Tensor> {
        self.online.visual.forward(image)
    }

    /// Encoder output (B, Lq, D) for questions about images.
    pub fn question_states(&self, image: &Tensor, q_ids: &Tensor, q_mask: &Tensor) -> Result<Tensor> {
        self.online.question_states(image, q_ids, q_mask, false)
    }

    /// Training loss (§3.4): Σ_answers weight · ((1−α)·NLL + α·KD) / B. `counts[b]` answers
    /// belong to question b, in order.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_train(
        &self,
        image: &Tensor,
        q_ids: &Tensor,
        q_mask: &Tensor,
        a_ids: &Tensor,
        a_mask: &Tensor,
        weights: &Tensor,
        counts: &[usize],
        alpha: f64,
        train: bool,
    ) -> Result<Tensor> {
        let b = image.dim(0)?;
        let q = self.online.question_states(image, q_ids, q_mask, train)?;
        let q_rep = repeat_rows(&q, counts)?;
        let m_rep = repeat_rows(q_mask, counts)?;
        let logits = self.online.answer_logits(a_ids, a_mask, &q_rep, &m_rep, train)?;
        let (nll, shifted, valid) = answer_nll(&logits, a_ids)?;
        let loss = match &self.teacher {
            Some(Teacher { branch: teacher, ema }) => {
                ema.update()?;
                let q_m = repeat_rows(&teacher.question_states(image, q_ids, q_mask, train)?, counts)?;
                let logits_m = teacher.answer_logits(a_ids, a_mask, &q_m, &m_rep, train)?;
                let (a, la, v) = logits_m.dims3()?;
                let soft = softmax(&logits_m.narrow(1, 0, la - 1)?.reshape((a * (la - 1), v))?)?;
                let kd = soft_cross_entropy_per_row(&shifted, &soft)?.reshape((a, la - 1))?.mul(&valid)?.sum(1)?;
                ((nll * (1.0 - alpha))? + (kd * alpha)?)?
            }
            None => nll,
        };
        loss.mul(weights)?.sum_all()? / b as f64
    }

    /// Σ log-prob of each full answer given each question: (B, N_ans) = −summed NLL of the
    /// answer tokens after [CLS] (including its [SEP]).
    pub fn answer_loglik(
        &self,
        q_states: &Tensor,
        q_mask: &Tensor,
        answer_ids: &Tensor,
        answer_mask: &Tensor,
    ) -> Result<Tensor> {
        let (bq, n) = (q_states.dim(0)?, answer_ids.dim(0)?);
        let q_rep = repeat_rows(q_states, &vec![n; bq])?;
        let m_rep = repeat_rows(q_mask, &vec![n; bq])?;
        let a_ids = answer_ids.repeat((bq, 1))?;
        let a_mask = answer_mask.repeat((bq, 1))?;
        let logits = self.online.answer_logits(&a_ids, &a_mask, &q_rep, &m_rep, false)?;
        answer_nll(&logits, &a_ids)?.0.neg()?.reshape((bq, n))
    }

    /// `rank_answer` (§3.5): top-k answers by first-token probability, re-scored by
    /// log p(first) + Σ log p(answer) — the first token counted twice, as in the reference.
    pub fn rank_answers(
        &self,
        q_states: &Tensor,
        q_mask: &Tensor,
        answer_ids: &Tensor,
        answer_mask: &Tensor,
        k: usize,
    ) -> Result<Ranking> {
        let bq = q_states.dim(0)?;
        let n_ans = answer_ids.dim(0)?;
        let k = k.min(n_ans);
        let dev = q_states.device();
        let start = answer_ids.i((0..1, 0..1))?.repeat((bq, 1))?;
        let start_mask = Tensor::ones((bq, 1), DType::I64, dev)?;
        let logits = self.online.answer_logits(&start, &start_mask, q_states, q_mask, false)?;
        let first_token_logits = logits.i((.., 0, ..))?;
        let first_ids = answer_ids.i((.., 1))?.to_dtype(DType::U32)?;
        let p_first = softmax(&first_token_logits)?.index_select(&first_ids, 1)?.to_vec2::<f32>()?;
        let topk: Vec<Vec<usize>> = p_first.iter().map(|row| topk_indices(row, k)).collect();
        let flat: Vec<u32> = topk.iter().flatten().map(|&i| i as u32).collect();
        let sel = Tensor::from_vec(flat, bq * k, dev)?;
        let cand_ids = answer_ids.index_select(&sel, 0)?;
        let cand_mask = answer_mask.index_select(&sel, 0)?;
        let q_rep = repeat_rows(q_states, &vec![k; bq])?;
        let m_rep = repeat_rows(q_mask, &vec![k; bq])?;
        let cand_logits = self.online.answer_logits(&cand_ids, &cand_mask, &q_rep, &m_rep, false)?;
        let nll = answer_nll(&cand_logits, &cand_ids)?.0.to_vec1::<f32>()?;
        let mut ids = Vec::with_capacity(bq);
        let mut probs = Vec::with_capacity(bq);
        for b in 0..bq {
            let scores: Vec<f32> = (0..k).map(|j| p_first[b][topk[b][j]].ln() - nll[b * k + j]).collect();
            let p = softmax(&Tensor::new(scores.as_slice(), dev)?)?.to_vec1::<f32>()?;
            let order = topk_indices(&p, k);
            ids.push(order.iter().map(|&j| topk[b][j]).collect());
            probs.push(order.iter().map(|&j| p[j]).collect());
        }
        Ok(Ranking { ids, probs, first_token_logits })
    }
}
