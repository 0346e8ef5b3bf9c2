//! The image encoder: a ViT as in the reference's `models/vit.py` (timm 0.4.9 layout).
//! Pre-norm blocks, LayerNorm eps 1e-6, fused qkv laid out [q; k; v], exact-erf GELU, and a final
//! norm over all tokens. Returns the full sequence (B, 1 + N, D); index 0 is the image CLS.

use super::config::VisionConfig;
use crate::nn::{
    attention, attention_context, attention_probs, packed_self_attention, Init, LayerNorm, Linear, ParamBuilder,
};
use candle_core::{Result, Tensor, Var};

#[derive(Clone, Debug)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl Block {
    fn new(pb: &ParamBuilder, cfg: &VisionConfig) -> Result<Self> {
        let d = cfg.embed_dim;
        Ok(Self {
            norm1: LayerNorm::new(&pb.pp("norm1"), d, cfg.layer_norm_eps)?,
            qkv: Linear::new(&pb.pp("attn.qkv"), d, 3 * d)?,
            proj: Linear::new(&pb.pp("attn.proj"), d, d)?,
            norm2: LayerNorm::new(&pb.pp("norm2"), d, cfg.layer_norm_eps)?,
            fc1: Linear::new(&pb.pp("mlp.fc1"), d, cfg.mlp_hidden())?,
            fc2: Linear::new(&pb.pp("mlp.fc2"), cfg.mlp_hidden(), d)?,
            heads: cfg.num_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let qkv = self.qkv.forward(&self.norm1.forward(x)?)?;
        let x = (x + self.proj.forward(&packed_self_attention(&qkv, self.heads)?)?)?;
        let h = crate::nn::gelu(&self.fc1.forward(&self.norm2.forward(&x)?)?)?;
        x + self.fc2.forward(&h)?
    }

    /// [`Block::forward`]'s [CLS] row alone (B, 1, D): the keys and values of every token, the
    /// rest (attention, projection, MLP) for the one query row.
    fn forward_cls(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.dim(2)?;
        let qkv = self.qkv.forward(&self.norm1.forward(x)?)?;
        let (q, k, v) = (qkv.narrow(1, 0, 1)?.narrow(2, 0, d)?, qkv.narrow(2, d, d)?, qkv.narrow(2, 2 * d, d)?);
        let x = (x.narrow(1, 0, 1)? + self.proj.forward(&attention(&q, &k, &v, self.heads, None)?)?)?;
        let h = crate::nn::gelu(&self.fc1.forward(&self.norm2.forward(&x)?)?)?;
        x + self.fc2.forward(&h)?
    }

    /// [`Block::forward`] with the self-attention probabilities (B, H, N, N) returned as a
    /// fresh [`Var`] the rest of the block reads (the reference's `register_hook`).
    fn forward_probe(&self, x: &Tensor, perturb: Option<&Tensor>) -> Result<(Tensor, Var)> {
        let d = x.dim(2)?;
        let qkv = self.qkv.forward(&self.norm1.forward(x)?)?;
        let (q, k, v) = (qkv.narrow(2, 0, d)?, qkv.narrow(2, d, d)?, qkv.narrow(2, 2 * d, d)?);
        let probs = Var::from_tensor(&attention_probs(&q, &k, self.heads, None)?.detach())?;
        let read = match perturb {
            Some(p) => (probs.as_tensor() + p)?,
            None => probs.as_tensor().clone(),
        };
        let x = (x + self.proj.forward(&attention_context(&read, &v, self.heads)?)?)?;
        let h = crate::nn::gelu(&self.fc1.forward(&self.norm2.forward(&x)?)?)?;
        Ok(((x + self.fc2.forward(&h)?)?, probs))
    }
}

#[derive(Clone, Debug)]
pub struct VisionTransformer {
    /// Conv2d(3, D, kernel = stride = patch) weight, applied as a matmul over flattened patches.
    patch_weight: Tensor,
    patch_bias: Tensor,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    cfg: VisionConfig,
}

impl VisionTransformer {
    pub fn new(pb: &ParamBuilder, cfg: &VisionConfig) -> Result<Self> {
        let (d, p) = (cfg.embed_dim, cfg.patch_size);
        let patch = pb.pp("patch_embed.proj");
        Ok(Self {
            cls_token: pb.get((1, 1, d), "cls_token", Init::Standard)?,
            pos_embed: pb.get((1, cfg.num_patches() + 1, d), "pos_embed", Init::Standard)?,
            patch_weight: patch.get((d, 3, p, p), "weight", Init::Standard)?,
            patch_bias: patch.get(d, "bias", Init::Zeros)?,
            blocks: (0..cfg.depth).map(|i| Block::new(&pb.pp(format!("blocks.{i}")), cfg)).collect::<Result<_>>()?,
            norm: LayerNorm::new(&pb.pp("norm"), d, cfg.layer_norm_eps)?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// (B, 3, R, R) normalised pixels → (B, N, D) patch embeddings, patches in row-major order.
    fn embed_patches(&self, image: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = image.dims4()?;
        let p = self.cfg.patch_size;
        if h != self.cfg.image_res || w != self.cfg.image_res {
            candle_core::bail!("image is {h}x{w} but the model was built for {0}x{0}", self.cfg.image_res)
        }
        let (gh, gw) = (h / p, w / p);
        // (B, C, gh, p, gw, p) → (B, gh, gw, C, p, p): each row is one patch in the conv
        // weight's (C, kh, kw) order, so the strided conv is exactly one matmul.
        let patches =
            image.reshape((b, c, gh, p, gw, p))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b * gh * gw, c * p * p))?;
        let d = self.cfg.embed_dim;
        let w2 = self.patch_weight.reshape((d, c * p * p))?;
        crate::nn::linear(&patches, &w2, Some(&self.patch_bias))?.reshape((b, gh * gw, d))
    }

    /// The patch embeddings behind the [CLS] token, plus the position embeddings: (B, 1 + N, D).
    fn tokens(&self, image: &Tensor) -> Result<Tensor> {
        let x = self.embed_patches(image)?;
        let b = x.dim(0)?;
        let cls = self.cls_token.broadcast_as((b, 1, self.cfg.embed_dim))?;
        Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.pos_embed)
    }

    pub fn forward(&self, image: &Tensor) -> Result<Tensor> {
        let mut x = self.tokens(image)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        self.norm.forward(&x)
    }

    /// The [CLS] row (B, D) of [`VisionTransformer::forward`], for callers that read nothing
    /// else (the teacher's image feature in ITC): the last block and the final norm run for that
    /// row alone, which spares about 6% of the encoder's products. Each row of a block's output
    /// is computed on its own from all the keys and values, so the row is the same.
    pub fn forward_cls(&self, image: &Tensor) -> Result<Tensor> {
        let Some((last, blocks)) = self.blocks.split_last() else {
            return self.forward(image)?.narrow(1, 0, 1)?.squeeze(1);
        };
        let mut x = self.tokens(image)?;
        for block in blocks {
            x = block.forward(&x)?;
        }
        self.norm.forward(&last.forward_cls(&x)?)?.squeeze(1)
    }

    /// [`VisionTransformer::forward`] with block `probe`'s attention probabilities returned as a
    /// [`Var`] (the reference's `register_blk`); the backward stops at that block's input.
    /// `perturb` is added to the probabilities the block reads.
    pub fn forward_probe(&self, image: &Tensor, probe: usize, perturb: Option<&Tensor>) -> Result<(Tensor, Var)> {
        if probe >= self.blocks.len() {
            candle_core::bail!("the image encoder has blocks 0..{}, not {probe}", self.blocks.len().saturating_sub(1))
        }
        let mut x = self.tokens(image)?;
        for block in &self.blocks[..probe] {
            x = block.forward(&x)?;
        }
        let (mut x, probs) = self.blocks[probe].forward_probe(&x.detach(), perturb)?;
        for block in &self.blocks[probe + 1..] {
            x = block.forward(&x)?;
        }
        Ok((self.norm.forward(&x)?, probs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::ParamStore;
    use candle_core::Device;

    /// The [CLS]-only forward gives the full forward's [CLS] row, for a batch of images (the
    /// last block reads its rows from (B, 1, D) views of each sequence).
    #[test]
    fn cls_only_forward_is_the_cls_row_of_the_full_forward() {
        let cfg = VisionConfig {
            patch_size: 4,
            embed_dim: 24,
            depth: 2,
            num_heads: 3,
            mlp_ratio: 2.0,
            layer_norm_eps: 1e-6,
            image_res: 12,
        };
        let dev = Device::Cpu;
        let store = ParamStore::new(&dev, 5);
        store.set_init_std(0.2);
        let vit = VisionTransformer::new(&store.root(false), &cfg).unwrap();
        let image = Tensor::randn(0f32, 1.0, (3, 3, 12, 12), &dev).unwrap();
        let full = vit.forward(&image).unwrap().narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
        let cls = vit.forward_cls(&image).unwrap();
        assert_eq!(cls.dims(), [3, 24]);
        let d = (full - cls).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "max difference {d}");
    }
}
