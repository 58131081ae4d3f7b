//! The expert cache changes how experts reach the forward pass, never what it computes: the
//! tokens are transformers' at every `--host-cache` budget down to the minimum (one MoE layer's
//! active experts), the cache never holds more than its budget, small budgets really do miss,
//! and a budget below the minimum is refused up front. Reading with O_DIRECT or through the page
//! cache gives the same tokens, and the stats say which one happened.

mod common;

use common::{
    copy_fixture, fixture_dir, fs_type, generate_ids, ids, inspect, reference, stevedore, supports_direct_io,
    u64_at,
};
use serde_json::Value;

/// `--host-cache` values from everything cached down to the minimum, with the bytes each means:
/// P% is P% of what all experts occupy in the cache (`expert_cache_bytes` of `inspect`, each
/// expert in its 4 KiB-aligned buffer), so that 100% holds every expert. A percentage that falls
/// below the minimum (qwen2_moe's 25%: top-4 of 8 experts, some buffers a block larger than
/// others) is left out; the minimum itself is always tried.
fn budgets(info: &Value) -> Vec<(String, u64)> {
    let (all_cached, min) = (u64_at(info, "expert_cache_bytes"), u64_at(info, "min_host_cache_bytes"));
    let mut v: Vec<(String, u64)> = [100.0, 50.0, 25.0]
        .iter()
        .map(|p: &f64| (format!("{p}%"), (all_cached as f64 * p / 100.0).round() as u64))
        .filter(|&(_, bytes)| bytes >= min)
        .collect();
    v.push((min.to_string(), min));
    v
}

fn check_budgets(name: &str) {
    let dir = fixture_dir(name);
    let info = inspect(&dir, &[]);
    let n_experts = u64_at(&info, "experts") * info["moe_layers"].as_array().unwrap().len() as u64;
    let reference = reference(name);
    for (i, case) in reference.cases.iter().enumerate() {
        // (budget, expert-cache stats) per budget, largest first.
        let mut runs: Vec<(String, Value)> = Vec::new();
        for (budget, want_budget) in budgets(&info) {
            let out =
                generate_ids(&dir, &case.prompt_ids, reference.max_new_tokens, &["--host-cache", &budget]);
            let ctx = format!("{name} case {i} --host-cache {budget}");
            assert_eq!(
                ids(&out["generated_ids"]),
                case.generated_ids,
                "{ctx}: tokens differ from transformers'"
            );
            let cache = out["stats"]["expert_cache"].clone();
            assert_eq!(
                u64_at(&cache, "budget_bytes"),
                want_budget,
                "{ctx}: budget resolved wrongly: {cache}"
            );
            let (peak, misses) = (u64_at(&cache, "peak_bytes"), u64_at(&cache, "misses"));
            assert!(
                peak <= want_budget,
                "{ctx}: cache peak {peak} exceeds its budget {want_budget}: {cache}"
            );
            // A budget that holds every expert is filled at start (warm start): no misses, and
            // every expert read once. Below it, experts are read on first use: misses.
            assert!(u64_at(&cache, "bytes_read") > 0, "{ctx}: no expert was read from disk: {cache}");
            if budget == "100%" {
                assert_eq!(misses, 0, "{ctx}: a warm start leaves no misses: {cache}");
                assert_eq!(
                    u64_at(&cache, "warm_bytes"),
                    want_budget,
                    "{ctx}: the warm start filled it: {cache}"
                );
            } else {
                assert!(misses > 0 && u64_at(&cache, "warm_fills") == 0, "{ctx}: {cache}");
            }
            runs.push((budget, cache));
        }
        let (_, full) = &runs[0];
        let (_, smallest) = runs.last().unwrap();
        let requests = |c: &Value| u64_at(c, "hits") + u64_at(c, "misses");
        for (budget, cache) in &runs {
            // The same tokens route to the same experts: only the hit/miss split may change.
            assert_eq!(
                requests(cache),
                requests(full),
                "{name} case {i} {budget}: expert requests differ from 100%'s"
            );
        }
        // With everything fitting, no expert is ever read twice.
        assert!(u64_at(full, "misses") <= n_experts, "{name} case {i}: 100% budget re-read experts: {full}");
        // At one layer's worth, each layer evicts the previous one's experts, so reuse misses.
        if case.generated_ids.len() > 1 {
            assert!(
                u64_at(smallest, "misses") > u64_at(full, "misses"),
                "{name} case {i}: the minimum budget should miss more than 100% (min {smallest}, full {full})"
            );
        }
    }
}

#[test]
fn mixtral_same_tokens_at_every_budget() {
    check_budgets("mixtral");
}

#[test]
fn qwen2_moe_same_tokens_at_every_budget() {
    check_budgets("qwen2_moe");
}

#[test]
fn qwen3_moe_same_tokens_at_every_budget() {
    check_budgets("qwen3_moe");
}

#[test]
fn olmoe_same_tokens_at_every_budget() {
    check_budgets("olmoe");
}

#[test]
fn budget_below_one_layers_active_experts_is_refused() {
    for name in ["mixtral", "qwen2_moe"] {
        let dir = fixture_dir(name);
        let min = u64_at(&inspect(&dir, &[]), "min_host_cache_bytes");
        let below = (min - 1).to_string();
        let run = stevedore([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            "5,6,7",
            "--host-cache",
            &below,
            "--json",
        ]);
        let stderr = run.err(&[]);
        // The message must say what the minimum is, in bytes or in the human-readable form.
        let human = stevedore_engine::size::human(min);
        assert!(
            stderr.contains(&min.to_string()) || stderr.contains(&human),
            "{name}: the error for a budget of {below} bytes does not state the minimum ({min} bytes = {human}):\n{stderr}"
        );
        assert!(
            run.stdout.is_empty(),
            "{name}: nothing should be generated below the minimum:\n{}",
            run.stdout
        );
        // inspect says the same thing without failing.
        let fit = inspect(&dir, &["--host-cache", &below]);
        assert_eq!(fit["host_cache"]["valid"], false, "{name}: inspect calls {below} bytes valid: {fit}");
        let fit = inspect(&dir, &["--host-cache", &min.to_string()]);
        assert_eq!(fit["host_cache"]["valid"], true, "{name}: inspect calls the minimum invalid: {fit}");
    }
}

#[test]
fn direct_and_buffered_reads_give_the_same_tokens() {
    for name in ["olmoe", "qwen2_moe"] {
        let reference = reference(name);
        let case = reference.cases.last().unwrap();
        let tmp = copy_fixture(name);
        let fstype = fs_type(tmp.path());
        let min = u64_at(&inspect(tmp.path(), &[]), "min_host_cache_bytes").to_string();
        // The minimum budget makes every layer read from disk again.
        let direct =
            generate_ids(tmp.path(), &case.prompt_ids, reference.max_new_tokens, &["--host-cache", &min]);
        let buffered = generate_ids(
            tmp.path(),
            &case.prompt_ids,
            reference.max_new_tokens,
            &["--host-cache", &min, "--buffered-io"],
        );
        for (how, out) in [("O_DIRECT", &direct), ("buffered", &buffered)] {
            assert_eq!(
                ids(&out["generated_ids"]),
                case.generated_ids,
                "{name} {how}: tokens differ from transformers'"
            );
        }
        assert_eq!(
            buffered["stats"]["expert_cache"]["direct_io"], false,
            "{name}: --buffered-io must report buffered reads"
        );
        match fstype.as_deref() {
            Some(t) if supports_direct_io(t) => assert_eq!(
                direct["stats"]["expert_cache"]["direct_io"],
                true,
                "{name}: {} is on {t}, which supports O_DIRECT, yet the reads were buffered",
                tmp.path().display()
            ),
            other => eprintln!(
                "note: {} is on {other:?}; not asserting that O_DIRECT was used (direct_io = {})",
                tmp.path().display(),
                direct["stats"]["expert_cache"]["direct_io"]
            ),
        }
    }
}
