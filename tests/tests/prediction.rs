//! Next-gate prediction live: each MoE layer applies the routers of the layers ahead to its
//! hidden state, the forecaster scores those predictions against the routing that follows, and
//! none of it may change a token.

mod common;

use common::*;
use serde_json::Value;

/// The gate predictor alone, estimating from `input`, prefetching as far as measured.
fn gate_config(dir: &std::path::Path, input: &str) -> std::path::PathBuf {
    let path = dir.join(format!("gate-{input}.toml"));
    let text = format!(
        "[cache]\npolicy = \"predictive\"\n[predictor]\nkind = \"gate\"\nensemble = {{}}\ngate_input = \"{input}\"\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn recall_at(stats: &Value, distance: usize) -> (f64, u64) {
    let d = &stats["forecast"]["by_distance"][distance - 1];
    (d["recall"].as_f64().unwrap(), u64_at(d, "routed"))
}

/// Floors on the live next-layer recall@top-k of the gate (post-attention estimates, 60 decode
/// tokens at the smallest budget: one layer's experts), set below what was measured: pydoc-moe (trained, 4 layers
/// of width 128) 0.65-0.68, the random fixtures 0.69-0.75, phimoe 0.63, deepseek_v3 0.50, deepseek_v2 0.57, glm4_moe 0.63 (their estimates apply the
/// group-limited choice too: ranking by the biased scores alone gave 0.53). Small models move their hidden
/// state a lot per layer; the 16-layer, 1024-wide bench checkpoint reaches 0.97 (README).
const FLOORS: [(&str, f64); 9] = [
    ("pydoc-moe", 0.60),
    ("mixtral", 0.55),
    ("olmoe", 0.55),
    ("qwen3_moe", 0.55),
    ("qwen2_moe", 0.55),
    ("glm4_moe", 0.55),
    ("phimoe", 0.55),
    ("deepseek_v3", 0.45),
    ("deepseek_v2", 0.50),
];

#[test]
fn next_gate_recall_is_measured_live_and_never_changes_a_token() {
    let tmp = tempfile::tempdir().unwrap();
    let prompt = [5, 6, 7, 8];
    let new = 60;
    for (name, floor) in FLOORS {
        let dir = fixture_dir(name);
        let info = inspect(&dir, &[]);
        let (min, all) = (u64_at(&info, "min_host_cache_bytes"), u64_at(&info, "expert_cache_bytes"));
        let reference =
            ids(&generate_ids(&dir, &prompt, new, &["--policy", "lru", "--host-cache", "100%"])
                ["generated_ids"]);
        for input in ["post_attention", "layer_input"] {
            let config = gate_config(tmp.path(), input);
            // The middle budget holds at least three layers' experts (room to prefetch beside
            // the layer computing and the next layers' protected ones) and not all of them.
            let middle = (3 * min).max((min + all) / 2).min(all - 1);
            for budget in [min, middle, all] {
                let flags = ["--config", config.to_str().unwrap(), "--host-cache", &budget.to_string()];
                let out = generate_ids(&dir, &prompt, new, &flags);
                let ctx = format!("{name} {input} at {budget} of {all} bytes");
                assert_eq!(ids(&out["generated_ids"]), reference, "{ctx}: prediction changed the tokens");
                let stats = &out["stats"];
                assert_eq!(stats["forecast"]["predictor"], "gate", "{ctx}");
                let (recall, routed) = recall_at(stats, 1);
                // Every decode token's layers after the first are scored.
                assert!(routed >= (new - 1) * 2, "{ctx}: only {routed} experts scored");
                if input == "post_attention" && budget == min {
                    assert!(recall >= floor, "{ctx}: next-layer recall {recall:.3} below {floor}");
                }
                // With room beyond one layer's experts, predictions are prefetched and used, as
                // far ahead as the measured horizon says.
                if input == "post_attention" && budget == middle {
                    let cache = &stats["expert_cache"];
                    assert!(u64_at(cache, "prefetch_hits") > 0, "{ctx}: no prefetch was used: {cache}");
                    let h = &stats["horizon"];
                    assert!(u64_at(h, "layers") >= 1 && h["bandwidth"].as_f64().unwrap() > 0.0, "{ctx}: {h}");
                }
            }
        }
    }
}
