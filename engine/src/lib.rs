//! Orchestration: the expert I/O pipeline, generation, sampling and the CLI.

pub mod generate;
pub mod sampling;
pub mod size;
pub mod sys;
