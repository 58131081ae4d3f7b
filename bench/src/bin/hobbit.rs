//! Mixed precision on a miss (HOBBIT), measured: for each `--model`, `stevedore generate` at
//! one host-cache budget with LRU and every expert in full precision, with the HOBBIT policy
//! over q4_0 and q8_0 copies, and with every expert's q4_0 copy; decode tokens/s and bytes read
//! per generated token, all in one run on the same prompt. With `--ppl-model DIR --text FILE`,
//! the quality side: the perplexity (`stevedore perplexity`, llama.cpp's chunking) of the same
//! variants and of cache-conditional routing at two biases, fed one token per forward pass
//! (`max_batch_tokens = 1`), so that the cache sees each token's routing as a single-stream
//! decode does (a prefill pass of hundreds of rows uses every expert of a layer, and an expert
//! of a pass needs what its most demanding row needs), with the bytes read per token. Writes
//! the low-bit copies (`stevedore quantize`) where they are missing. See bench/README.md.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use serde_json::{json, Value};
use stevedore_bench::{setup, TempDir};

const USAGE: &str = "\
usage: hobbit --model DIR [--model DIR ...] [options]
  --budget SIZE        host-cache budget (default 25%)
  --max-new-tokens N   decode tokens per run (default 64)
  --prompt-ids LIST    the prompt (default 1,2,3,4,5,6,7,8)
  --ppl-model DIR      also measure perplexity on this model...
  --text FILE          ...over this text
  --context N          perplexity context (default: the command's)
  --bin PATH           the stevedore binary (default: `stevedore` next to this executable)
  --json-out FILE      also write every number as JSON
Bars: on every --model, HOBBIT over q4_0 reads at least 40% fewer bytes per generated token
than full precision; on the --ppl-model, its perplexity is at most 1% above full precision's.";

/// (label, config file contents) of each variant; every one runs LRU.
const VARIANTS: [(&str, &str); 4] = [
    ("full", ""),
    ("hobbit-q4_0", "[precision]\npolicy = \"hobbit\"\nlow = \"q4_0\"\n"),
    ("hobbit-q8_0", "[precision]\npolicy = \"hobbit\"\nlow = \"q8_0\"\n"),
    ("low-q4_0", "[precision]\npolicy = \"low\"\nlow = \"q4_0\"\n"),
];

/// For the quality table only: the whole model in q4_0 (experts and dense matrices, like a
/// llama.cpp Q4_0 file), and cache-conditional routing (its speed is the full run's plus fewer
/// misses).
const QUALITY_ONLY: [(&str, &str); 3] = [
    ("all-q4_0+dense", "[precision]\npolicy = \"low\"\nlow = \"q4_0\"\ndense = \"q4_0\"\n"),
    ("resident-bias-0.5", "[routing]\nresident_bias = 0.5\n"),
    ("resident-bias-2", "[routing]\nresident_bias = 2.0\n"),
];

struct Args {
    models: Vec<PathBuf>,
    budget: String,
    max_new_tokens: usize,
    prompt_ids: String,
    ppl_model: Option<PathBuf>,
    text: Option<PathBuf>,
    context: Option<usize>,
    bin: PathBuf,
    json_out: Option<PathBuf>,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        models: Vec::new(),
        budget: "25%".into(),
        max_new_tokens: 64,
        prompt_ids: "1,2,3,4,5,6,7,8".into(),
        ppl_model: None,
        text: None,
        context: None,
        bin: setup::default_bin()?,
        json_out: None,
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.models.push(value()?.into()),
            "--budget" => a.budget = value()?,
            "--max-new-tokens" => a.max_new_tokens = setup::positive(&flag, &value()?)?,
            "--prompt-ids" => a.prompt_ids = value()?,
            "--ppl-model" => a.ppl_model = Some(value()?.into()),
            "--text" => a.text = Some(value()?.into()),
            "--context" => a.context = Some(setup::positive(&flag, &value()?)?),
            "--bin" => a.bin = value()?.into(),
            "--json-out" => a.json_out = Some(value()?.into()),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown flag `{other}`\n{USAGE}")),
        }
    }
    if a.models.is_empty() && a.ppl_model.is_none() {
        return Err(format!("give at least one --model, or --ppl-model\n{USAGE}"));
    }
    if a.ppl_model.is_some() != a.text.is_some() {
        return Err(format!("--ppl-model and --text go together\n{USAGE}"));
    }
    setup::check_bin(&a.bin)?;
    Ok(a)
}

/// Runs the binary; its stdout, parsed as JSON when `json`.
fn stevedore(bin: &Path, args: &[&str], json: bool) -> Result<Value, String> {
    let out = Command::new(bin).args(args).output().map_err(|e| format!("{}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`stevedore {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    if !json {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("`stevedore {}`: not JSON: {e}", args.join(" ")))
}

/// A config file for `variant` at `budget` with LRU, in a temporary directory.
fn config(dir: &TempDir, label: &str, variant: &str, budget: &str) -> Result<PathBuf, String> {
    let path = dir.path().join(format!("{label}.toml"));
    let text = format!("[cache]\npolicy = \"lru\"\n[tiers.host]\nbudget = \"{budget}\"\n{variant}");
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// Writes the model's missing low-bit copies (with `dense`, of the dense matrices too).
fn ensure_copies(bin: &Path, dir: &str, dense: bool) -> Result<(), String> {
    for format in ["q4_0", "q8_0"] {
        let missing = |set: &str| !Path::new(dir).join(format!("{set}.{format}.json")).exists();
        if missing("experts") || (dense && missing("dense")) {
            eprintln!("writing {format} copies of {dir}");
            let mut args = vec!["quantize", "--model", dir, "--format", format, "--force"];
            if dense {
                args.push("--all");
            }
            stevedore(bin, &args, false)?;
        }
    }
    Ok(())
}

/// The share of a run's expert accesses served by low-bit copies, and skipped.
fn shares(p: &Value) -> (f64, f64) {
    let keys = ["full_hits", "full_misses", "low_hits", "low_misses", "skipped"];
    let accesses = keys.iter().map(|k| f(p, k)).sum::<f64>().max(1.0);
    ((f(p, "low_hits") + f(p, "low_misses")) / accesses, f(p, "skipped") / accesses)
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

fn run(a: Args) -> Result<bool, String> {
    let tmp = TempDir::new("hobbit").map_err(|e| format!("temporary directory: {e}"))?;
    let mut pass = true;
    let mut report =
        json!({"command": setup::command_line("hobbit"), "commit": setup::git_commit(), "budget": a.budget});
    println!("# HOBBIT mixed precision at host cache {} (LRU), {} tokens", a.budget, a.max_new_tokens);
    for model in &a.models {
        let dir = model.to_str().ok_or("model path is not UTF-8")?;
        ensure_copies(&a.bin, dir, false)?;
        println!(
            "\n{dir}\n{:<14} {:>10} {:>14} {:>9} {:>7} {:>7} {:>7}",
            "variant", "decode/s", "bytes/token", "vs full", "low%", "skip%", "agree"
        );
        let mut rows = Vec::new();
        let mut full: Option<(f64, Vec<Value>)> = None;
        for (label, variant) in VARIANTS {
            let cfg = config(&tmp, label, variant, &a.budget)?;
            let cfg = cfg.to_str().ok_or("temporary path is not UTF-8")?;
            let out = stevedore(
                &a.bin,
                &[
                    "generate",
                    "--model",
                    dir,
                    "--config",
                    cfg,
                    "--prompt-ids",
                    &a.prompt_ids,
                    "--max-new-tokens",
                    &a.max_new_tokens.to_string(),
                    "--temperature",
                    "0",
                    "--json",
                ],
                true,
            )?;
            let s = &out["stats"];
            let c = &s["expert_cache"];
            let tokens = out["generated_ids"].as_array().map_or(0, Vec::len).max(1) as f64;
            let per_token = f(c, "bytes_read") / tokens;
            let p = &c["precision"];
            let accesses = ["full_hits", "full_misses", "low_hits", "low_misses", "skipped"]
                .iter()
                .map(|k| f(p, k))
                .sum::<f64>()
                .max(1.0);
            let low = (f(p, "low_hits") + f(p, "low_misses")) / accesses;
            let skipped = f(p, "skipped") / accesses;
            let ids = out["generated_ids"].as_array().cloned().unwrap_or_default();
            let (ratio, agree) = match &full {
                None => {
                    full = Some((per_token, ids.clone()));
                    (1.0, ids.len())
                }
                Some((b, reference)) => {
                    (per_token / b, reference.iter().zip(&ids).take_while(|(x, y)| x == y).count())
                }
            };
            println!(
                "{label:<14} {:>10.2} {:>14.0} {:>8.2}x {:>6.1}% {:>6.1}% {:>3}/{}",
                f(s, "decode_tokens_per_s"),
                per_token,
                ratio,
                100.0 * low,
                100.0 * skipped,
                agree,
                ids.len()
            );
            if label == "hobbit-q4_0" && ratio > 0.6 {
                pass = false;
                println!(
                    "  bar not met: hobbit-q4_0 reads {:.0}% fewer bytes per token (bar: 40%)",
                    100.0 * (1.0 - ratio)
                );
            }
            rows.push(json!({"variant": label, "decode_tokens_per_s": f(s, "decode_tokens_per_s"),
                "bytes_read_per_token": per_token, "vs_full": ratio, "low_share": low, "skipped_share": skipped,
                "tokens_agreeing_with_full": agree, "precision": p}));
        }
        report[dir] = json!({"generate": rows});
    }
    if let (Some(model), Some(text)) = (&a.ppl_model, &a.text) {
        let model = model.to_str().ok_or("model path is not UTF-8")?;
        let text = text.to_str().ok_or("text path is not UTF-8")?;
        ensure_copies(&a.bin, model, true)?;
        println!(
            "\nperplexity of {model} on {text} at host cache {} (LRU, one token per pass)\n{:<18} {:>10} {:>9} {:>12} {:>7} {:>7}",
            a.budget, "variant", "PPL", "vs full", "bytes/token", "low%", "skip%"
        );
        let mut rows = Vec::new();
        let mut base = None;
        for (label, variant) in VARIANTS.iter().chain(&QUALITY_ONLY) {
            let one_at_a_time = format!("[engine]\nmax_batch = 1\nmax_batch_tokens = 1\n{variant}");
            let cfg = config(&tmp, label, &one_at_a_time, &a.budget)?;
            let cfg = cfg.to_str().ok_or("temporary path is not UTF-8")?;
            let mut args = vec!["perplexity", "--model", model, "--text", text, "--config", cfg, "--json"];
            let context = a.context.map(|c| c.to_string());
            if let Some(c) = &context {
                args.extend(["--context", c]);
            }
            let out = stevedore(&a.bin, &args, true)?;
            let ppl = f(&out, "ppl");
            let b = *base.get_or_insert(ppl);
            let c = &out["stats"]["expert_cache"];
            let per_token = f(c, "bytes_read") / f(&out, "text_tokens").max(1.0);
            let (low, skipped) = shares(&c["precision"]);
            println!(
                "{label:<18} {ppl:>10.4} {:>+8.2}% {per_token:>12.0} {:>6.1}% {:>6.1}%",
                100.0 * (ppl / b - 1.0),
                100.0 * low,
                100.0 * skipped
            );
            if *label == "hobbit-q4_0" && ppl > b * 1.01 {
                pass = false;
                println!("  bar not met: hobbit-q4_0 raises perplexity by more than 1%");
            }
            rows.push(
                json!({"variant": label, "ppl": ppl, "vs_full": ppl / b, "bytes_read_per_token": per_token,
                "low_share": low, "skipped_share": skipped, "result": out}),
            );
        }
        report["perplexity"] = json!({"model": model, "text": text, "rows": rows});
    }
    if let Some(path) = &a.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(pass)
}

fn main() -> ExitCode {
    setup::main("hobbit", parse_args, run)
}
