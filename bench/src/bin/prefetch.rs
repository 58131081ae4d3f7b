//! Prediction against LRU, live: for each model and host-cache budget, `stevedore generate`
//! with LRU, and the predictive policy steered by the transition statistics alone, by next-gate
//! estimates alone, and by both blended (the default config); all in one run, each policy on
//! the same prompt. Beside them,
//! Belady's demand-only hit rate on the LRU run's recorded trace (`stevedore simulate`), and
//! the bound on time per token: max(compute time, bytes read / disk bandwidth), with the
//! compute time measured with every expert resident and the disk bandwidth each run's own
//! (bytes read over the time a read was in flight). See bench/README.md.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use serde_json::{json, Value};
use stevedore_bench::setup;

const USAGE: &str = "\
usage: prefetch --model DIR [--model DIR ...] [options]
  --budgets LIST       host-cache budgets (default 25%,50%)
  --max-new-tokens N   decode tokens per run (default 64)
  --prompt-ids LIST    the prompt (default 1,2,3,4,5,6,7,8)
  --bin PATH           the stevedore binary (default: `stevedore` next to this executable)
  --json-out FILE      also write every number as JSON";

/// (label, config file contents) of each policy compared.
const POLICIES: [(&str, &str); 4] = [
    ("lru", "[cache]\npolicy = \"lru\"\n"),
    ("transition", "[cache]\npolicy = \"predictive\"\n[predictor]\nkind = \"transition\"\nensemble = {}\n"),
    ("gate", "[cache]\npolicy = \"predictive\"\n[predictor]\nkind = \"gate\"\nensemble = {}\n"),
    ("default", ""),
];

struct Args {
    models: Vec<PathBuf>,
    budgets: Vec<String>,
    max_new_tokens: usize,
    prompt_ids: String,
    bin: PathBuf,
    json_out: Option<PathBuf>,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        models: Vec::new(),
        budgets: vec!["25%".into(), "50%".into()],
        max_new_tokens: 64,
        prompt_ids: "1,2,3,4,5,6,7,8".into(),
        bin: setup::default_bin()?,
        json_out: None,
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.models.push(value()?.into()),
            "--budgets" => a.budgets = value()?.split(',').map(|b| b.trim().to_string()).collect(),
            "--max-new-tokens" => a.max_new_tokens = setup::positive(&flag, &value()?)?,
            "--prompt-ids" => a.prompt_ids = value()?,
            "--bin" => a.bin = value()?.into(),
            "--json-out" => a.json_out = Some(value()?.into()),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown flag `{other}`\n{USAGE}")),
        }
    }
    if a.models.is_empty() {
        return Err(format!("give at least one --model\n{USAGE}"));
    }
    setup::check_bin(&a.bin)?;
    Ok(a)
}

/// Runs the binary; its stdout as JSON.
fn stevedore(bin: &Path, args: &[&str]) -> Result<Value, String> {
    let out = Command::new(bin).args(args).output().map_err(|e| format!("{}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`stevedore {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("`stevedore {}`: not JSON: {e}", args.join(" ")))
}

fn f(v: &Value, path: &[&str]) -> f64 {
    path.iter().fold(v, |v, k| &v[*k]).as_f64().unwrap_or(0.0)
}

/// One policy's run at one budget, reduced to what the table shows.
fn measure(run: &Value, compute_per_token: f64) -> Value {
    let s = &run["stats"];
    let c = &s["expert_cache"];
    let tokens =
        (s["prompt_tokens"].as_f64().unwrap_or(0.0) + s["generated_tokens"].as_f64().unwrap_or(0.0)).max(1.0);
    let decode_tokens = (s["generated_tokens"].as_f64().unwrap_or(1.0) - 1.0).max(1.0);
    let (hits, misses) = (f(c, &["hits"]), f(c, &["misses"]));
    let bytes_per_token = f(c, &["bytes_read"]) / tokens;
    let bandwidth = f(c, &["bytes_read"]) / f(c, &["busy_seconds"]).max(1e-9);
    let ms_per_token = 1e3 / f(s, &["decode_tokens_per_s"]).max(1e-9);
    let bound_ms = 1e3 * compute_per_token.max(bytes_per_token / bandwidth.max(1.0));
    let next = &s["forecast"]["by_distance"][0];
    json!({
        "decode_tokens_per_s": f(s, &["decode_tokens_per_s"]),
        "hit_rate": hits / (hits + misses).max(1.0),
        "bytes_per_token": bytes_per_token,
        "stall_ms_per_token": 1e3 * f(c, &["stall_seconds"]) / tokens,
        "disk_bandwidth": bandwidth,
        "ms_per_token": ms_per_token,
        "bound_ms_per_token": bound_ms,
        "recall": next.get("recall"),
        "precision": next.get("precision"),
        "prefetch_reads": f(c, &["prefetch_reads"]),
        "horizon_layers": s["horizon"].get("layers"),
        "decode_tokens": decode_tokens,
    })
}

fn bench_model(a: &Args, model: &Path, tmp: &Path) -> Result<Value, String> {
    let dir = model.to_str().ok_or("model paths must be UTF-8")?;
    let new = a.max_new_tokens.to_string();
    let base =
        ["generate", "--model", dir, "--prompt-ids", &a.prompt_ids, "--max-new-tokens", &new, "--json"];
    // Compute time with every expert resident (a warm start reads them all at once): the
    // decode's time less its stalls (those beyond the prefill's time, which the decode must
    // have spent waiting for the warm start's last reads).
    let mut args = base.to_vec();
    args.extend(["--policy", "lru", "--host-cache", "100%", "--warm-start", "on"]);
    let full = stevedore(&a.bin, &args)?;
    let s = &full["stats"];
    let decode_tokens = (f(s, &["generated_tokens"]) - 1.0).max(1.0);
    let decode_stall = (f(s, &["expert_cache", "stall_seconds"]) - f(s, &["prefill_seconds"])).max(0.0);
    let compute = (f(s, &["decode_seconds"]) - decode_stall) / decode_tokens;
    let reference = full["generated_ids"].clone();
    let mut budgets = Vec::new();
    for budget in &a.budgets {
        let mut rows = serde_json::Map::new();
        let mut lru_trace = None;
        let mut budget_bytes = 0.0;
        for (label, config) in POLICIES {
            let cfg = tmp.join(format!("{label}.toml"));
            std::fs::write(&cfg, config).map_err(|e| e.to_string())?;
            let trace = tmp.join(format!("{label}-{}.jsonl", budget.replace('%', "pct")));
            let mut args = base.to_vec();
            let (c, t) = (cfg.to_str().unwrap(), trace.to_str().unwrap());
            args.extend(["--config", c, "--host-cache", budget, "--trace", t]);
            let run = stevedore(&a.bin, &args)?;
            if run["generated_ids"] != reference {
                return Err(format!("{dir} {label} at {budget}: the tokens differ from the resident run's"));
            }
            budget_bytes = f(&run["stats"], &["expert_cache", "budget_bytes"]);
            rows.insert(label.into(), measure(&run, compute));
            if label == "lru" {
                lru_trace = Some(trace);
            }
        }
        let trace = lru_trace.expect("lru runs first");
        let capacity = (budget_bytes as u64).to_string();
        let sim = stevedore(
            &a.bin,
            &[
                "simulate",
                "--trace",
                trace.to_str().unwrap(),
                "--model",
                dir,
                "--capacity",
                &capacity,
                "--json",
            ],
        )?;
        let belady = &sim["capacities"][0]["policies"]["belady"];
        let belady_hit = f(belady, &["hits"]) / f(belady, &["accesses"]).max(1.0);
        budgets.push(json!({"budget": budget, "budget_bytes": budget_bytes, "belady_hit_rate": belady_hit, "policies": rows}));
    }
    Ok(json!({"model": dir, "compute_ms_per_token": compute * 1e3, "budgets": budgets}))
}

fn render(results: &[Value]) -> String {
    let mut out = String::new();
    for m in results {
        out += &format!(
            "\n{}  (compute {:.1} ms/token with every expert resident)\n",
            m["model"].as_str().unwrap_or("?"),
            f(m, &["compute_ms_per_token"])
        );
        for b in m["budgets"].as_array().into_iter().flatten() {
            out += &format!(
                "  host cache {}: Belady's demand-only hit rate {:.1}%\n  {:<11} {:>7} {:>6} {:>7} {:>9} {:>6} {:>8} {:>8} {:>6} {:>7} {:>7} {:>4}\n",
                b["budget"].as_str().unwrap_or("?"),
                100.0 * f(b, &["belady_hit_rate"]),
                "policy", "tok/s", "xLRU", "hit", "MB/token", "xLRU", "stall ms", "bound ms", "xbound", "recall", "precis", "hor"
            );
            let lru = &b["policies"]["lru"];
            for (label, _) in POLICIES {
                let p = &b["policies"][label];
                let opt = |k: &str| p[k].as_f64().map_or("-".to_string(), |v| format!("{v:.3}"));
                out += &format!(
                    "  {:<11} {:>7.2} {:>6.2} {:>6.1}% {:>9.1} {:>6.2} {:>8.1} {:>8.1} {:>6.2} {:>7} {:>7} {:>4}\n",
                    label,
                    f(p, &["decode_tokens_per_s"]),
                    f(p, &["decode_tokens_per_s"]) / f(lru, &["decode_tokens_per_s"]).max(1e-9),
                    100.0 * f(p, &["hit_rate"]),
                    f(p, &["bytes_per_token"]) / 1e6,
                    f(p, &["bytes_per_token"]) / f(lru, &["bytes_per_token"]).max(1.0),
                    f(p, &["stall_ms_per_token"]),
                    f(p, &["bound_ms_per_token"]),
                    f(p, &["ms_per_token"]) / f(p, &["bound_ms_per_token"]).max(1e-9),
                    opt("recall"),
                    opt("precision"),
                    p["horizon_layers"].as_u64().map_or("-".into(), |h| h.to_string()),
                );
            }
        }
    }
    out
}

fn main() -> ExitCode {
    let a = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let tmp = std::env::temp_dir().join(format!("stevedore-prefetch-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&tmp) {
        eprintln!("{}: {e}", tmp.display());
        return ExitCode::from(2);
    }
    let mut results = Vec::new();
    for model in &a.models {
        match bench_model(&a, model, &tmp) {
            Ok(r) => results.push(r),
            Err(e) => {
                eprintln!("{e}");
                let _ = std::fs::remove_dir_all(&tmp);
                return ExitCode::from(2);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    println!("{}\n{}", setup::command_line("prefetch"), render(&results));
    if let Some(path) = &a.json_out {
        let doc = json!({"command": setup::command_line("prefetch"), "commit": setup::git_commit(), "results": results});
        if let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&doc).expect("json") + "\n") {
            eprintln!("{}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}
