//! Orchestration: the expert I/O pipeline, generation, sampling and the CLI.

pub mod generate;
pub mod sampling;
pub mod size;
pub mod sys;
pub mod io;
pub mod store;
pub mod prefetch;
pub mod cli;
pub mod commands;
pub mod record;
pub mod trace;
pub mod config;
pub mod sim;
pub mod predictor_cli;
