//! Checkpoints: `.pth` / safetensors I/O, the reference's key remapping, position-embedding
//! interpolation, and loading with a key report.

pub mod init;
mod interpolate;
mod io;
mod kind;
mod load;
pub(crate) mod pickle_guard;
mod remap;

pub use interpolate::{interpolate_pos_embed, torch_interpolate_bicubic, torch_upsample_bicubic_plane};
pub use io::{
    read_checkpoint, save_pth, save_safetensors, Checkpoint, CheckpointFile, FileFormat, StateDict, TensorMeta,
};
pub use kind::{classify, classify_file, CheckpointKind};
pub use load::{load_into, load_with, KeyReport};
pub use remap::{remap, source_kind, SourceKind};

/// The metadata albef writes into its checkpoints: the task (checked when loading) and version.
pub fn albef_metadata(task: crate::task::Task) -> std::collections::BTreeMap<String, String> {
    [("albef_task", task.as_str()), ("albef_version", env!("CARGO_PKG_VERSION"))]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
