//! Checkpoints: `.pth` / safetensors I/O, the reference's key remapping, position-embedding
//! interpolation, and loading with a key report.

mod interpolate;
mod kind;
mod io;
mod load;
mod remap;

pub use kind::{classify, CheckpointKind};
pub use interpolate::{bicubic_resize, interpolate_pos_embed};
pub use io::{read_checkpoint, save_safetensors, Checkpoint, FileFormat, StateDict};
pub use load::{load_into, KeyReport};
pub use remap::{remap, source_kind, SourceKind, Task};
