//! `stevedore generate`: load a model, stream its experts through the host cache, generate.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;
use stevedore_cache::LruPolicy;
use tokenizers::Tokenizer;

use super::{load_model, parse_size, CliError};
use crate::generate::{generate, kv_positions, GenerateRequest};
use crate::record::RoutingRecorder;
use crate::sampling::SamplingParams;
use crate::size::{human, Size};
use crate::store::{ExpertStore, StoreOptions};
use stevedore_models::KvCache;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt text (needs tokenizer.json in the model directory).
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Host-RAM expert cache budget: `512MiB`, `2GiB`, or `25%` of the model's expert bytes.
    /// Default: what available memory allows after dense weights and the KV cache.
    #[arg(long, value_parser = parse_size)]
    pub host_cache: Option<Size>,
    /// Read experts through the page cache instead of O_DIRECT.
    #[arg(long)]
    pub buffered_io: bool,
    /// Record every token's routing (experts and gate weights per MoE layer) to this trace file.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Print one JSON object (ids, text, stats) instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

/// Memory kept free for the OS and everything else when the budget is automatic.
const AUTO_RESERVE: u64 = 1 << 30;

fn load_tokenizer(dir: &Path) -> Result<Tokenizer, CliError> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(format!("{}: not found; --prompt needs a tokenizer (or pass --prompt-ids)", path.display()).into());
    }
    Tokenizer::from_file(&path).map_err(|e| format!("{}: cannot load tokenizer: {e}", path.display()).into())
}

pub fn run(args: &GenerateArgs) -> Result<(), CliError> {
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        return Err(format!("--top-p must be in (0, 1], got {}", args.top_p).into());
    }
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        return Err(format!("--temperature must be >= 0, got {}", args.temperature).into());
    }
    let model = load_model(&args.model)?;
    let tokenizer = match (&args.prompt, args.model.join("tokenizer.json").exists()) {
        (Some(_), _) | (None, true) => Some(load_tokenizer(&args.model)?),
        (None, false) => None,
    };
    let prompt_ids = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) => {
            let tok = tokenizer.as_ref().expect("loaded above");
            tok.encode(text.as_str(), true).map_err(|e| format!("cannot tokenize the prompt: {e}"))?.get_ids().to_vec()
        }
        (None, Some(ids)) => ids.clone(),
        (None, None) => unreachable!("clap requires one of --prompt, --prompt-ids"),
    };
    let req = GenerateRequest {
        prompt_ids,
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed },
    };

    let fp = ExpertStore::footprint(&model.index, &model.config)?;
    let kv_bytes = KvCache::bytes_for(&model.config, kv_positions(&req));
    let budget = match args.host_cache {
        Some(size) => size.bytes(fp.total_bytes),
        None => {
            let avail = crate::sys::available_memory_bytes().ok_or("cannot read MemAvailable from /proc/meminfo; pass --host-cache")?;
            let room = avail.saturating_sub(model.dense_bytes() + kv_bytes + AUTO_RESERVE);
            let budget = room.min(fp.total_bytes).max(fp.min_budget);
            eprintln!(
                "host cache: {} automatic (available {} - dense {} - KV {} - reserve {}; experts total {})",
                human(budget),
                human(avail),
                human(model.dense_bytes()),
                human(kv_bytes),
                human(AUTO_RESERVE),
                human(fp.total_bytes)
            );
            budget
        }
    };
    let store = ExpertStore::new(
        &model.index,
        &model.config,
        budget,
        Box::new(LruPolicy::new()),
        StoreOptions { force_buffered: args.buffered_io, ..StoreOptions::default() },
    )?;

    let mut stdout = std::io::stdout().lock();
    let mut printed = String::new();
    let mut so_far: Vec<u32> = Vec::new();
    let stream = !args.json;
    let mut stream_err = None;
    let mut on_token = |id: u32| {
        if !stream {
            return;
        }
        so_far.push(id);
        let res = match &tokenizer {
            // Print what the decoded text gained, holding back an incomplete UTF-8 sequence.
            Some(tok) => match tok.decode(&so_far, true) {
                Ok(text) if !text.ends_with('\u{FFFD}') && text.starts_with(&printed) => {
                    let new = text[printed.len()..].to_owned();
                    printed = text;
                    write!(stdout, "{new}").and_then(|_| stdout.flush())
                }
                _ => Ok(()),
            },
            None => write!(stdout, "{id} ").and_then(|_| stdout.flush()),
        };
        if let Err(e) = res {
            stream_err.get_or_insert(e);
        }
    };
    let model_name = args.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let recorder = match &args.trace {
        Some(path) => Some(RoutingRecorder::create(path, &model_name, &model.config, &store)?),
        None => None,
    };
    let out = generate(&model, &store, recorder.as_ref(), &req, &mut on_token)?;
    if let Some(r) = recorder {
        r.finish()?;
    }
    if let Some(e) = stream_err {
        return Err(format!("writing to stdout: {e}").into());
    }
    let text = match &tokenizer {
        Some(tok) => Some(tok.decode(&out.generated_ids, true).map_err(|e| format!("cannot decode the output: {e}"))?),
        None => None,
    };
    let stats = store.stats();
    let peak_rss = crate::sys::peak_rss_bytes();
    if args.json {
        let v = json!({
            "prompt_ids": req.prompt_ids,
            "generated_ids": out.generated_ids,
            "text": text,
            "stats": {
                "prompt_tokens": req.prompt_ids.len(),
                "generated_tokens": out.generated_ids.len(),
                "prefill_seconds": out.prefill_seconds,
                "decode_seconds": out.decode_seconds,
                "prefill_tokens_per_s": out.prefill_tokens_per_s(req.prompt_ids.len()),
                "decode_tokens_per_s": out.decode_tokens_per_s(),
                "peak_rss_bytes": peak_rss,
                "dense_bytes": model.dense_bytes(),
                "kv_cache_bytes": kv_bytes,
                "expert_cache": stats,
            }
        });
        println!("{v}");
    } else {
        println!();
        eprintln!(
            "prefill {:.1} tok/s, decode {:.2} tok/s; expert cache {} budget, peak {}, {} hits, {} misses, {} read ({}), peak RSS {}",
            out.prefill_tokens_per_s(req.prompt_ids.len()),
            out.decode_tokens_per_s(),
            human(stats.budget_bytes),
            human(stats.peak_bytes),
            stats.hits,
            stats.misses,
            human(stats.bytes_read),
            if stats.direct_io { "O_DIRECT" } else { "buffered" },
            peak_rss.map(human).unwrap_or_else(|| "unknown".into()),
        );
    }
    Ok(())
}
