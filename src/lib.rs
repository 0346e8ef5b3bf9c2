//! albef: ALBEF ("Align before Fuse", Li et al. 2021) in Rust.
//!
//! Layers, top to bottom (each uses only the layers below it):
//! `tasks` (one module per reference script on one shared harness) →
//! `train` (loop, optimizer, schedule, run folders) | `eval` (retrieval scores, VQA accuracy) |
//! `data` (datasets, loader, tokenizer, transforms, prepare/check/synth) →
//! `config` (typed task YAML) → `model` (ViT, BERT, heads, task models) →
//! `nn` (differentiable primitives, parameter store) | `checkpoint` (.pth / safetensors I/O, key
//! remapping, position-embedding interpolation) | `dist` (world discovery, the communicator of
//! data-parallel runs, `albef launch`).
//! `task`, `progress` and `util` are small helpers every layer may use; the binary's `cli` sits on
//! top.

pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod data;
pub mod dist;
pub mod eval;
pub mod heatmap;
pub mod model;
pub mod nn;
pub mod progress;
pub mod report;
pub mod task;
pub mod tasks;
pub mod train;
pub mod util;
