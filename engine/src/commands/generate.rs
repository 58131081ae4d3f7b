//! `stevedore generate`: load a model, stream its experts through the host cache, generate.
//!
//! Settings come from the config file (`--config`, `docs/config.md`) or its defaults; the
//! `--host-cache` and `--policy` flags override it. With the `predictive` policy a
//! [`Prefetcher`] steers the store with the configured routing predictor.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;
use stevedore_models::Experts;
use tokenizers::Tokenizer;

use super::{load_model, parse_size, CliError};
use crate::config::{Config, PolicyName, Split};
use crate::generate::{check_context, generate, kv_positions, GenerateRequest};
use crate::prefetch::{routing_shape, Prefetcher};
use crate::record::RoutingRecorder;
use crate::sampling::SamplingParams;
use crate::size::{human, Size};
use crate::store::{ExpertStore, StoreError, StoreOptions};
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
    /// Default: the config's `tiers.host.budget` with `--config`; without it, what available
    /// memory allows after dense weights and the KV cache.
    #[arg(long, value_parser = parse_size)]
    pub host_cache: Option<Size>,
    /// Config file (TOML, `stevedore config --print-default`): cache budget, policy, predictor.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Expert cache policy: `lru`, `lfu` or `predictive` (LRU order, steered by a routing
    /// predictor: experts predicted for the next layers are protected and prefetched).
    /// Default: the config's `cache.policy` (`predictive` unless the file says otherwise);
    /// without `--config`, `lru`: prefetching reads more bytes in all, which costs decode speed
    /// where disk reads are the bottleneck, so it is something to turn on and tune.
    #[arg(long, value_parser = parse_policy)]
    pub policy: Option<PolicyName>,
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

/// The policy without `--config` or `--policy`. Not the config file's default (`predictive`):
/// its prefetches add reads, and on a disk-bound decode every extra byte costs time (on a
/// random-routing 32-expert model at 25%, the default predictive settings read 1.3x LRU's
/// bytes and decoded 1.3x slower), so the engine prefetches only when asked to.
const NO_CONFIG_POLICY: PolicyName = PolicyName::Lru;

fn parse_policy(s: &str) -> Result<PolicyName, String> {
    PolicyName::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| {
        let names: Vec<_> = PolicyName::ALL.iter().map(|p| p.as_str()).collect();
        format!("`{s}` is not a policy (expected one of: {})", names.join(", "))
    })
}

/// Refuses what the config file asks for that the live engine cannot do yet, naming the key.
fn check_live(cfg: &Config, path: &Path) -> Result<(), CliError> {
    if cfg.cache.split != Split::Shared {
        return Err(format!(
            "{}: cache.split = \"per-layer\" is not supported by `stevedore generate` yet (only by \
             `stevedore simulate`); use \"shared\"",
            path.display()
        )
        .into());
    }
    Ok(())
}

fn load_tokenizer(dir: &Path) -> Result<Tokenizer, CliError> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(format!(
            "{}: not found; --prompt needs a tokenizer (or pass --prompt-ids)",
            path.display()
        )
        .into());
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
            tok.encode(text.as_str(), true)
                .map_err(|e| format!("cannot tokenize the prompt: {e}"))?
                .get_ids()
                .to_vec()
        }
        (None, Some(ids)) => ids.clone(),
        (None, None) => unreachable!("clap requires one of --prompt, --prompt-ids"),
    };
    let req = GenerateRequest {
        prompt_ids,
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
    };

    let config = match &args.config {
        Some(path) => {
            let cfg = Config::load(path)?;
            check_live(&cfg, path)?;
            Some(cfg)
        }
        None => None,
    };
    // Without a file, the defaults it would spell out (`stevedore config --print-default`).
    let settings = config.clone().unwrap_or_default();
    let in_config = |msg: String| match &args.config {
        Some(path) => format!("{}: {msg}", path.display()),
        None => msg,
    };

    let fp = ExpertStore::footprint(&model.index, &model.config)?;
    check_context(&model, &req)?;
    let kv_bytes = KvCache::bytes_for(&model.config, kv_positions(&req));
    let budget = match (args.host_cache, &config) {
        (Some(size), _) => size.bytes(fp.total_bytes),
        (None, Some(cfg)) => cfg.tiers.host.budget.bytes(fp.total_bytes),
        (None, None) => {
            let avail = crate::sys::available_memory_bytes()
                .ok_or("cannot read MemAvailable from /proc/meminfo; pass --host-cache")?;
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
    let policy = args.policy.unwrap_or(match &config {
        Some(cfg) => cfg.cache.policy,
        None => NO_CONFIG_POLICY,
    });
    let mut store = ExpertStore::new(
        &model.index,
        &model.config,
        budget,
        stevedore_cache::policy::by_name(policy.as_str()).expect("every PolicyName names a policy"),
        StoreOptions { force_buffered: args.buffered_io, ..StoreOptions::default() },
    )
    .map_err(|e| match e {
        StoreError::BudgetTooSmall { .. } if args.host_cache.is_none() => {
            in_config(format!("tiers.host.budget: {e}")).into()
        }
        e => CliError::from(e),
    })?;
    let steering = match policy {
        PolicyName::Predictive => {
            let p = &settings.predictor;
            let shape = routing_shape(&model.config);
            let predictor = p.source()?.build(shape).map_err(in_config)?;
            store.set_lookahead(p.lookahead_params(shape), p.prefetch_budget.bytes(budget));
            Some((predictor, p.depth.of(shape.num_layers)))
        }
        PolicyName::Lru | PolicyName::Lfu => None,
    };
    let prefetcher = match steering {
        Some((predictor, depth)) => Some(Prefetcher::new(&store, &model.config, predictor, depth)?),
        None => None,
    };
    let experts: &dyn Experts = match &prefetcher {
        Some(p) => p,
        None => &store,
    };

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
        Some(path) => Some(RoutingRecorder::create(path, &model_name, &model.config, experts)?),
        None => None,
    };
    let out = generate(&model, experts, recorder.as_ref(), &req, &mut on_token)?;
    if let Some(r) = recorder {
        r.finish()?;
    }
    if let Some(e) = stream_err {
        return Err(format!("writing to stdout: {e}").into());
    }
    let text = match &tokenizer {
        Some(tok) => {
            Some(tok.decode(&out.generated_ids, true).map_err(|e| format!("cannot decode the output: {e}"))?)
        }
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
                "prefetcher": prefetcher.as_ref().map(Prefetcher::stats),
            }
        });
        println!("{v}");
    } else {
        println!();
        eprintln!(
            "prefill {:.1} tok/s, decode {:.2} tok/s; expert cache {} {} budget, peak {}, {} hits, {} misses, \
             {} prefetched ({} used), {} read ({}), peak RSS {}",
            out.prefill_tokens_per_s(req.prompt_ids.len()),
            out.decode_tokens_per_s(),
            stats.policy,
            human(stats.budget_bytes),
            human(stats.peak_bytes),
            stats.hits,
            stats.misses,
            stats.prefetch_reads,
            stats.prefetch_hits,
            human(stats.bytes_read),
            if stats.direct_io { "O_DIRECT" } else { "buffered" },
            peak_rss.map(human).unwrap_or_else(|| "unknown".into()),
        );
    }
    Ok(())
}
