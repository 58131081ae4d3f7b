//! Orchestration: the [`engine::Engine`] and its scheduler, the expert I/O pipeline (the only
//! code that moves bytes between tiers), routing forecasts, sampling, tokenization, traces and
//! the simulator, the OpenAI-compatible API ([`api`]) and the CLI and HTTP server on top.

pub mod api;
pub mod batch;
pub mod cli;
pub mod commands;
pub mod config;
pub mod engine;
pub mod forecast;
pub mod horizon;
pub mod io;
pub mod predictor_cli;
pub mod record;
pub mod sampling;
pub mod serve;
pub mod sim;
pub mod size;
pub mod store;
pub mod sys;
pub mod text;
pub mod trace;
