//! `stevedore generate`: one prompt, streamed as it is generated, or a file of prompts
//! (`--batch`) run together as one continuous batch.
//!
//! The command turns flags and the config file (`--config`, `docs/config.md`) into an
//! [`EngineConfig`] and calls the [`Engine`]; everything else happens there.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::{json, Value};
use stevedore_models::SeqId;

use super::engine_args::EngineArgs;
use super::CliError;
use crate::engine::{Completion, Engine, EngineError, EngineStats, Event, Loaded, Request};
use crate::sampling::SamplingParams;
use crate::size::human;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Prompt text (needs tokenizer.json in the model directory).
    #[arg(long, conflicts_with_all = ["prompt_ids", "batch"], required_unless_present_any = ["prompt_ids", "batch"])]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',', conflicts_with = "batch")]
    pub prompt_ids: Option<Vec<u32>>,
    /// A JSONL file of requests, one a line: `{"prompt": "..."}` or `{"prompt_ids": [..]}`, with
    /// an optional `max_new_tokens`. All run together as one continuous batch.
    #[arg(long, value_name = "FILE")]
    pub batch: Option<PathBuf>,
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
    /// Print one JSON object (ids, text, stats) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Time each operation of the forward pass (`stats.profile`; a table on stderr).
    #[arg(long)]
    pub profile: bool,
}

/// One request of the run, with the line of `--batch` it came from.
struct Job {
    line: Option<usize>,
    req: Request,
}

/// Reads `--batch`: one JSON object a line (blank lines skipped); errors name file and line.
fn read_batch(
    path: &Path,
    loaded: &Loaded,
    max_new_tokens: usize,
    sampling: &SamplingParams,
) -> Result<Vec<Job>, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut jobs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let at = |msg: String| format!("{}:{n}: {msg}", path.display());
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Line {
            prompt: Option<String>,
            prompt_ids: Option<Vec<u32>>,
            max_new_tokens: Option<usize>,
        }
        let l: Line = serde_json::from_str(line).map_err(|e| at(format!("not a request: {e}")))?;
        let prompt_ids = match (l.prompt, l.prompt_ids) {
            (Some(p), None) => {
                let t = loaded.text().ok_or_else(|| {
                    at("`prompt` needs tokenizer.json in the model directory; use `prompt_ids`".into())
                })?;
                t.encode(&p).map_err(at)?
            }
            (None, Some(ids)) => ids,
            _ => return Err(at("give exactly one of `prompt` and `prompt_ids`".into()).into()),
        };
        let max_new_tokens = l.max_new_tokens.unwrap_or(max_new_tokens);
        jobs.push(Job {
            line: Some(n),
            req: Request { prompt_ids, max_new_tokens, sampling: sampling.clone(), prompt_logprobs: false },
        });
    }
    if jobs.is_empty() {
        return Err(format!("{}: no requests", path.display()).into());
    }
    Ok(jobs)
}

fn load_prompt(args: &GenerateArgs, loaded: &Loaded) -> Result<Vec<u32>, CliError> {
    match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) => match loaded.text() {
            Some(t) => Ok(t.encode(text)?),
            None => Err(format!(
                "{}: not found; --prompt needs a tokenizer (or pass --prompt-ids)",
                args.engine.model.join("tokenizer.json").display()
            )
            .into()),
        },
        (None, Some(ids)) => Ok(ids.clone()),
        (None, None) => unreachable!("clap requires one of --prompt, --prompt-ids, --batch"),
    }
}

pub fn run(args: &GenerateArgs) -> Result<(), CliError> {
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        return Err(format!("--top-p must be in (0, 1], got {}", args.top_p).into());
    }
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        return Err(format!("--temperature must be >= 0, got {}", args.temperature).into());
    }
    let settings = args.engine.settings()?;
    stevedore_models::profile::enable(args.profile);
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };

    let loaded = settings.load()?;
    let jobs = match &args.batch {
        Some(path) => read_batch(path, &loaded, args.max_new_tokens, &sampling)?,
        None => {
            let prompt_ids = load_prompt(args, &loaded)?;
            let req =
                Request { prompt_ids, max_new_tokens: args.max_new_tokens, sampling, prompt_logprobs: false };
            loaded.check(&req)?;
            vec![Job { line: None, req }]
        }
    };
    // KV: what the largest `max_batch` requests need at once, unless given.
    let kv_cache = settings.kv_cache.unwrap_or_else(|| {
        let limit = loaded.model().config.max_positions();
        let mut need: Vec<usize> = jobs
            .iter()
            .map(|j| (j.req.prompt_ids.len().saturating_add(j.req.max_new_tokens)).min(limit))
            .collect();
        need.sort_unstable_by(|a, b| b.cmp(a));
        settings.default_kv(loaded.kv_bytes_for(need.into_iter().take(settings.resident())))
    });
    let engine = settings.start(loaded, kv_cache)?;
    match args.batch {
        Some(_) => run_batch(args, engine, jobs),
        None => run_one(args, engine, jobs.into_iter().next().expect("one job").req),
    }
}

/// The stats every run reports.
pub(super) fn stats_json(engine_stats: &EngineStats, dense_bytes: u64) -> Value {
    json!({
        "peak_rss_bytes": crate::sys::peak_rss_bytes(),
        "dense_bytes": dense_bytes,
        "kv_cache_bytes": engine_stats.budgets.kv_cache,
        "steps": engine_stats.steps,
        "expert_cache": engine_stats.expert_cache,
        "forecast": engine_stats.forecast,
        "horizon": engine_stats.horizon,
        "profile": stevedore_models::profile::enabled().then(stevedore_models::profile::snapshot),
    })
}

fn run_one(args: &GenerateArgs, engine: Engine, req: Request) -> Result<(), CliError> {
    let prompt_ids = req.prompt_ids.clone();
    let handle = engine.submit(req)?;
    let mut stdout = std::io::stdout().lock();
    let mut write_err = None;
    let mut write = |s: &str| {
        if let Err(e) = write!(stdout, "{s}").and_then(|_| stdout.flush()) {
            write_err.get_or_insert(e);
        }
    };
    let stream = !args.json;
    let has_text = engine.text().is_some();
    let mut done: Option<Completion> = None;
    for event in handle.events().expect("own channel").iter() {
        match event {
            Event::Token { id, text } if stream => write(&if has_text { text } else { format!("{id} ") }),
            Event::Token { .. } => {}
            Event::Finished(c) => {
                if stream {
                    write(&c.tail);
                }
                done = Some(c);
                break;
            }
            Event::Failed(msg) => return Err(msg.into()),
        }
    }
    let c = done.ok_or(EngineError::Stopped)?;
    if let Some(e) = write_err {
        return Err(format!("writing to stdout: {e}").into());
    }
    let dense = engine.model().dense_bytes();
    let stats = engine.finish()?;
    let mut s = stats_json(&stats, dense);
    let extra = json!({
        "prompt_tokens": c.prompt_tokens,
        "generated_tokens": c.generated_ids.len(),
        "finish_reason": c.finish_reason,
        "prefill_seconds": c.prefill_seconds,
        "decode_seconds": c.decode_seconds,
        "prefill_tokens_per_s": c.prefill_tokens_per_s(),
        "decode_tokens_per_s": c.decode_tokens_per_s(),
    });
    merge(&mut s, extra);
    if args.json {
        println!(
            "{}",
            json!({"prompt_ids": prompt_ids, "generated_ids": c.generated_ids, "text": c.text, "stats": s})
        );
    } else {
        println!();
        let cache = &stats.expert_cache;
        eprintln!(
            "prefill {:.1} tok/s, decode {:.2} tok/s; expert cache {} {} budget, peak {}, {} hits, {} misses, \
             {} prefetched ({} used), {} read ({}), peak RSS {}",
            c.prefill_tokens_per_s(),
            c.decode_tokens_per_s(),
            cache.policy,
            human(cache.budget_bytes),
            human(cache.peak_bytes),
            cache.hits,
            cache.misses,
            cache.prefetch_reads,
            cache.prefetch_hits,
            human(cache.bytes_read),
            if cache.direct_io { "O_DIRECT" } else { "buffered" },
            crate::sys::peak_rss_bytes().map(human).unwrap_or_else(|| "unknown".into()),
        );
        let p = &cache.precision;
        if let Some(low) = p.low_format {
            eprintln!(
                "precision {}: full {} hits, {} misses, {} read; {} {} hits, {} misses, {} read; {} skipped",
                p.policy,
                p.full_hits,
                p.full_misses,
                human(p.full_bytes_read),
                low.to_ascii_lowercase(),
                p.low_hits,
                p.low_misses,
                human(p.low_bytes_read),
                p.skipped
            );
        }
        if args.profile {
            let ops = stevedore_models::profile::snapshot();
            let tokens = stats.steps.steps as f64;
            eprintln!("{}", super::bench::profile_table("profile (per forward pass)", &ops, tokens));
        }
        if cache.warm_fills > 0 {
            let took = match cache.warm_fill_seconds {
                Some(s) => {
                    format!("in {s:.1} s ({}/s)", human((cache.warm_bytes as f64 / s.max(1e-9)) as u64))
                }
                None => format!("{} of them read by the end", cache.warm_reads),
            };
            eprintln!("warm start: {} experts ({}) {took}", cache.warm_fills, human(cache.warm_bytes));
        }
    }
    Ok(())
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

fn run_batch(args: &GenerateArgs, engine: Engine, jobs: Vec<Job>) -> Result<(), CliError> {
    let t0 = std::time::Instant::now();
    let (tx, rx) = crossbeam_channel::unbounded::<(SeqId, Event)>();
    // Kept until the end: dropping a handle cancels its request.
    let mut handles = Vec::with_capacity(jobs.len());
    let mut by_id = std::collections::HashMap::new();
    let mut results: Vec<Option<Result<Completion, String>>> = vec![None; jobs.len()];
    for (i, job) in jobs.iter().enumerate() {
        match engine.submit_to(job.req.clone(), &tx) {
            Ok(h) => {
                by_id.insert(h.id(), i);
                handles.push(h);
            }
            Err(e) => results[i] = Some(Err(e.to_string())),
        }
    }
    drop(tx);
    let mut stdout = std::io::stdout().lock();
    let mut print = |i: usize, r: &Result<Completion, String>| -> Result<(), CliError> {
        if args.json {
            return Ok(());
        }
        let line = jobs[i].line.expect("batch jobs carry their line");
        let out = match r {
            Ok(c) => match &c.text {
                Some(t) => serde_json::to_string(t).expect("a string serialises"),
                None => format!("{:?}", c.generated_ids),
            },
            Err(msg) => format!("error: {msg}"),
        };
        writeln!(stdout, "[line {line}] {out}").map_err(|e| format!("writing to stdout: {e}").into())
    };
    for (i, r) in results.iter().enumerate() {
        if let Some(r) = r {
            print(i, r)?;
        }
    }
    let mut left = by_id.len();
    for (id, event) in rx.iter() {
        if left == 0 {
            break;
        }
        let i = by_id[&id];
        let r = match event {
            Event::Token { .. } => continue,
            Event::Failed(msg) => Err(msg),
            Event::Finished(c) => Ok(c),
        };
        print(i, &r)?;
        results[i] = Some(r);
        left -= 1;
        if left == 0 {
            break;
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    drop(handles);
    let dense = engine.model().dense_bytes();
    let stats = engine.finish()?;
    let results: Vec<Result<Completion, String>> =
        results.into_iter().map(|r| r.unwrap_or_else(|| Err(EngineError::Stopped.to_string()))).collect();
    let done: Vec<&Completion> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let failed = results.len() - done.len();
    let generated: usize = done.iter().map(|c| c.generated_ids.len()).sum();
    let mut s = stats_json(&stats, dense);
    merge(
        &mut s,
        json!({
            "requests": results.len(),
            "failed_requests": failed,
            "prompt_tokens": done.iter().map(|c| c.prompt_tokens).sum::<usize>(),
            "generated_tokens": generated,
            "wall_seconds": wall,
            "generated_tokens_per_s": generated as f64 / wall.max(1e-9),
        }),
    );
    if args.json {
        let results: Vec<Value> = jobs
            .iter()
            .zip(&results)
            .map(|(j, r)| match r {
                Ok(c) => {
                    json!({"line": j.line, "prompt_ids": j.req.prompt_ids, "generated_ids": c.generated_ids,
                                "text": c.text, "finish_reason": c.finish_reason})
                }
                Err(msg) => json!({"line": j.line, "prompt_ids": j.req.prompt_ids, "error": msg}),
            })
            .collect();
        println!("{}", json!({"results": results, "stats": s}));
    } else {
        eprintln!(
            "{} requests ({failed} failed), {generated} tokens in {wall:.1} s ({:.2} tok/s), {} forward passes, \
             up to {} sequences at once",
            results.len(),
            generated as f64 / wall.max(1e-9),
            stats.steps.steps,
            stats.steps.max_batch_seen
        );
    }
    if failed > 0 {
        return Err(format!("{failed} of {} requests failed (see their lines above)", results.len()).into());
    }
    Ok(())
}
