//! Evaluation procedures shared by the CLI and the tests.

pub mod grounding;
pub mod retrieval;
pub mod vqa;
