//! Checkpoints: `.pth` / safetensors I/O, the reference's key remapping, position-embedding
//! interpolation, and loading with a key report.

mod interpolate;
mod io;
mod kind;
mod load;
mod remap;

pub use interpolate::{bicubic_resize, interpolate_pos_embed};
pub use io::{read_checkpoint, save_safetensors, Checkpoint, FileFormat, StateDict};
pub use kind::{classify, CheckpointKind};
pub use load::{load_into, KeyReport};
pub use remap::{remap, source_kind, SourceKind, Task};
