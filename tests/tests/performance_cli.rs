//! The performance-facing command line: `stevedore bench`, `--threads`, `--warm-start`,
//! `--profile`, and the debug log's step and layer spans.

mod common;

use std::process::Command;

use common::{fixture_dir, generate_ids, ids, stevedore, u64_at, PYDOC_MOE};

const PROMPT: [u64; 6] = [5, 17, 300, 42, 9, 1000];

/// The same tokens whatever the thread count and warm start (the forward pass on one thread or
/// two, experts side by side or not, filled at start or on a miss).
#[test]
fn threads_and_warm_start_change_no_token() {
    let dir = fixture_dir(PYDOC_MOE);
    let base = generate_ids(&dir, &PROMPT, 24, &["--host-cache", "100%"]);
    let want = ids(&base["generated_ids"]);
    assert!(u64_at(&base["stats"]["expert_cache"], "warm_fills") > 0, "100% warms by default: {base}");
    for flags in [
        &["--host-cache", "100%", "--threads", "1"][..],
        &["--host-cache", "100%", "--warm-start", "off"],
        &["--host-cache", "50%", "--warm-start", "on"],
        &["--host-cache", "50%", "--threads", "3"],
    ] {
        let out = generate_ids(&dir, &PROMPT, 24, flags);
        assert_eq!(ids(&out["generated_ids"]), want, "{flags:?}");
        let cache = &out["stats"]["expert_cache"];
        let warm = u64_at(cache, "warm_fills");
        match flags[3] {
            "off" => assert_eq!(warm, 0, "{cache}"),
            "on" => {
                assert!(warm > 0 && u64_at(cache, "warm_bytes") <= u64_at(cache, "budget_bytes"), "{cache}")
            }
            _ => {}
        }
    }
    stevedore(["generate", "--model", dir.to_str().unwrap(), "--prompt-ids", "1", "--threads", "0"])
        .err(&["--threads must be at least 1"]);
    // A value clap refuses: its usage error (exit status 2) names the value and the choices.
    let bad = Command::new(env!("CARGO_BIN_EXE_stevedore-e2e"))
        .args(["generate", "--model", dir.to_str().unwrap(), "--prompt-ids", "1", "--warm-start", "maybe"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(bad.status.code() == Some(2) && err.contains("maybe") && err.contains("auto, on, off"), "{err}");
}

/// `--profile` reports every op of the forward pass with its time and calls.
#[test]
fn generate_profile_times_the_forward_pass() {
    let dir = fixture_dir(PYDOC_MOE);
    let out = generate_ids(&dir, &PROMPT, 8, &["--profile"]);
    let ops = out["stats"]["profile"].as_array().unwrap_or_else(|| panic!("no profile: {out}"));
    let op = |name: &str| ops.iter().find(|o| o["op"] == name).unwrap_or_else(|| panic!("{name}: {ops:?}"));
    for name in ["qkv_proj", "attention", "o_proj", "router", "experts", "lm_head"] {
        assert!(op(name)["seconds"].as_f64().unwrap() > 0.0, "{name}: {ops:?}");
    }
    // One LM head per forward pass: one for the prompt, one per decode step.
    assert_eq!(u64_at(op("lm_head"), "calls"), 8);
    let without = generate_ids(&dir, &PROMPT, 2, &[]);
    assert!(without["stats"]["profile"].is_null(), "{without}");
}

/// `stevedore bench` measures each test at each budget and sets the decode's weight bandwidth
/// against the memory bandwidth of the same run.
#[test]
fn bench_reports_prefill_and_decode_per_budget() {
    let dir = fixture_dir(PYDOC_MOE);
    let out = stevedore([
        "bench",
        "--model",
        dir.to_str().unwrap(),
        "--host-cache",
        "100%,50%",
        "--prompt",
        "4,20",
        "--decode",
        "5",
        "--repetitions",
        "2",
        "--profile",
        "--json",
    ])
    .json();
    assert!(out["memory_bandwidth_gb_s"].as_f64().unwrap() > 0.0, "{out}");
    let rows = out["rows"].as_array().unwrap();
    let tests: Vec<(&str, &str)> =
        rows.iter().map(|r| (r["budget"].as_str().unwrap(), r["test"].as_str().unwrap())).collect();
    assert_eq!(
        tests,
        [("100%", "pp4"), ("100%", "pp20"), ("100%", "tg5"), ("50%", "pp4"), ("50%", "pp20"), ("50%", "tg5")]
    );
    for r in rows {
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["runs"].as_array().unwrap().len(), 2, "{r}");
        let decode = r["test"].as_str().unwrap().starts_with("tg");
        assert_eq!(r["of_memory_bandwidth"].as_f64().is_some(), decode, "{r}");
    }
    let starts = out["starts"].as_array().unwrap();
    let info = common::inspect(&dir, &[]);
    let experts = u64_at(&info, "experts") * info["moe_layers"].as_array().unwrap().len() as u64;
    assert_eq!(u64_at(&starts[0], "warm_experts"), experts, "100% is filled at start: {out}");
    assert!(starts[0]["warm_fill_seconds"].as_f64().is_some(), "{out}");
    assert_eq!(u64_at(&starts[1], "warm_experts"), 0, "50% is not (auto): {out}");
    assert_eq!(out["profile"].as_array().unwrap().len(), 2, "{out}");
    let text = stevedore([
        "bench",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "3",
        "--decode",
        "2",
        "--repetitions",
        "1",
    ]);
    assert!(text.ok().contains("| 100% (") && text.ok().contains("| tg2 |"), "{}", text.ok());
    stevedore(["bench", "--model", dir.to_str().unwrap(), "--repetitions", "0"]).err(&["--repetitions"]);
}

/// `RUST_LOG=debug` prints a line for each forward pass and each decoder layer as it ends.
#[test]
fn debug_logs_show_step_and_layer_spans() {
    let dir = fixture_dir(PYDOC_MOE);
    let out = Command::new(env!("CARGO_BIN_EXE_stevedore-e2e"))
        .args(["generate", "--model", dir.to_str().unwrap(), "--prompt-ids", "5,6", "--max-new-tokens", "2"])
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    let closes = |name: &str| log.lines().filter(|l| l.contains(name) && l.contains("close")).count();
    let layers = u64_at(&common::inspect(&dir, &[]), "layers") as usize;
    assert_eq!(closes("step{"), 2, "{log}");
    assert_eq!(closes("layer{"), 2 * layers, "{log}");
}
