//! Data: tokenizer, caption normalisation, image transforms.

pub mod text;
pub mod tokenizer;
pub mod transform;

pub use tokenizer::{Encoded, Padding, Tokenizer};
