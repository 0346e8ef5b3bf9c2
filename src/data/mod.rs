//! Data: annotation readers and datasets, the loader, the tokenizer, caption normalisation, image
//! transforms, and the `data prepare / check / synth` commands.

use anyhow::{bail, Result};

pub mod annotations;
pub mod augment;
pub mod check;
pub mod classify;
pub mod grounding;
pub mod loader;
mod parquet_guard;
pub mod prepare;
pub mod pretrain;
pub mod refcoco;
pub mod retrieval;
pub mod shards;
pub mod synth;
pub mod text;
pub mod tokenizer;
pub mod transform;
pub mod vqa;

pub use tokenizer::{Padding, TokenBatch, Tokenizer};

use candle_core::{Device, Tensor};

/// A batch of (3, R, R) images as one (N, 3, R, R) tensor, in the order given.
pub fn image_batch<'a>(images: impl IntoIterator<Item = &'a [f32]>, res: usize, device: &Device) -> Result<Tensor> {
    let mut flat = Vec::new();
    let mut n = 0;
    for image in images {
        if image.len() != 3 * res * res {
            bail!("an image has {} values, expected 3 × {res} × {res}", image.len());
        }
        flat.extend_from_slice(image);
        n += 1;
    }
    Ok(Tensor::from_vec(flat, (n, 3, res, res), device)?)
}
