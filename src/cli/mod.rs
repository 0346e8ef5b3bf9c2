//! Subcommand implementations.

pub mod bench;
pub mod checkpoint;
