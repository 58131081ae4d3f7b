//! Server load benchmark: on the end-to-end benchmark's random checkpoint at a host-cache budget,
//! starts `stevedore serve` afresh for each concurrency (1, 8, 32 streaming clients by default,
//! page cache dropped first), has every client send streaming completions one after another, and
//! reports total generated tokens/s, time to first token and inter-token latency (p50/p99),
//! sequences per forward pass and expert bytes read per token. Bar: 8 clients reach 4x the
//! tokens/s of one. See bench/README.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::json;
use stevedore_bench::checkpoint::{Plan, Shape, SplitMix64};
use stevedore_bench::load::{self, Level, ServerProcess};
use stevedore_bench::probe;
use stevedore_bench::setup::{self, SHAPE_USAGE};

const USAGE: &str = "\
usage: serve-load [options]
  --dir DIR               write the checkpoint here (reused when it holds the same one)
  --keep                  keep the checkpoint afterwards
  --bin PATH              the stevedore binary (default: `stevedore` next to this executable)
  --clients LIST          concurrent streaming clients, one server run each (default 1,8,32)
  --requests-per-client N requests each client sends one after another (default 2)
  --max-tokens N          new tokens per request (default 64)
  --prompt-tokens N       random prompt ids per request, different for every request (default 16)
  --host-cache SIZE       the server's expert cache budget (default 25%)
  --json-out FILE         also write every number as JSON
  --threads N             threads for writing the checkpoint (default: all cores)
Exit status: 0 when the bar passes (8 clients >= 4x one, when both ran), 1 when not, 2 on error.";

struct Args {
    dir: Option<PathBuf>,
    keep: bool,
    bin: Option<PathBuf>,
    clients: Vec<usize>,
    per_client: usize,
    max_tokens: usize,
    prompt_tokens: usize,
    host_cache: String,
    json_out: Option<PathBuf>,
    threads: usize,
    shape: Shape,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        dir: None,
        keep: false,
        bin: None,
        clients: vec![1, 8, 32],
        per_client: 2,
        max_tokens: 64,
        prompt_tokens: 16,
        host_cache: "25%".into(),
        json_out: None,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        shape: Shape::default(),
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let mut num = || setup::positive(&flag, &value()?);
        match flag.as_str() {
            "--dir" => a.dir = Some(value()?.into()),
            "--keep" => a.keep = true,
            "--bin" => a.bin = Some(value()?.into()),
            "--clients" => a.clients = setup::positive_list(&flag, &value()?)?,
            "--requests-per-client" => a.per_client = num()?,
            "--max-tokens" => a.max_tokens = num()?,
            "--prompt-tokens" => a.prompt_tokens = num()?,
            "--host-cache" => a.host_cache = value()?,
            "--json-out" => a.json_out = Some(value()?.into()),
            "--threads" => a.threads = num()?,
            "-h" | "--help" => return Err(format!("{USAGE}\n{SHAPE_USAGE}")),
            other => match setup::shape_field(&mut a.shape, other) {
                Some(field) => *field = num()?,
                None => return Err(format!("unknown argument `{other}`\n{USAGE}\n{SHAPE_USAGE}")),
            },
        }
    }
    Ok(a)
}

fn log(m: &str) {
    eprintln!("[serve-load] {m}");
}

fn main() -> ExitCode {
    setup::main("serve-load", parse_args, |a| run(&a))
}

/// A word-level tokenizer over the checkpoint's vocabulary (`w0`, `w1`, ...), so that every
/// token streams as text and each chunk can be timed.
fn tokenizer_json(vocab: usize) -> String {
    let words: serde_json::Map<String, serde_json::Value> =
        (0..vocab).map(|i| (format!("w{i}"), json!(i))).collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "w0"},
    })
    .to_string()
}

fn run(args: &Args) -> Result<bool, String> {
    let command = setup::command_line("serve-load");
    let plan = Plan::new(args.shape.clone())?;
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => setup::default_bin()?,
    };
    setup::check_bin(&bin)?;
    let checkpoint =
        setup::prepare_checkpoint(&plan, args.dir.as_deref(), args.keep, args.threads, "serve", &log)?;
    let dir = checkpoint.dir().to_owned();
    let tokenizer = dir.join("tokenizer.json");
    std::fs::write(&tokenizer, tokenizer_json(plan.shape.vocab_size))
        .map_err(|e| format!("{}: {e}", tokenizer.display()))?;
    struct RemoveOnDrop(PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _tokenizer = RemoveOnDrop(tokenizer);

    let mut rng = SplitMix64(1);
    let most = args.clients.iter().max().copied().unwrap_or(1) * args.per_client;
    let prompts: Vec<Vec<u32>> = (0..most)
        .map(|_| (0..args.prompt_tokens).map(|_| rng.below(plan.shape.vocab_size) as u32).collect())
        .collect();
    let mut levels: Vec<Level> = Vec::new();
    for &clients in &args.clients {
        probe::evict_from_page_cache(&checkpoint.shard_paths())?;
        let server_args: Vec<String> = [
            "--model",
            &dir.display().to_string(),
            "--host-cache",
            &args.host_cache,
            "--policy",
            "lru",
            "--max-batch",
            &clients.to_string(),
            "--kv-cache",
            "512MiB",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let server = ServerProcess::start(&bin, &server_args)?;
        log(&format!("{clients} clients x {} requests against {}", args.per_client, server.base));
        let agent: ureq::Agent =
            ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(3600))).build().into();
        let epoch = Instant::now();
        let timings: Vec<load::Timing> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..clients)
                .map(|c| {
                    let (agent, base, prompts) = (&agent, &server.base, &prompts);
                    s.spawn(move || {
                        (0..args.per_client)
                            .map(|r| {
                                load::stream_once(
                                    agent,
                                    base,
                                    &prompts[c * args.per_client + r],
                                    args.max_tokens,
                                    epoch,
                                )
                            })
                            .collect::<Result<Vec<_>, String>>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("client thread")).collect::<Result<Vec<_>, _>>()
        })?
        .into_iter()
        .flatten()
        .collect();
        let metrics = agent
            .get(&format!("{}/metrics", server.base))
            .call()
            .and_then(|mut r| r.body_mut().read_to_string())
            .map_err(|e| format!("/metrics: {e}"))?;
        drop(server);
        let level = Level::of(clients, &timings, &metrics);
        log(&format!(
            "{clients} clients: {:.2} tok/s, TTFT p50 {:.0} ms, ITL p50 {:.0} ms, {:.1} sequences/pass",
            level.tokens_per_s,
            level.ttft_p50 * 1e3,
            level.itl_p50 * 1e3,
            level.sequences_per_pass
        ));
        levels.push(level);
    }
    let one = levels.iter().find(|l| l.clients == 1).map(|l| l.tokens_per_s);
    for l in &mut levels {
        l.x_one = one.map_or(0.0, |o| l.tokens_per_s / o);
    }
    let eight = levels.iter().find(|l| l.clients == 8).map(|l| l.x_one);
    let pass = eight.is_none_or(|x| one.is_none() || x >= 4.0);
    println!("`{command}` ({})\n", setup::git_commit().unwrap_or_else(|| "unknown commit".into()));
    print!("{}", load::markdown(&levels));
    if let Some(x) = eight {
        println!(
            "\n8 clients: {x:.2}x the tokens/s of one (bar: 4x): {}",
            if pass { "pass" } else { "FAIL" }
        );
    }
    if let Some(path) = &args.json_out {
        let v =
            json!({"command": command, "host_cache": args.host_cache, "shape": plan.shape, "levels": levels});
        std::fs::write(path, serde_json::to_string_pretty(&v).expect("serialises"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(pass)
}
