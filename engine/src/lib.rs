//! Orchestration: the expert I/O pipeline, generation, sampling and the CLI.

pub mod cli;
pub mod commands;
pub mod config;
pub mod generate;
pub mod io;
pub mod predictor_cli;
pub mod prefetch;
pub mod record;
pub mod sampling;
pub mod sim;
pub mod size;
pub mod store;
pub mod sys;
pub mod trace;
