//! Data: tokenizer, caption normalisation, image transforms.

pub mod annotations;
pub mod augment;
pub mod check;
pub mod classify;
pub mod loader;
pub mod prepare;
pub mod pretrain;
pub mod refcoco;
pub mod retrieval;
pub mod synth;
pub mod text;
pub mod tokenizer;
pub mod transform;
pub mod vqa;

pub use tokenizer::{Encoded, Padding, Tokenizer};
