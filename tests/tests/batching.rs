//! Many sequences in one engine, through the real binary (`generate --batch`): every sequence
//! gets exactly the greedy tokens it gets alone, whatever else shares its forward passes, at
//! every host-cache budget and with prefetching on or off; requests wait for KV blocks rather
//! than fail; the golden 200-token runs equal transformers'; and the simulator, replaying the
//! engine's own trace, counts the same demand hits and misses as the engine did.

mod common;

use std::path::Path;

use common::{fixture_dir, generate_ids, ids, inspect, stevedore, u64_at, FIXTURES, PYDOC_MOE};
use serde_json::Value;

type Json = Value;

/// Writes `prompts` as a `--batch` file (one `{"prompt_ids": [..]}` a line) in `dir`.
fn batch_file(dir: &Path, name: &str, prompts: &[Vec<u64>], max_new_tokens: u64) -> std::path::PathBuf {
    let text: String = prompts
        .iter()
        .map(|p| format!("{}\n", serde_json::json!({"prompt_ids": p, "max_new_tokens": max_new_tokens})))
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `generate --batch FILE --json` with `flags`: the parsed output.
fn run_batch(model: &Path, file: &Path, flags: &[&str]) -> Value {
    let mut args: Vec<String> =
        ["generate", "--model", model.to_str().unwrap(), "--batch", file.to_str().unwrap(), "--json"]
            .map(str::to_owned)
            .into();
    args.extend(flags.iter().map(|s| s.to_string()));
    stevedore(args).json()
}

/// Prompts of eight different lengths (1 to 20 ids), valid for every fixture's vocabulary.
fn prompts() -> Vec<Vec<u64>> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    [1usize, 7, 20, 3, 12, 5, 16, 2]
        .iter()
        .map(|&len| {
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    3 + x % 250
                })
                .collect()
        })
        .collect()
}

/// Settings under which the predictive policy prefetches on the small fixtures (see
/// tests/prefetch.rs), and a row budget that cuts the longer prompts into several chunks, so
/// that sequences reach decode at different steps.
const PREFETCHING: &str = "[cache]\npolicy = \"predictive\"\n[predictor]\nprefetch_budget = \"50%\"\n\
     prefetch_min_lift = 0.0\nprotect_min_lift = 1.0\n[engine]\nmax_batch_tokens = 6\n";
const LRU_CHUNKED: &str = "[cache]\npolicy = \"lru\"\n[engine]\nmax_batch_tokens = 6\n";

fn check_batched_equals_alone(name: &str) {
    let dir = fixture_dir(name);
    let tmp = tempfile::tempdir().unwrap();
    let info = inspect(&dir, &[]);
    let min = u64_at(&info, "min_host_cache_bytes").to_string();
    let new = 8;
    let prompts = prompts();
    let alone: Vec<Vec<u64>> = prompts
        .iter()
        .map(|p| ids(&generate_ids(&dir, p, new, &["--host-cache", "100%"])["generated_ids"]))
        .collect();
    let configs = [("prefetching", PREFETCHING), ("lru", LRU_CHUNKED)];
    let mut prefetched = 0;
    for (label, text) in configs {
        let config = tmp.path().join(format!("{label}.toml"));
        std::fs::write(&config, text).unwrap();
        // N sequences; 8 with two batch slots, so that later ones start when earlier ones end.
        for (n, max_batch) in [(1, 1), (3, 3), (8, 8), (8, 2)] {
            let file = batch_file(tmp.path(), &format!("{n}.jsonl"), &prompts[..n], new);
            for budget in ["100%", min.as_str()] {
                let ctx = format!("{name} {label} N={n} max-batch {max_batch} budget {budget}");
                let flags = [
                    "--config",
                    config.to_str().unwrap(),
                    "--host-cache",
                    budget,
                    "--max-batch",
                    &max_batch.to_string(),
                ];
                let out = run_batch(&dir, &file, &flags);
                let results = out["results"].as_array().unwrap();
                assert_eq!(results.len(), n, "{ctx}");
                for (i, r) in results.iter().enumerate() {
                    assert_eq!(r["line"], i + 1, "{ctx}: results in input order");
                    assert_eq!(ids(&r["generated_ids"]), alone[i], "{ctx}: sequence {i} differs from alone");
                }
                let s = &out["stats"];
                let cache = &s["expert_cache"];
                assert!(u64_at(cache, "peak_bytes") <= u64_at(cache, "budget_bytes"), "{ctx}: {cache}");
                assert!(
                    u64_at(cache, "buffer_peak_bytes") <= u64_at(cache, "budget_bytes"),
                    "{ctx}: {cache}"
                );
                assert!(u64_at(&s["steps"], "max_batch_seen") <= max_batch as u64, "{ctx}: {s}");
                prefetched += u64_at(cache, "prefetch_reads");
            }
        }
    }
    // The invariant held with prefetches really happening.
    assert!(prefetched > 0, "{name}: the predictive runs never prefetched");
}

#[test]
fn mixtral_batched_equals_alone() {
    check_batched_equals_alone(FIXTURES[0]);
}

#[test]
fn qwen2_moe_batched_equals_alone() {
    check_batched_equals_alone(FIXTURES[1]);
}

#[test]
fn qwen3_moe_batched_equals_alone() {
    check_batched_equals_alone(FIXTURES[2]);
}

#[test]
fn olmoe_batched_equals_alone() {
    check_batched_equals_alone(FIXTURES[3]);
}

#[test]
fn glm4_moe_batched_equals_alone() {
    check_batched_equals_alone(FIXTURES[4]);
}

#[test]
fn phimoe_batched_equals_alone() {
    check_batched_equals_alone(FIXTURES[5]);
}

#[test]
fn deepseek_v3_batched_equals_alone() {
    check_batched_equals_alone(FIXTURES[6]);
}

#[test]
fn deepseek_v2_batched_equals_alone() {
    check_batched_equals_alone(FIXTURES[7]);
}

#[test]
fn pydoc_moe_batched_equals_alone() {
    check_batched_equals_alone(PYDOC_MOE);
}

/// llama2.c's golden test through the binary: 200 greedy tokens of the trained model from its
/// text prompts equal transformers' (tests/fixtures/pydoc-moe/golden.json), alone at the
/// minimum budget and all three prompts in one batch.
#[test]
fn golden_200_tokens_alone_and_batched() {
    let dir = fixture_dir(PYDOC_MOE);
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let cases = golden["cases"].as_array().unwrap();
    let min = u64_at(&inspect(&dir, &[]), "min_host_cache_bytes").to_string();
    for c in cases {
        let prompt = c["prompt"].as_str().unwrap();
        let args =
            ["generate", "--model", dir.to_str().unwrap(), "--prompt", prompt, "--max-new-tokens", "200"];
        let out = stevedore(args.iter().chain(&["--host-cache", &min, "--json"])).json();
        assert_eq!(ids(&out["prompt_ids"]), ids(&c["prompt_ids"]), "{prompt:?}: tokenization");
        assert_eq!(ids(&out["generated_ids"]), ids(&c["generated_ids"]), "{prompt:?}: 200 greedy tokens");
        assert_eq!(out["text"], c["text"], "{prompt:?}: decoded text");
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("golden.jsonl");
    let lines: String =
        cases.iter().map(|c| format!("{}\n", serde_json::json!({"prompt": c["prompt"]}))).collect();
    std::fs::write(&file, lines).unwrap();
    let out = run_batch(&dir, &file, &["--max-new-tokens", "200"]);
    for (r, c) in out["results"].as_array().unwrap().iter().zip(cases) {
        assert_eq!(ids(&r["generated_ids"]), ids(&c["generated_ids"]), "{}: batched", c["prompt"]);
    }
}

/// A KV cache with room for two of eight requests: the others wait for blocks and all finish
/// with their own tokens; a request larger than the whole cache is an error naming the sizes,
/// and the others still run.
#[test]
fn requests_wait_for_kv_blocks() {
    let dir = fixture_dir("olmoe");
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts();
    let new = 6;
    let alone: Vec<Json> = prompts.iter().map(|p| generate_ids(&dir, p, new, &[])).collect();
    // The first prompt alone (7 positions) takes one KV block; the longest request (26
    // positions) two. Room for four blocks: two of the longest at once.
    let block = u64_at(&alone[0]["stats"], "kv_cache_bytes");
    let two_requests = (4 * block).to_string();
    let alone: Vec<Vec<u64>> = alone.iter().map(|a| ids(&a["generated_ids"])).collect();
    let file = batch_file(tmp.path(), "8.jsonl", &prompts, new);
    let out = run_batch(&dir, &file, &["--kv-cache", &two_requests]);
    for (i, r) in out["results"].as_array().unwrap().iter().enumerate() {
        assert_eq!(ids(&r["generated_ids"]), alone[i], "sequence {i}");
    }
    let steps = &out["stats"]["steps"];
    assert!(u64_at(steps, "kv_blocks_peak") <= 4, "{steps}");
    assert!(u64_at(steps, "max_batch_seen") < 8, "all eight ran at once in room for two: {steps}");

    let too_long: Vec<Vec<u64>> = vec![prompts[0].clone(), vec![5; 60], prompts[1].clone()];
    let file = batch_file(tmp.path(), "long.jsonl", &too_long, new);
    let run = stevedore([
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--batch",
        file.to_str().unwrap(),
        "--kv-cache",
        &two_requests,
        "--host-cache",
        "100%",
    ]);
    // The others' results first, then the summary, then the error: exit status 1.
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.ends_with("error: 1 of 3 requests failed (see their lines above)\n"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert!(run.stdout.contains("[line 2] error: the request needs 66 positions"), "{}", run.stdout);
    assert!(run.stdout.contains("[line 1] ") && run.stdout.contains("[line 3] "), "{}", run.stdout);
}

/// `--batch` lines are checked before anything runs; a bad one names the file and line.
#[test]
fn bad_batch_lines_name_the_line() {
    let dir = fixture_dir("olmoe");
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("{\"prompt_ids\": [1, 2]}\n{oops\n", ":2: not a request"),
        ("{\"prompt_ids\": [1], \"prompt\": \"x\"}\n", ":1: give exactly one of `prompt` and `prompt_ids`"),
        ("{\"prompt\": \"hello\"}\n", ":1: `prompt` needs tokenizer.json"),
        ("{\"prompt_ids\": [1], \"temperature\": 1}\n", ":1: not a request: unknown field `temperature`"),
        ("\n\n", "no requests"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let file = tmp.path().join(format!("bad{i}.jsonl"));
        std::fs::write(&file, text).unwrap();
        stevedore(["generate", "--model", dir.to_str().unwrap(), "--batch", file.to_str().unwrap()])
            .err(&[file.to_str().unwrap(), want]);
    }
}

/// The engine records its forward passes (`--trace`), with the next-gate estimates and the
/// measured prefetch horizon of every step; the simulator replays the trace through the same
/// schedule, policies and predictor and, given the live budget in bytes and expert sizes from
/// the model, counts exactly the demand hits, misses and prefetches the engine did.
#[test]
fn the_simulator_counts_what_the_engine_counted() {
    let dir = fixture_dir(PYDOC_MOE);
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts();
    let file = batch_file(tmp.path(), "b.jsonl", &prompts[..6], 12);
    let info = inspect(&dir, &[]);
    let (min, all) = (u64_at(&info, "min_host_cache_bytes"), u64_at(&info, "expert_cache_bytes"));
    for (label, text) in [("lru", LRU_CHUNKED), ("predictive", PREFETCHING)] {
        let config = tmp.path().join(format!("{label}.toml"));
        std::fs::write(&config, text).unwrap();
        // At `all` the engine fills the cache at start (warm start) and the simulator must too.
        for budget in [min, 3 * min, all] {
            let trace = tmp.path().join(format!("{label}-{budget}.jsonl"));
            let live = run_batch(
                &dir,
                &file,
                &[
                    "--config",
                    config.to_str().unwrap(),
                    "--host-cache",
                    &budget.to_string(),
                    "--max-batch",
                    "4",
                    "--trace",
                    trace.to_str().unwrap(),
                ],
            );
            let cache = &live["stats"]["expert_cache"];
            if label == "predictive" {
                // The default predictor: next-gate estimates and a measured horizon, both
                // recorded, so the replay below feeds the forecaster what it was fed live.
                let text = std::fs::read_to_string(&trace).unwrap();
                assert!(text.contains("\"ahead\":[{\"at\":null") && text.contains("\"at\":0,"), "{label}");
                assert!(text.contains("\"horizon\":{\"layers\":"), "{label}");
                assert!(u64_at(&live["stats"]["horizon"], "updates") > 0, "{label}");
            }
            let sim = stevedore([
                "simulate",
                "--trace",
                trace.to_str().unwrap(),
                "--model",
                dir.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
                "--capacity",
                &budget.to_string(),
                "--json",
            ])
            .json();
            let p = &sim["capacities"][0]["policies"][label];
            let ctx = format!("{label} at {budget} bytes: live {cache}\nsimulated {p}");
            assert_eq!(u64_at(&sim["capacities"][0], "budget_bytes"), budget, "{ctx}");
            assert_eq!(u64_at(p, "hits"), u64_at(cache, "hits"), "{ctx}");
            assert_eq!(u64_at(p, "accesses"), u64_at(cache, "hits") + u64_at(cache, "misses"), "{ctx}");
            assert_eq!(u64_at(p, "prefetches_issued"), u64_at(cache, "prefetch_reads"), "{ctx}");
            assert_eq!(u64_at(p, "prefetches_useful"), u64_at(cache, "prefetch_hits"), "{ctx}");
            if budget == all {
                assert!(u64_at(cache, "warm_fills") > 0 && u64_at(cache, "misses") == 0, "{ctx}");
            } else {
                assert!(u64_at(cache, "misses") > 0, "{ctx}");
            }
        }
    }
}
