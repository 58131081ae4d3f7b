//! Orchestration: the [`engine::Engine`] and its scheduler, the expert I/O pipeline (the only
//! code that moves bytes between tiers), routing forecasts, sampling, tokenization, traces and
//! the simulator, and the CLI on top.

pub mod cli;
pub mod commands;
pub mod config;
pub mod engine;
pub mod forecast;
pub mod io;
pub mod predictor_cli;
pub mod record;
pub mod sampling;
pub mod sim;
pub mod size;
pub mod store;
pub mod sys;
pub mod text;
pub mod trace;
