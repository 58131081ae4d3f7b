//! The cache policies live: `stevedore generate --config FILE` with `lru`, `lfu` and
//! `predictive` (protection and prefetch steered by a routing predictor) gives transformers'
//! tokens on every fixture at every budget down to the minimum, prefetching on or off, within
//! the budget; the predictive policy really prefetches and some prefetches are used; the config
//! file sets budget and policy, the flags override it, and what the live engine cannot do is a
//! clear error naming the key.

mod common;

use std::path::{Path, PathBuf};

use common::{fixture_dir, generate_ids, ids, inspect, reference, stevedore, u64_at, FIXTURES, PYDOC_MOE};
use serde_json::Value;

/// The fixtures to run: the four random ones and the trained one.
fn fixtures() -> Vec<&'static str> {
    let mut v = FIXTURES.to_vec();
    v.push(PYDOC_MOE);
    v
}

/// Writes `text` as `name` in `dir` and returns its path.
fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

/// Budgets in bytes from everything cached down to the minimum (percentages of the experts'
/// cache bytes that fall below the minimum are left out).
fn budgets(info: &Value) -> Vec<u64> {
    let (all, min) = (u64_at(info, "expert_cache_bytes"), u64_at(info, "min_host_cache_bytes"));
    let mut v: Vec<u64> = [100.0, 75.0, 50.0, 25.0]
        .iter()
        .map(|p: &f64| (all as f64 * p / 100.0).round() as u64)
        .filter(|&b| b > min)
        .collect();
    v.push(min);
    v
}

/// The predictor settings of the tests' configs. The fixtures have 8 experts, so the default
/// prefetch budget (5% of the cache) is less than one expert; their random routing rarely
/// reaches the default prefetch lift; and protecting every predicted expert (the default
/// `protect_min_lift = 0`: with 8 experts, every one is a candidate) fills the protection cap
/// and leaves no room a prefetch may take. These let the policy prefetch.
const PREFETCHING: &str =
    "[predictor]\nprefetch_budget = \"50%\"\nprefetch_min_lift = 0.0\nprotect_min_lift = 1.0\n";

/// (label, policy the stats must name, config text).
fn configs() -> Vec<(&'static str, &'static str, String)> {
    vec![
        ("lru", "lru", "[cache]\npolicy = \"lru\"\n".into()),
        ("lfu", "lfu", "[cache]\npolicy = \"lfu\"\n".into()),
        ("predictive", "predictive", format!("[cache]\npolicy = \"predictive\"\n{PREFETCHING}")),
        (
            "predictive-no-prefetch",
            "predictive",
            "[cache]\npolicy = \"predictive\"\n[predictor]\nprefetch_depth = 0\n".into(),
        ),
    ]
}

#[test]
fn same_tokens_whatever_the_policy_budget_or_prefetch() {
    let tmp = tempfile::tempdir().unwrap();
    let configs: Vec<_> = configs()
        .into_iter()
        .map(|(label, policy, text)| {
            (label, policy, write_config(tmp.path(), &format!("{label}.toml"), &text))
        })
        .collect();
    let mut prefetched = 0;
    for name in fixtures() {
        let dir = fixture_dir(name);
        let info = inspect(&dir, &[]);
        let reference = reference(name);
        let before = prefetched;
        for (i, case) in reference.cases.iter().enumerate() {
            let mut requests = None;
            for budget in budgets(&info) {
                for (label, policy, config) in &configs {
                    let ctx = format!("{name} case {i} {label} budget {budget}");
                    let flags = ["--config", config.to_str().unwrap(), "--host-cache", &budget.to_string()];
                    let out = generate_ids(&dir, &case.prompt_ids, reference.max_new_tokens, &flags);
                    assert_eq!(ids(&out["generated_ids"]), case.generated_ids, "{ctx}: tokens differ");
                    let cache = &out["stats"]["expert_cache"];
                    assert_eq!(cache["policy"], *policy, "{ctx}: {cache}");
                    assert_eq!(u64_at(cache, "budget_bytes"), budget, "{ctx}: {cache}");
                    assert!(u64_at(cache, "peak_bytes") <= budget, "{ctx}: over budget: {cache}");
                    assert!(
                        u64_at(cache, "prefetch_hits") <= u64_at(cache, "prefetch_reads"),
                        "{ctx}: {cache}"
                    );
                    if *label == "predictive" {
                        prefetched += u64_at(cache, "prefetch_reads");
                    } else {
                        assert_eq!(u64_at(cache, "prefetch_reads"), 0, "{ctx}: prefetched: {cache}");
                    }
                    // The same tokens route to the same experts: only hits and misses trade.
                    let n = u64_at(cache, "hits") + u64_at(cache, "misses");
                    assert_eq!(*requests.get_or_insert(n), n, "{ctx}: expert requests differ: {cache}");
                }
            }
        }
        eprintln!("{name}: {} experts prefetched over all cases and budgets", prefetched - before);
    }
    // The invariant was checked with prefetches really happening (how many on each fixture
    // depends on its random routing).
    assert!(prefetched > 0, "the predictive runs never prefetched");
}

#[test]
fn predictive_prefetches_and_some_prefetches_are_used() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture_dir("olmoe");
    let config =
        write_config(tmp.path(), "p.toml", &format!("[tiers.host]\nbudget = \"50%\"\n{PREFETCHING}"));
    let prompt = [1, 2, 3, 4, 5];
    let out = generate_ids(&dir, &prompt, 48, &["--config", config.to_str().unwrap()]);
    let cache = &out["stats"]["expert_cache"];
    assert_eq!(cache["policy"], "predictive", "{cache}");
    assert!(u64_at(cache, "prefetch_reads") > 0, "nothing prefetched: {cache}");
    assert!(u64_at(cache, "prefetch_hits") > 0, "no prefetch was used: {cache}");
    let predictions = u64_at(&out["stats"]["forecast"], "predictions");
    // Per decode step one prediction at the token's start and one per MoE layer (3 of them);
    // one for the prompt, once all its layers are routed.
    assert_eq!(predictions, 1 + 4 * (ids(&out["generated_ids"]).len() as u64 - 1), "{}", out["stats"]);
    let lru = generate_ids(&dir, &prompt, 48, &["--config", config.to_str().unwrap(), "--policy", "lru"]);
    assert_eq!(lru["generated_ids"], out["generated_ids"]);
    assert!(lru["stats"]["forecast"].is_null());
}

#[test]
fn the_config_sets_budget_and_policy_and_flags_override_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture_dir("mixtral");
    let info = inspect(&dir, &[]);
    let all = u64_at(&info, "expert_cache_bytes");
    let config =
        write_config(tmp.path(), "c.toml", "[tiers.host]\nbudget = \"50%\"\n[cache]\npolicy = \"lfu\"\n");
    let config = config.to_str().unwrap();
    let run = |flags: &[&str]| generate_ids(&dir, &[1, 2, 3], 4, flags)["stats"].clone();

    let s = run(&["--config", config]);
    assert_eq!(s["expert_cache"]["policy"], "lfu");
    assert_eq!(u64_at(&s["expert_cache"], "budget_bytes"), (all as f64 * 0.5).round() as u64);
    assert!(s["forecast"].is_null());

    let min = u64_at(&info, "min_host_cache_bytes").to_string();
    let s = run(&["--config", config, "--policy", "predictive", "--host-cache", &min]);
    assert_eq!(s["expert_cache"]["policy"], "predictive");
    assert_eq!(u64_at(&s["expert_cache"], "budget_bytes").to_string(), min);
    assert_eq!(s["forecast"]["predictor"], "ensemble");

    // No config: the default config's policy (predictive, next-gate prediction blended with
    // the transition statistics), and the automatic budget unless given; an empty config file
    // is the default config.
    let s = run(&["--host-cache", "100%"]);
    assert_eq!(s["expert_cache"]["policy"], "predictive");
    assert_eq!(u64_at(&s["expert_cache"], "budget_bytes"), all);
    assert_eq!(s["forecast"]["predictor"], "ensemble");
    let empty = write_config(tmp.path(), "empty.toml", "");
    let s = run(&["--config", empty.to_str().unwrap()]);
    assert_eq!(s["expert_cache"]["policy"], "predictive");
    assert_eq!(u64_at(&s["expert_cache"], "budget_bytes"), (all as f64 * 0.25).round() as u64);
}

#[test]
fn what_the_live_engine_cannot_do_is_an_error_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture_dir("olmoe");
    let generate = |config: &Path, extra: &[&str]| {
        let mut args: Vec<String> =
            ["generate", "--model", dir.to_str().unwrap(), "--prompt-ids", "1,2"].map(str::to_owned).into();
        args.extend(["--config".into(), config.to_str().unwrap().into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        stevedore(args)
    };
    let cases = [
        ("split.toml", "[cache]\nsplit = \"per-layer\"\n", vec!["cache.split", "per-layer", "split.toml"]),
        ("typo.toml", "[cache]\npolcy = \"lru\"\n", vec!["unknown field `polcy`", "typo.toml"]),
        (
            "small.toml",
            "[tiers.host]\nbudget = 4096\n",
            vec!["tiers.host.budget", "below the minimum", "small.toml"],
        ),
        (
            "path.toml",
            "[predictor]\nkind = \"path\"\nmodel = \"absent.bin\"\n",
            vec!["predictor.model", "absent.bin"],
        ),
    ];
    for (file, text, needles) in cases {
        generate(&write_config(tmp.path(), file, text), &[]).err(&needles);
    }
    // An unknown policy on the command line is refused by the argument parser.
    let ok = write_config(tmp.path(), "ok.toml", "");
    let run = generate(&ok, &["--policy", "mru"]);
    assert!(
        run.code != Some(0) && run.stderr.contains("mru") && run.stderr.contains("lru"),
        "{}",
        run.stderr
    );
}
