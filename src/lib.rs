//! albef: ALBEF ("Align before Fuse", Li et al. 2021) in Rust.
//!
//! Layers, top to bottom: `model` (ViT, BERT text/fusion encoder, heads, task assemblies) on
//! `nn` (differentiable primitives, parameter store) and `checkpoint` (.pth / safetensors I/O,
//! key remapping, position-embedding interpolation); `data` holds the tokenizer and image
//! transforms.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod eval;
pub mod model;
pub mod nn;
pub mod report;
pub mod tasks;
pub mod train;
pub mod util;
