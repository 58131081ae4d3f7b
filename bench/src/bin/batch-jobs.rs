//! Batch-job benchmark: `stevedore batch` on one input (prompts of about 32-128 tokens of
//! Python-documentation prose, or of random ids for a model without a tokenizer; different per
//! request; 64 new tokens; greedy) at several `--max-batch` values with `--schedule fcfs` and `regroup`,
//! against running the first requests one by one with `stevedore generate`. Reports generated
//! tokens/s, distinct experts a MoE layer loads per forward pass, and expert bytes read per
//! token; checks every run gives the same texts. Bars: max-batch 64 reaches 5x the one-by-one
//! tokens/s; regroup loads at least 25% fewer distinct experts per pass than fcfs where more
//! requests are ready than fit, and is not slower. The model should route non-uniformly (the
//! trained `tests/fixtures/pydoc-moe` by default). See bench/README.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use serde_json::{json, Value};
use stevedore_bench::checkpoint::SplitMix64;
use stevedore_bench::{setup, TempDir};

const USAGE: &str = "\
usage: batch-jobs [options]
  --model DIR          the model (default tests/fixtures/pydoc-moe)
  --bin PATH           the stevedore binary (default: `stevedore` next to this executable)
  --requests N         requests in the job (default 256)
  --max-new-tokens N   new tokens per request (default 64)
  --max-batch LIST     --max-batch values, one run per value and schedule (default 1,8,32,64,128)
  --host-cache SIZE    expert cache budget (default 25%)
  --one-by-one N       run the first N requests one by one with `stevedore generate` (default 16)
  --json-out FILE      also write every number as JSON
Exit status: 0 when every bar passes and all runs agree, 1 when not, 2 on an error.";

struct Args {
    model: PathBuf,
    bin: Option<PathBuf>,
    requests: usize,
    max_new_tokens: usize,
    max_batch: Vec<usize>,
    host_cache: String,
    one_by_one: usize,
    json_out: Option<PathBuf>,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        model: PathBuf::from("tests/fixtures/pydoc-moe"),
        bin: None,
        requests: 256,
        max_new_tokens: 64,
        max_batch: vec![1, 8, 32, 64, 128],
        host_cache: "25%".into(),
        one_by_one: 16,
        json_out: None,
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let mut num = || setup::positive(&flag, &value()?);
        match flag.as_str() {
            "--model" => a.model = value()?.into(),
            "--bin" => a.bin = Some(value()?.into()),
            "--requests" => a.requests = num()?,
            "--max-new-tokens" => a.max_new_tokens = num()?,
            "--max-batch" => a.max_batch = setup::positive_list(&flag, &value()?)?,
            "--host-cache" => a.host_cache = value()?,
            "--one-by-one" => a.one_by_one = num()?,
            "--json-out" => a.json_out = Some(value()?.into()),
            _ => return Err(format!("unknown argument `{flag}`\n{USAGE}")),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    setup::main("batch-jobs", parse_args, |a| run(&a))
}

fn log(m: &str) {
    eprintln!("[batch-jobs] {m}");
}

/// The model's vocabulary size, from config.json.
fn vocab(model: &Path) -> Result<usize, String> {
    let path = model.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    v["vocab_size"].as_u64().map(|n| n as usize).ok_or_else(|| format!("{}: no vocab_size", path.display()))
}

/// One `stevedore batch` run: its summary and custom_id -> text.
fn batch(
    bin: &Path,
    args: &Args,
    input: &Path,
    dir: &Path,
    max_batch: usize,
    schedule: &str,
) -> Result<(Value, BTreeMap<String, String>), String> {
    let output = dir.join(format!("out-{schedule}-{max_batch}.jsonl"));
    let out = Command::new(bin)
        .arg("batch")
        .arg("--model")
        .arg(&args.model)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(&output)
        .args([
            "--max-batch",
            &max_batch.to_string(),
            "--schedule",
            schedule,
            "--host-cache",
            &args.host_cache,
        ])
        .args(["--policy", "lru", "--json"])
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!("batch failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let summary: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("bad summary: {e}"))?;
    let text = std::fs::read_to_string(&output).map_err(|e| e.to_string())?;
    let mut texts = BTreeMap::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        // Without a tokenizer the text is empty; the usage still says how many tokens.
        let body = &v["response"]["body"];
        let t = body["choices"][0]["text"].as_str().ok_or(format!("no result in {line}"))?;
        let t = format!("{t}|{}", body["usage"]["completion_tokens"]);
        texts.insert(v["custom_id"].as_str().unwrap_or_default().to_owned(), t.to_owned());
    }
    Ok((summary, texts))
}

fn run(args: &Args) -> Result<bool, String> {
    let command = setup::command_line("batch-jobs");
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => setup::default_bin()?,
    };
    setup::check_bin(&bin)?;
    let tmp = TempDir::new("batch-jobs")?;
    let mut rng = SplitMix64(7);
    // Natural text routes as real jobs do (random ids route closer to uniform): sentences drawn
    // at random until about 25-90 words (32-128 tokens). A model without a tokenizer (the e2e
    // benchmark's random checkpoint) gets random ids, 32-128 of them.
    let text = args.model.join("tokenizer.json").exists();
    let vocab = vocab(&args.model)?;
    let prompts: Vec<Value> = (0..args.requests)
        .map(|_| {
            if !text {
                let len = 32 + rng.below(97);
                return json!((0..len).map(|_| 2 + rng.below(vocab - 2) as u32).collect::<Vec<_>>());
            }
            let words = 25 + rng.below(66);
            let mut p = String::new();
            while p.split_whitespace().count() < words {
                p.push_str(SENTENCES[rng.below(SENTENCES.len())]);
                p.push(' ');
            }
            json!(p.trim_end())
        })
        .collect();
    let input = tmp.path().join("requests.jsonl");
    let lines: String = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let body = json!({"prompt": p, "max_tokens": args.max_new_tokens, "temperature": 0});
            format!("{}\n", json!({"custom_id": format!("req-{i}"), "method": "POST", "url": "/v1/completions", "body": body}))
        })
        .collect();
    std::fs::write(&input, lines).map_err(|e| e.to_string())?;

    // One by one: each request its own `stevedore generate` process, as a user without batch
    // jobs would run them.
    let n = args.one_by_one.min(args.requests);
    let t0 = Instant::now();
    let mut tokens = 0usize;
    for p in &prompts[..n] {
        let prompt = match p {
            Value::String(t) => ["--prompt".to_owned(), t.clone()],
            ids => {
                let ids: Vec<String> = ids.as_array().into_iter().flatten().map(|i| i.to_string()).collect();
                ["--prompt-ids".to_owned(), ids.join(",")]
            }
        };
        let out = Command::new(&bin)
            .arg("generate")
            .arg("--model")
            .arg(&args.model)
            .args(&prompt)
            .args(["--max-new-tokens", &args.max_new_tokens.to_string()])
            .args(["--host-cache", &args.host_cache, "--policy", "lru", "--json"])
            .output()
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("generate: {e}"))?;
        tokens += v["generated_ids"].as_array().map_or(0, Vec::len);
    }
    let one_by_one = tokens as f64 / t0.elapsed().as_secs_f64();
    log(&format!("one by one: {n} requests, {one_by_one:.1} tok/s"));

    let mut rows = Vec::new();
    let mut reference: Option<BTreeMap<String, String>> = None;
    let mut same = true;
    for &mb in &args.max_batch {
        for schedule in ["fcfs", "regroup"] {
            let (s, texts) = batch(&bin, args, &input, tmp.path(), mb, schedule)?;
            match &reference {
                None => reference = Some(texts),
                Some(r) => same &= *r == texts,
            }
            let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
            log(&format!(
                "max-batch {mb} {schedule}: {:.1} tok/s, {:.2} experts/layer pass ({:.2} decode), {:.2} sequences/pass",
                f("tokens_per_s"),
                f("experts_per_layer_pass"),
                f("experts_per_layer_decode_pass"),
                f("sequences_per_pass")
            ));
            rows.push(json!({
                "max_batch": mb, "schedule": schedule, "tokens_per_s": f("tokens_per_s"),
                "x_one_by_one": f("tokens_per_s") / one_by_one,
                "experts_per_layer_pass": f("experts_per_layer_pass"),
                "experts_per_layer_decode_pass": f("experts_per_layer_decode_pass"),
                "sequences_per_pass": f("sequences_per_pass"),
                "bytes_read_per_token": f("bytes_read_per_token"), "seconds": f("seconds"),
            }));
        }
    }
    let get = |mb: usize, sch: &str, k: &str| {
        rows.iter().find(|r| r["max_batch"] == mb && r["schedule"] == sch).and_then(|r| r[k].as_f64())
    };
    let mut pass = same;
    println!("`{command}` ({})\n", setup::git_commit().unwrap_or_else(|| "unknown commit".into()));
    println!("One by one (`stevedore generate` per request, {n} requests): {one_by_one:.1} tok/s.\n");
    println!(
        "| max-batch | schedule | tok/s | x one by one | experts / layer pass: all | decode | decode, regroup / fcfs | sequences / pass | read / token |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let mb = r["max_batch"].as_u64().unwrap() as usize;
        let sch = r["schedule"].as_str().unwrap();
        let ratio = match (sch, get(mb, "fcfs", "experts_per_layer_decode_pass")) {
            ("regroup", Some(f)) => {
                format!("{:.2}", r["experts_per_layer_decode_pass"].as_f64().unwrap() / f)
            }
            _ => "-".into(),
        };
        println!(
            "| {mb} | {sch} | {:.1} | {:.2} | {:.2} | {:.2} | {ratio} | {:.1} | {:.2} MiB |",
            r["tokens_per_s"].as_f64().unwrap(),
            r["x_one_by_one"].as_f64().unwrap(),
            r["experts_per_layer_pass"].as_f64().unwrap(),
            r["experts_per_layer_decode_pass"].as_f64().unwrap(),
            r["sequences_per_pass"].as_f64().unwrap(),
            r["bytes_read_per_token"].as_f64().unwrap() / (1 << 20) as f64,
        );
    }
    println!();
    if let Some(x) = get(64, "fcfs", "x_one_by_one") {
        let ok = x >= 5.0;
        pass &= ok;
        println!(
            "- max-batch 64: {x:.1}x the one-by-one tokens/s (bar 5x): {}",
            if ok { "pass" } else { "FAIL" }
        );
    }
    // A micro-batch of one always loads top-k experts: nothing to regroup.
    for &mb in args.max_batch.iter().filter(|&&mb| mb > 1 && mb < args.requests) {
        if let (Some(fe), Some(re), Some(ft), Some(rt)) = (
            get(mb, "fcfs", "experts_per_layer_decode_pass"),
            get(mb, "regroup", "experts_per_layer_decode_pass"),
            get(mb, "fcfs", "tokens_per_s"),
            get(mb, "regroup", "tokens_per_s"),
        ) {
            let ok = re <= 0.75 * fe && rt >= 0.95 * ft;
            pass &= ok;
            println!(
                "- max-batch {mb}: regroup loads {:.0}% fewer distinct experts per layer decode pass, at {:.2}x fcfs's tokens/s \
                 (bars: 25% fewer, not slower): {}",
                (1.0 - re / fe) * 100.0,
                rt / ft,
                if ok { "pass" } else { "FAIL" }
            );
        }
    }
    println!("- every run gave the same texts: {}", if same { "yes" } else { "NO" });
    if let Some(path) = &args.json_out {
        let v = json!({"command": command, "one_by_one_tokens_per_s": one_by_one, "rows": rows, "same_texts": same});
        std::fs::write(path, serde_json::to_string_pretty(&v).expect("serialises"))
            .map_err(|e| e.to_string())?;
    }
    Ok(pass)
}

/// Python-documentation prose, the kind of text `pydoc-moe` was trained on.
const SENTENCES: &[&str] = &[
    "The import statement combines two operations; it searches for the named module, then binds the results of that search to a name in the local scope.",
    "A list is a mutable sequence, typically used to store collections of homogeneous items.",
    "The with statement is used to wrap the execution of a block with methods defined by a context manager.",
    "Exceptions are raised when an error is detected and can be handled by the surrounding code.",
    "A class definition is an executable statement that creates a new class object.",
    "Dictionaries can be created by placing a comma-separated list of key: value pairs within braces.",
    "Generators are a simple and powerful tool for creating iterators.",
    "The print function writes the given objects to the text stream file, separated by sep and followed by end.",
    "A decorator is a function returning another function, usually applied as a function transformation.",
    "Tuples are immutable sequences, typically used to store collections of heterogeneous data.",
    "String formatting lets you embed the values of expressions inside string literals.",
    "The for statement is used to iterate over the elements of a sequence or other iterable object.",
    "If the iterable is empty, the else clause of the loop is executed.",
    "The return statement leaves the current function call with the expression list as return value.",
    "Keyword arguments must follow positional arguments in a function call.",
    "The open function returns a file object and is most commonly used with two arguments.",
    "A module is a file containing Python definitions and statements.",
    "The built-in function len returns the number of items in a container.",
    "Slicing a sequence returns a new sequence containing the requested items.",
    "The try statement specifies exception handlers and cleanup code for a group of statements.",
    "Lambda expressions are used to create small anonymous functions.",
    "The global statement causes the listed identifiers to be interpreted as globals.",
    "Comparisons can be chained, for example a < b == c tests whether a is less than b and b equals c.",
    "The yield expression is used when defining a generator function.",
];
