//! The text / fusion encoder: the reference's `models/xbert.py` (a fork of HF BERT 4.8.1).
//!
//! Post-norm layers, LayerNorm eps from the config (1e-12), exact-erf GELU. Layers from
//! `fusion_layer` on cross-attend to image states. The token-type embedding row 0 is always
//! added (ALBEF never passes `token_type_ids`). No pooler.

use super::config::BertConfig;
use crate::nn::{
    attention_context, attention_probs, attention_shared_kv, cheaper_through_weights, cross_context_through_values,
    cross_probs_through_keys, dropout, Embedding, Init, LayerNorm, Linear, ParamBuilder,
};
use candle_core::{DType, Result, Tensor, Var};

/// Which layers run, as `BertEncoder.forward(mode=…)` in the reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Layers below `fusion_layer`, from token ids.
    Text,
    /// Layers from `fusion_layer` on, from given hidden states (the embedding layer is skipped).
    Fusion,
    /// All layers, from token ids.
    MultiModal,
}

/// States a cross-attention layer attends to, with an optional (B, Lk) 0/1 padding mask
/// (image states have none).
#[derive(Clone, Debug)]
pub struct CrossStates {
    pub states: Tensor,
    pub mask: Option<Tensor>,
    /// The row of `states` (and `mask`) each query row attends to, u32 (B,), when query rows
    /// share states (ITM pairs one image with several texts): keys and values are then projected
    /// once per row of `states` (or not at all, through the weights), not once per query row.
    /// `None`: query row i attends to row i.
    pub rows: Option<Tensor>,
}

impl CrossStates {
    pub fn image(states: &Tensor) -> Self {
        Self { states: states.clone(), mask: None, rows: None }
    }

    /// Image states read by query row i from row `rows[i]` of `states`.
    pub fn image_rows(states: &Tensor, rows: &Tensor) -> Self {
        Self { states: states.clone(), mask: None, rows: Some(rows.clone()) }
    }
}

/// What one cross-attention layer reads: [`CrossStates`] with the mask made additive.
#[derive(Clone, Copy)]
struct CrossInput<'a> {
    states: &'a Tensor,
    mask: Option<&'a Tensor>,
    rows: Option<&'a Tensor>,
}

impl<'a> CrossInput<'a> {
    fn unmasked(states: &'a Tensor) -> Self {
        Self { states, mask: None, rows: None }
    }
}

/// (B, L) 0/1 mask → additive (B, 1, 1, L) with `(1 − m)·big_negative`.
pub fn additive_mask(mask: &Tensor, big_negative: f64) -> Result<Tensor> {
    let (b, l) = mask.dims2()?;
    let m = mask.to_dtype(DType::F32)?;
    (m.affine(-1.0, 1.0)? * big_negative)?.reshape((b, 1, 1, l))
}

/// Causal decoder mask: lower-triangular × padding, additive (B, 1, L, L).
fn causal_mask(mask: &Tensor) -> Result<Tensor> {
    let (b, l) = mask.dims2()?;
    let tri: Vec<f32> = (0..l).flat_map(|i| (0..l).map(move |j| if j <= i { 1.0 } else { 0.0 })).collect();
    let tri = Tensor::from_vec(tri, (1, 1, l, l), mask.device())?;
    let pad = mask.to_dtype(DType::F32)?.reshape((b, 1, 1, l))?;
    let m = tri.broadcast_mul(&pad)?;
    m.affine(-1.0, 1.0)? * -10000.0
}

#[derive(Clone, Debug)]
struct Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    norm: LayerNorm,
    heads: usize,
    attn_dropout: f32,
    hidden_dropout: f32,
}

impl Attention {
    /// `kv` builds key/value (a different prefix where NLVR2 shares them across layers).
    fn new(pb: &ParamBuilder, kv: &ParamBuilder, cfg: &BertConfig, kv_width: usize) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            query: Linear::new(&pb.pp("self.query"), d, d)?,
            key: Linear::new(&kv.pp("self.key"), kv_width, d)?,
            value: Linear::new(&kv.pp("self.value"), kv_width, d)?,
            dense: Linear::new(&pb.pp("output.dense"), d, d)?,
            norm: LayerNorm::new(&pb.pp("output.LayerNorm"), d, cfg.layer_norm_eps)?,
            heads: cfg.num_attention_heads,
            attn_dropout: cfg.attention_probs_dropout_prob,
            hidden_dropout: cfg.hidden_dropout_prob,
        })
    }

    /// LN(x + Dense(Attn(q = x, kv = kv_states))). `kv_states` with batch 1 is shared by every
    /// query row (evaluation: many candidate texts against one image); with `rows`, query row i
    /// reads row `rows[i]` of the states. Unmasked cross-attention of short texts against long
    /// states runs through the key and value weights where that takes fewer products
    /// ([`cheaper_through_weights`]); the values are the reference's up to rounding.
    fn forward(
        &self,
        x: &Tensor,
        kv_states: &Tensor,
        rows: Option<&Tensor>,
        mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let pairs = x.dim(0)?;
        let distinct = kv_states.dim(0)?;
        if mask.is_none() && (rows.is_some() || distinct == pairs) && cheaper_through_weights(x, kv_states, self.heads)?
        {
            let states = match rows {
                Some(r) => kv_states.index_select(r, 0)?,
                None => kv_states.clone(),
            };
            let probs = cross_probs_through_keys(
                &self.query.forward(x)?,
                &states,
                &self.key.weight,
                self.key.bias.as_ref(),
                self.heads,
            )?;
            let probs = dropout(&probs, self.attn_dropout, train)?;
            let ctx = cross_context_through_values(&probs, &states, &self.value.weight, self.value.bias.as_ref())?;
            let out = dropout(&self.dense.forward(&ctx)?, self.hidden_dropout, train)?;
            return self.norm.forward(&(out + x)?);
        }
        let (k, v) = (self.key.forward(kv_states)?, self.value.forward(kv_states)?);
        if distinct == 1 && x.dim(0)? > 1 && mask.is_none() && !train {
            let ctx = attention_shared_kv(&self.query.forward(x)?, &k, &v, self.heads)?;
            return self.norm.forward(&(self.dense.forward(&ctx)? + x)?);
        }
        let (k, v) = match rows {
            Some(r) => (k.index_select(r, 0)?, v.index_select(r, 0)?),
            None => (k, v),
        };
        let probs = attention_probs(&self.query.forward(x)?, &k, self.heads, mask)?;
        let probs = dropout(&probs, self.attn_dropout, train)?;
        let ctx = attention_context(&probs, &v, self.heads)?;
        let out = dropout(&self.dense.forward(&ctx)?, self.hidden_dropout, train)?;
        self.norm.forward(&(out + x)?)
    }

    /// [`Attention::forward`] in evaluation, with the attention probabilities (B, H, Lq, Lk)
    /// returned as a fresh [`Var`] that the rest of the forward reads, so that a backward pass
    /// gives their gradient (the reference's `save_attention` / `attn_gradients` hooks). Nothing
    /// upstream of the probabilities is differentiated. `perturb` is added to the probabilities
    /// the rest reads (finite-difference checks of their gradient).
    fn forward_probe(
        &self,
        x: &Tensor,
        kv_states: &Tensor,
        mask: Option<&Tensor>,
        perturb: Option<&Tensor>,
    ) -> Result<(Tensor, Var)> {
        let probs = attention_probs(&self.query.forward(x)?, &self.key.forward(kv_states)?, self.heads, mask)?;
        let probs = Var::from_tensor(&probs.detach())?;
        let read = match perturb {
            Some(d) => (probs.as_tensor() + d)?,
            None => probs.as_tensor().clone(),
        };
        let ctx = attention_context(&read, &self.value.forward(kv_states)?, self.heads)?;
        Ok((self.norm.forward(&(self.dense.forward(&ctx)? + x)?)?, probs))
    }
}

#[derive(Clone, Debug)]
struct Layer {
    attention: Attention,
    cross: Option<Attention>,
    intermediate: Linear,
    output: Linear,
    norm: LayerNorm,
    hidden_dropout: f32,
}

impl Layer {
    fn forward(&self, x: &Tensor, mask: &Tensor, cross: Option<CrossInput>, train: bool) -> Result<Tensor> {
        let mut h = self.attention.forward(x, x, None, Some(mask), train)?;
        if let (Some(attn), Some(c)) = (&self.cross, cross) {
            h = attn.forward(&h, c.states, c.rows, c.mask, train)?;
        }
        let ff = self.output.forward(&crate::nn::gelu(&self.intermediate.forward(&h)?)?)?;
        self.norm.forward(&(dropout(&ff, self.hidden_dropout, train)? + h)?)
    }

    /// [`Layer::forward`] in evaluation, returning the cross-attention probabilities as a [`Var`].
    fn forward_probe(
        &self,
        x: &Tensor,
        mask: &Tensor,
        states: &Tensor,
        perturb: Option<&Tensor>,
    ) -> Result<(Tensor, Var)> {
        let h = self.attention.forward(x, x, None, Some(mask), false)?;
        let Some(cross) = &self.cross else { candle_core::bail!("this BERT layer has no cross-attention") };
        let (h, probs) = cross.forward_probe(&h, states, None, perturb)?;
        let ff = self.output.forward(&crate::nn::gelu(&self.intermediate.forward(&h)?)?)?;
        Ok((self.norm.forward(&(ff + h)?)?, probs))
    }
}

#[derive(Clone, Debug)]
pub struct Embeddings {
    pub word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
    dropout: f32,
}

impl Embeddings {
    fn new(pb: &ParamBuilder, cfg: &BertConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            word: Embedding::new(&pb.pp("word_embeddings"), cfg.vocab_size, d)?,
            position: Embedding::new(&pb.pp("position_embeddings"), cfg.max_position_embeddings, d)?,
            token_type: Embedding::new(&pb.pp("token_type_embeddings"), cfg.type_vocab_size, d)?,
            norm: LayerNorm::new(&pb.pp("LayerNorm"), d, cfg.layer_norm_eps)?,
            dropout: cfg.hidden_dropout_prob,
        })
    }

    fn forward(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        let l = ids.dim(1)?;
        let words = self.word.forward(ids)?;
        let pos = self.position.weight.narrow(0, 0, l)?;
        let type0 = self.token_type.weight.narrow(0, 0, 1)?;
        let x = words.broadcast_add(&(pos.broadcast_add(&type0))?)?;
        dropout(&self.norm.forward(&x)?, self.dropout, train)
    }
}

/// How the layers of a [`BertModel`] are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Plain ALBEF text/fusion encoder.
    Encoder,
    /// Causal self-attention (the VQA answer decoder).
    Decoder,
    /// NLVR2: cross key/value of layer `f + 2i` are the parameters of layer `f + 2i + 1`'s ...
    /// stored under the even layer's name (PyTorch keeps the first name of a shared parameter).
    SharedCrossKv,
}

#[derive(Clone, Debug)]
pub struct BertModel {
    pub embeddings: Embeddings,
    layers: Vec<Layer>,
    fusion_layer: usize,
    layout: Layout,
}

impl BertModel {
    /// `pb` points at the BERT root (`text_encoder`, `text_encoder.bert`, `text_decoder.bert`).
    pub fn new(pb: &ParamBuilder, cfg: &BertConfig, layout: Layout) -> Result<Self> {
        let embeddings = Embeddings::new(&pb.pp("embeddings"), cfg)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let lp = pb.pp(format!("encoder.layer.{l}"));
            let cross = if l >= cfg.fusion_layer {
                let cp = lp.pp("crossattention");
                let kv = if layout == Layout::SharedCrossKv && (l - cfg.fusion_layer) % 2 == 1 {
                    let owner = pb.pp(format!("encoder.layer.{}", l - 1)).pp("crossattention");
                    for name in ["self.key.weight", "self.key.bias", "self.value.weight", "self.value.bias"] {
                        pb.store().add_alias(&cp.path(name), &owner.path(name));
                    }
                    owner
                } else {
                    cp.clone()
                };
                Some(Attention::new(&cp, &kv, cfg, cfg.encoder_width)?)
            } else {
                None
            };
            layers.push(Layer {
                attention: Attention::new(&lp.pp("attention"), &lp.pp("attention"), cfg, cfg.hidden_size)?,
                cross,
                intermediate: Linear::new(&lp.pp("intermediate.dense"), cfg.hidden_size, cfg.intermediate_size)?,
                output: Linear::new(&lp.pp("output.dense"), cfg.intermediate_size, cfg.hidden_size)?,
                norm: LayerNorm::new(&lp.pp("output.LayerNorm"), cfg.hidden_size, cfg.layer_norm_eps)?,
                hidden_dropout: cfg.hidden_dropout_prob,
            });
        }
        Ok(Self { embeddings, layers, fusion_layer: cfg.fusion_layer, layout })
    }

    /// Token ids → embeddings → layers of `mode` (`Text` or `MultiModal`).
    pub fn forward_ids(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        cross: &[CrossStates],
        mode: Mode,
        train: bool,
    ) -> Result<Tensor> {
        let x = self.embeddings.forward(ids, train)?;
        self.forward_embeds(&x, mask, cross, mode, train)
    }

    /// Runs the layers of `mode` on given hidden states.
    pub fn forward_embeds(
        &self,
        x: &Tensor,
        mask: &Tensor,
        cross: &[CrossStates],
        mode: Mode,
        train: bool,
    ) -> Result<Tensor> {
        let range = match mode {
            Mode::Text => 0..self.fusion_layer.min(self.layers.len()),
            Mode::Fusion => self.fusion_layer..self.layers.len(),
            Mode::MultiModal => 0..self.layers.len(),
        };
        let self_mask = match self.layout {
            Layout::Decoder => causal_mask(mask)?,
            _ => additive_mask(mask, -10000.0)?,
        };
        // transformers' `invert_attention_mask`: −1e9 in fp32.
        let cross_masks: Vec<Option<Tensor>> = cross
            .iter()
            .map(|c| {
                c.mask
                    .as_ref()
                    .map(|m| additive_mask(&c.rows.as_ref().map_or(Ok(m.clone()), |r| m.index_select(r, 0))?, -1e9))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let mut h = x.clone();
        for l in range {
            let c = if l >= self.fusion_layer && !cross.is_empty() {
                let i = (l - self.fusion_layer) % cross.len();
                Some(CrossInput {
                    states: &cross[i].states,
                    mask: cross_masks[i].as_ref(),
                    rows: cross[i].rows.as_ref(),
                })
            } else {
                None
            };
            if self.layers[l].cross.is_some() && c.is_none() {
                candle_core::bail!("BERT layer {l} cross-attends but no encoder states were given")
            }
            h = self.layers[l].forward(&h, &self_mask, c, train)?;
        }
        Ok(h)
    }
}

impl BertModel {
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn fusion_layer(&self) -> usize {
        self.fusion_layer
    }

    /// The multi-modal forward of evaluation (all layers, from token ids, cross-attending
    /// `image`), with the cross-attention probabilities (B, H, L, Lk) of layer `probe` returned
    /// as a [`Var`]: the backward of anything computed from the output gives their gradient.
    /// The states entering layer `probe` are detached, so the backward stops there; `perturb`
    /// (same shape) is added to the probabilities the layer reads.
    pub fn forward_probing_cross(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        image: &Tensor,
        probe: usize,
        perturb: Option<&Tensor>,
    ) -> Result<(Tensor, Var)> {
        if probe >= self.layers.len() || self.layers[probe].cross.is_none() {
            candle_core::bail!(
                "BERT layer {probe} has no cross-attention (layers {}..{} have)",
                self.fusion_layer,
                self.layers.len().saturating_sub(1)
            )
        }
        let self_mask = additive_mask(mask, -10000.0)?;
        let mut h = self.embeddings.forward(ids, false)?;
        for l in 0..probe {
            let c = (l >= self.fusion_layer).then_some(CrossInput::unmasked(image));
            h = self.layers[l].forward(&h, &self_mask, c, false)?;
        }
        let image = image.detach();
        let (mut h, probs) = self.layers[probe].forward_probe(&h.detach(), &self_mask, &image, perturb)?;
        for l in probe + 1..self.layers.len() {
            h = self.layers[l].forward(&h, &self_mask, Some(CrossInput::unmasked(&image)), false)?;
        }
        Ok((h, probs))
    }
}

/// `BertOnlyMLMHead`: dense → GELU → LayerNorm → tied decoder (word embeddings) + bias.
#[derive(Clone, Debug)]
pub struct MlmHead {
    dense: Linear,
    norm: LayerNorm,
    decoder_weight: Tensor,
    bias: Tensor,
}

impl MlmHead {
    /// `pb` points at `…cls.predictions`; `bert_pb` at the BERT root whose word embeddings are tied.
    pub fn new(pb: &ParamBuilder, bert_pb: &ParamBuilder, cfg: &BertConfig, embeddings: &Embeddings) -> Result<Self> {
        let store = pb.store();
        store.add_alias(&pb.path("decoder.weight"), &bert_pb.path("embeddings.word_embeddings.weight"));
        store.add_alias(&pb.path("decoder.bias"), &pb.path("bias"));
        Ok(Self {
            dense: Linear::new(&pb.pp("transform.dense"), cfg.hidden_size, cfg.hidden_size)?,
            norm: LayerNorm::new(&pb.pp("transform.LayerNorm"), cfg.hidden_size, cfg.layer_norm_eps)?,
            decoder_weight: embeddings.word.weight.clone(),
            bias: pb.get(cfg.vocab_size, "bias", Init::Zeros)?,
        })
    }

    /// (…, D) → (…, V) logits.
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let t = self.norm.forward(&crate::nn::gelu(&self.dense.forward(h)?)?)?;
        let dims = t.dims().to_vec();
        let d = *dims.last().unwrap();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let logits = crate::nn::linear(&t.reshape((rows, d))?, &self.decoder_weight, Some(&self.bias))?;
        let mut out = dims;
        *out.last_mut().unwrap() = self.bias.dim(0)?;
        logits.reshape(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::ParamStore;
    use candle_core::{Device, IndexOp};

    /// The fusion layers give the same states whichever way cross-attention runs: texts against
    /// their own copies of an image (short texts, long states: through the key and value
    /// weights), against rows of the images (ITM's pairs), and against the one image shared
    /// (evaluation: keys and values projected once).
    #[test]
    fn cross_attention_paths_agree() {
        let cfg = BertConfig {
            vocab_size: 50,
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 64,
            max_position_embeddings: 16,
            fusion_layer: 1,
            encoder_width: 24,
            ..BertConfig::default()
        };
        let dev = Device::Cpu;
        let store = ParamStore::new(&dev, 3);
        store.set_init_std(0.2);
        let bert = BertModel::new(&store.root(false), &cfg, Layout::Encoder).unwrap();
        let (texts, len, tokens) = (3, 5, 60);
        let text = Tensor::randn(0f32, 1.0, (texts, len, 32), &dev).unwrap();
        let mask = Tensor::ones((texts, len), DType::I64, &dev).unwrap();
        let images = Tensor::randn(0f32, 1.0, (2, tokens, 24), &dev).unwrap();
        let image = images.i(1..2).unwrap();
        let run = |cross: CrossStates| bert.forward_embeds(&text, &mask, &[cross], Mode::Fusion, false).unwrap();
        let shared = run(CrossStates::image(&image));
        let copies = run(CrossStates::image(&image.repeat((texts, 1, 1)).unwrap()));
        let rows = run(CrossStates::image_rows(&images, &Tensor::new(&[1u32, 1, 1], &dev).unwrap()));
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        let q = Tensor::zeros((texts, len, 32), DType::F32, &dev).unwrap();
        assert!(
            crate::nn::cheaper_through_weights(&q, &images, 4).unwrap(),
            "these shapes must take the through-weights path"
        );
        assert!(diff(&shared, &copies) < 1e-5, "copies: {}", diff(&shared, &copies));
        assert!(diff(&shared, &rows) < 1e-5, "rows: {}", diff(&shared, &rows));
    }
}
