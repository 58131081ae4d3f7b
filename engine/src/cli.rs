//! The `stevedore` command line: argument parsing and dispatch to [`crate::commands`].

use std::process::ExitCode;

use crate::commands::{self, generate::GenerateArgs, inspect::InspectArgs};
use crate::predictor_cli::{self, PredictorCommand};
use crate::sim::{self, SimulateArgs};
use clap::{Parser, Subcommand};

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
    /// Serve the model over an OpenAI-compatible HTTP API (chat and text completions, streaming,
    /// Prometheus metrics), batching concurrent clients into shared forward passes.
    Serve(crate::serve::ServeArgs),
    /// Run an offline batch job: OpenAI Batch API JSONL in, results appended durably, resumable,
    /// shardable.
    Batch(crate::batch::BatchArgs),
    /// Measure prefill and decode speed on a model (llama-bench style): tokens/s at a few
    /// prompt sizes and for decode, and the weight bytes per second against the memory
    /// bandwidth measured in the same run, at each host-cache budget.
    Bench(commands::bench::BenchArgs),
    /// Measure a model's perplexity on a text file, chunked as llama.cpp's `llama-perplexity`
    /// does, so that the numbers compare.
    ///
    /// The text is tokenized once with the model's tokenizer (a BOS in front if the tokenizer
    /// adds one, no other special tokens) and cut into consecutive chunks of --context tokens,
    /// the remainder dropped; each chunk's first token is replaced by BOS if the tokenizer adds
    /// one. Each chunk runs from position 0 and only its second half is scored: with
    /// first = context/2, the tokens at positions first+1 ..= context-1, each given the chunk's
    /// tokens before it. PPL = exp(mean negative log-likelihood over every scored token); the
    /// error is llama.cpp's (the NLL's standard error of the mean, times PPL). All chunks are
    /// submitted to one engine and share forward passes; the result does not depend on the
    /// batching or the host-cache budget. Running PPL per chunk (`[1]12.34,[2]...`) goes to
    /// stderr, `PPL = X +/- err` to stdout.
    Perplexity(commands::perplexity::PerplexityArgs),
    /// Describe a checkpoint: architecture, dense vs expert bytes, what fits a budget.
    Inspect(InspectArgs),
    /// Write low-bit copies (q8_0, q4_0) of every routed expert beside the checkpoint, for
    /// mixed-precision replacement on a miss (`precision.policy = "hobbit"`).
    Quantize(commands::quantize::QuantizeArgs),
    /// Replay a routing trace through the configured cache tiers and policies, beside Belady's
    /// optimum.
    Simulate(SimulateArgs),
    /// Train and evaluate routing predictors on traces.
    #[command(subcommand)]
    Predictor(PredictorCommand),
    /// The TOML config file that drives the engine and the simulator.
    Config {
        /// Print the default config, commented.
        #[arg(long, required = true)]
        print_default: bool,
    },
}

/// The whole program: parse `std::env::args`, run the subcommand, map errors to exit status 1.
pub fn main() -> ExitCode {
    // RUST_LOG chooses; without it, warnings, and the server's one line per request.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,stevedore_engine::serve=info"));
    // Spans (a forward pass `step`, each decoder `layer`) print one line when they close, with
    // their busy time: what `RUST_LOG=debug` shows per step and layer. A disabled span costs a
    // callsite check, so the hot path pays nothing when logging is off.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let res = match &cli.command {
        Command::Generate(a) => commands::generate::run(a),
        Command::Serve(a) => crate::serve::run(a),
        Command::Batch(a) => crate::batch::run(a),
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Quantize(a) => commands::quantize::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Perplexity(a) => commands::perplexity::run(a),
        Command::Predictor(c) => predictor_cli::run(c),
        Command::Simulate(a) => sim::run(a).map_err(Into::into),
        Command::Config { .. } => {
            crate::config::print_default();
            Ok(())
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
