//! The `stevedore` command line: argument parsing and dispatch to [`crate::commands`].

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use crate::commands::{self, generate::GenerateArgs, inspect::InspectArgs};
use crate::predictor_cli::{self, PredictorCommand};

/// Run mixture-of-experts language models whose experts do not fit in fast memory.
#[derive(Parser)]
#[command(name = "stevedore", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text, streaming expert weights from disk through the host cache.
    Generate(GenerateArgs),
    /// Describe a checkpoint: architecture, dense vs expert bytes, what fits a budget.
    Inspect(InspectArgs),
    /// Train and evaluate routing predictors on traces.
    #[command(subcommand)]
    Predictor(PredictorCommand),
}

/// The whole program: parse `std::env::args`, run the subcommand, map errors to exit status 1.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let res = match &cli.command {
        Command::Generate(a) => commands::generate::run(a),
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Predictor(c) => predictor_cli::run(c),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
