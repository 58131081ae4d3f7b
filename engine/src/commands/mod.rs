//! The `stevedore` subcommands. Arguments become plain config values here, before any hot loop.

pub mod bench;
pub mod engine_args;
pub mod generate;
pub mod inspect;
pub mod perplexity;
pub mod quantize;

use std::path::Path;

use stevedore_models::Model;

use crate::size::{human, Size};

/// An error for the user: printed as `error: ...` and exit status 1.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;

/// Loads the model in `dir`, logging what it found.
pub fn load_model(dir: &Path) -> Result<Model, CliError> {
    let t = std::time::Instant::now();
    let model = Model::load(dir)?;
    tracing::info!(
        arch = model.config.arch.hf_name(),
        dense = %human(model.dense_bytes()),
        seconds = t.elapsed().as_secs_f64(),
        "loaded {}",
        dir.display()
    );
    Ok(model)
}

/// Parses a `--host-cache` style value (the clap value parser).
pub fn parse_size(s: &str) -> Result<Size, String> {
    Size::parse(s)
}
