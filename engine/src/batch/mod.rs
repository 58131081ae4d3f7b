//! `stevedore batch`: offline generation jobs in OpenAI's Batch API format. Every request of the
//! input (or of this shard of it) is answered exactly once in the output, across kills: results
//! are appended and made durable per finished request, and a rerun of the same command skips what
//! the output already answers (cutting a torn last line first). Requests run as one continuous
//! batch on one engine, so every expert read serves all the queued tokens routed to it.
//! See `docs/batch.md`.

mod input;
mod output;
mod progress;
pub mod shard;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};
use stevedore_models::SeqId;

use crate::api::choice::ChoiceState;
use crate::api::request::ApiModel;
use crate::api::response::{unique_hex, ChoiceResult, Meta, Usage};
use crate::api::ApiError;
use crate::commands::engine_args::EngineArgs;
use crate::commands::CliError;
use crate::engine::{Event, RequestHandle};
use input::{Entry, Refusal};
use output::Results;
use progress::{Figures, Progress};
use shard::Shard;

#[derive(Args, Debug)]
pub struct BatchArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Requests, one a line, in OpenAI's Batch API form (`custom_id`, `method`, `url`, `body`).
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// Results, one a line, in OpenAI's batch output form; appended to, and read on a rerun to
    /// skip what is already answered.
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// Run only shard I of N (by hash of custom_id). Default: from SLURM_ARRAY_TASK_ID /
    /// SLURM_ARRAY_TASK_COUNT, or JOB_COMPLETION_INDEX / STEVEDORE_SHARD_COUNT; else everything.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// Progress as one JSON object a line on stderr instead of a bar.
    #[arg(long)]
    pub json_progress: bool,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// A Jinja chat template file to use instead of the model's own.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
}

/// Set by SIGINT/SIGTERM: stop, keeping what is written.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; `signal`
        // with a valid function pointer and signal number has no other requirement.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// One request in flight: its choices as they arrive.
struct Running {
    meta: Meta,
    choices: Vec<ChoiceState>,
    texts: Vec<String>,
    finish: Vec<Option<&'static str>>,
    failure: Option<String>,
    left: usize,
    /// Dropping them cancels the sequences.
    handles: Vec<RequestHandle>,
}

fn record_id() -> String {
    format!("batch_req_{}", unique_hex())
}

/// The record answering `e` with an error.
fn refusal_record(e: &Entry, r: &Refusal) -> Value {
    match r {
        Refusal::Line(msg) => json!({
            "id": record_id(), "custom_id": e.custom_id, "line": e.line, "response": null,
            "error": {"code": "invalid_request", "message": msg},
        }),
        Refusal::Api(err) => json!({
            "id": record_id(), "custom_id": e.custom_id,
            "response": {"status_code": err.status, "request_id": null, "body": err.body()}, "error": null,
        }),
    }
}

pub fn run(args: &BatchArgs) -> Result<(), CliError> {
    let settings = args.engine.settings()?;
    let shard = match &args.shard {
        Some(s) => Shard::parse(s)?,
        None => Shard::from_env(|k| std::env::var(k).ok())?.unwrap_or(Shard::ALL),
    };
    // The files first: a missing input or output directory is an error before any loading.
    std::fs::metadata(&args.input)
        .map_err(|e| format!("{}: cannot read the input: {e}", args.input.display()))?;
    let mut results = Results::open(&args.output)?;
    let dir = &args.engine.model;
    let loaded = settings.load()?;
    let api = ApiModel::load(dir, args.chat_template.as_deref(), None)?;
    // Checked against the context only: the KV cache is sized for these requests below.
    let info = api.info(loaded.model(), loaded.text(), loaded.model().config.max_positions());
    let entries = input::read(&args.input, &info)?;
    let mine: Vec<Entry> = entries.into_iter().filter(|e| shard.holds(&e.key)).collect();
    let total = mine.len() as u64;
    let todo: Vec<Entry> = mine.into_iter().filter(|e| !results.done.contains(&e.key)).collect();
    let already = total - todo.len() as u64;

    // KV: what the largest `max_batch` sequences need at once, unless given.
    let kv_cache = settings.kv_cache.unwrap_or_else(|| {
        let mut need: Vec<usize> = todo
            .iter()
            .filter_map(|e| e.request.as_ref().ok())
            .flat_map(|p| p.requests().into_iter().map(|r| r.prompt_ids.len() + r.max_new_tokens))
            .collect();
        need.sort_unstable_by(|a, b| b.cmp(a));
        need.truncate(settings.resident());
        settings.default_kv(loaded.kv_bytes_for(need)).max(loaded.kv_bytes_for([1]))
    });
    let engine = settings.start(loaded, kv_cache)?;
    catch_signals();
    let mut progress = Progress::new(total, already, args.json_progress);
    if results.repaired_bytes > 0 {
        progress.println(&format!(
            "{}: cut a torn last line ({} bytes) left by an interrupted run",
            args.output.display(),
            results.repaired_bytes
        ));
    }
    let mut done = already;
    let mut refused = 0u64;
    let mut failed = 0u64;
    let mut runnable = Vec::new();
    for (i, e) in todo.iter().enumerate() {
        match &e.request {
            Ok(_) => runnable.push(i),
            Err(r) => {
                results.append(&refusal_record(e, r))?;
                refused += 1;
                done += 1;
            }
        }
    }

    let (tx, rx) = crossbeam_channel::unbounded::<(SeqId, Event)>();
    let mut running: HashMap<usize, Running> = HashMap::new();
    let mut seq_of: HashMap<SeqId, (usize, usize)> = HashMap::new();
    let mut queue = runnable.into_iter();
    // Enough sequences submitted to refill the batch as sequences finish.
    let window = settings.resident() + settings.max_batch + 8;
    let mut in_flight = 0usize;
    loop {
        while in_flight < window && !INTERRUPTED.load(Ordering::SeqCst) {
            let Some(i) = queue.next() else { break };
            let e = &todo[i];
            let p = e.request.as_ref().expect("runnable");
            let reqs = p.requests();
            let mut handles = Vec::with_capacity(reqs.len());
            let mut refusal = None;
            for (c, req) in reqs.into_iter().enumerate() {
                match engine.submit_to(req, &tx) {
                    Ok(h) => {
                        seq_of.insert(h.id(), (i, c));
                        handles.push(h);
                    }
                    Err(err) => refusal = Some(ApiError::invalid(None, err.to_string())),
                }
            }
            if let Some(err) = refusal {
                for h in &handles {
                    seq_of.remove(&h.id());
                }
                drop(handles);
                results.append(&refusal_record(e, &Refusal::Api(err)))?;
                refused += 1;
                done += 1;
                continue;
            }
            let n = handles.len();
            in_flight += n;
            let model = e.model.clone().unwrap_or_else(|| api.name.clone());
            running.insert(
                i,
                Running {
                    meta: Meta::new(p.endpoint, &model),
                    choices: (0..n).map(|_| ChoiceState::new(&p.stop)).collect(),
                    texts: vec![String::new(); n],
                    finish: vec![None; n],
                    failure: None,
                    left: n,
                    handles,
                },
            );
        }
        if running.is_empty() || INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        let event = match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(x) => Some(x),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        };
        let figures = |done| Figures::of(done, &engine.stats(), progress.seconds());
        let Some((seq, event)) = event else {
            progress.update(&figures(done), false);
            continue;
        };
        let Some(&(i, c)) = seq_of.get(&seq) else { continue };
        let Some(r) = running.get_mut(&i) else { continue };
        let u = r.choices[c].apply(Some(event));
        r.texts[c].push_str(&u.text);
        if u.cancel {
            r.handles[c].cancel();
        }
        let Some(end) = u.end else { continue };
        seq_of.remove(&seq);
        in_flight -= 1;
        match end {
            Ok(reason) => r.finish[c] = Some(reason),
            Err(msg) => {
                r.failure.get_or_insert(msg);
            }
        }
        r.left -= 1;
        if r.left > 0 {
            continue;
        }
        let r = running.remove(&i).expect("present");
        let e = &todo[i];
        let p = e.request.as_ref().expect("runnable");
        let record = match &r.failure {
            Some(msg) => {
                failed += 1;
                let err = ApiError::server(format!("generation failed: {msg}"));
                json!({"id": record_id(), "custom_id": e.custom_id,
                       "response": {"status_code": 500, "request_id": r.meta.id, "body": err.body()}, "error": null})
            }
            None => {
                let choices: Vec<ChoiceResult> = (0..r.choices.len())
                    .map(|c| ChoiceResult {
                        index: c,
                        text: format!("{}{}", p.echo[c / p.n], r.texts[c]),
                        finish_reason: r.finish[c].expect("ended"),
                    })
                    .collect();
                let usage = Usage {
                    prompt_tokens: p.prompt_tokens(),
                    completion_tokens: r.choices.iter().map(|c| c.tokens).sum(),
                };
                json!({"id": record_id(), "custom_id": e.custom_id,
                       "response": {"status_code": 200, "request_id": r.meta.id, "body": r.meta.body(&choices, usage)},
                       "error": null})
            }
        };
        results.append(&record)?;
        done += 1;
        progress.update(&figures(done), false);
    }
    drop(running); // cancels whatever still runs
    let interrupted = INTERRUPTED.load(Ordering::SeqCst) && done < total;
    let stats = engine.stats();
    let seconds = progress.seconds();
    progress.update(&Figures::of(done, &stats, seconds), true);
    progress.finish();
    let summary = summary(&stats, total, already, done, refused, failed, seconds);
    engine.finish()?;
    if args.json {
        println!("{summary}");
    } else {
        eprintln!(
            "{done} of {total} requests answered ({already} by earlier runs, {refused} refused, {failed} failed); \
             {} tokens in {seconds:.1} s ({:.2} tok/s); {:.1} sequences and {:.1} distinct experts per layer per \
             forward pass ({:.1} in decode passes); {:.0} MiB read per token; {:.1} s stalled on reads",
            summary["generated_tokens"],
            summary["tokens_per_s"].as_f64().unwrap_or(0.0),
            summary["sequences_per_pass"].as_f64().unwrap_or(0.0),
            summary["experts_per_layer_pass"].as_f64().unwrap_or(0.0),
            summary["experts_per_layer_decode_pass"].as_f64().unwrap_or(0.0),
            summary["bytes_read_per_token"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
            stats.expert_cache.stall_seconds,
        );
    }
    if interrupted {
        return Err(format!(
            "interrupted: {done} of {total} requests answered in {}; run the same command again to resume",
            args.output.display()
        )
        .into());
    }
    Ok(())
}

fn summary(
    s: &crate::engine::EngineStats,
    total: u64,
    already: u64,
    done: u64,
    refused: u64,
    failed: u64,
    seconds: f64,
) -> Value {
    let st = &s.steps;
    let tokens = st.generated_tokens;
    json!({
        "requests": total, "answered": done, "answered_before": already, "refused": refused, "failed": failed,
        "generated_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens as f64 / seconds.max(1e-9),
        "forward_passes": st.steps,
        "sequences_per_pass": st.batch_sizes_sum as f64 / (st.steps as f64).max(1.0),
        "experts_per_layer_pass": st.layer_experts as f64 / (st.layer_steps as f64).max(1.0),
        "experts_per_layer_decode_pass": st.decode_layer_experts as f64 / (st.decode_layer_steps as f64).max(1.0),
        "bytes_read_per_token": s.expert_cache.bytes_read as f64 / (tokens as f64).max(1.0),
        "stall_seconds": s.expert_cache.stall_seconds,
        "expert_cache": s.expert_cache,
        "peak_rss_bytes": crate::sys::peak_rss_bytes(),
    })
}
