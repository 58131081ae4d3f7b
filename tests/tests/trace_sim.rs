//! Routing traces end to end: `generate --trace` records every computed token's routing, and
//! `simulate` replays the file through the cache policies with expert sizes from the model.

mod common;

use common::{fixture_dir, generate_ids, stevedore};
use serde_json::Value;

#[test]
fn generated_trace_replays_in_the_simulator() {
    let dir = fixture_dir("olmoe");
    let tmp = tempfile::tempdir().unwrap();
    let trace = tmp.path().join("run.jsonl");
    let prompt = [5u64, 6, 7, 8];
    let out = generate_ids(&dir, &prompt, 6, &["--trace", trace.to_str().unwrap()]);
    let generated: Vec<u64> =
        out["generated_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();

    // Header, then one line per token that went through the model: the prompt and every
    // generated token but the last (which is never fed back).
    let text = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(lines[0]["num_experts"], config["num_experts"]);
    assert_eq!(lines[0]["top_k"], config["num_experts_per_tok"]);
    let fed: Vec<u64> = prompt.iter().chain(&generated[..generated.len() - 1]).copied().collect();
    let tokens = &lines[1..];
    assert_eq!(tokens.len(), fed.len());
    for (i, (t, id)) in tokens.iter().zip(&fed).enumerate() {
        assert_eq!(t["token_id"].as_u64(), Some(*id));
        assert_eq!(t["pos"].as_u64(), Some(i as u64));
        assert_eq!(t["phase"], if i < prompt.len() { "prefill" } else { "decode" });
        let layers = t["experts"].as_array().unwrap();
        assert_eq!(layers.len(), config["num_hidden_layers"].as_u64().unwrap() as usize);
        assert!(layers.iter().all(|l| l.as_array().unwrap().len() == 2));
    }

    let sim = stevedore([
        "simulate",
        "--trace",
        trace.to_str().unwrap(),
        "--model",
        dir.to_str().unwrap(),
        "--capacity",
        "25%,100%",
        "--json",
    ])
    .json();
    assert_eq!(sim["tokens"].as_u64(), Some(fed.len() as u64));
    let caps = sim["capacities"].as_array().unwrap();
    for name in ["lru", "lfu", "predictive", "belady"] {
        let small = caps[0]["policies"][name]["hit_rate"].as_f64().unwrap();
        let full = caps[1]["policies"][name]["hit_rate"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&small) && small <= full, "{name}: {small} vs {full}");
        // Belady bounds every replacement-only policy.
        if name != "predictive" {
            assert!(small <= caps[0]["policies"]["belady"]["hit_rate"].as_f64().unwrap() + 1e-12);
        }
    }
}

#[test]
fn printed_default_config_is_accepted_by_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("stevedore.toml");
    std::fs::write(&cfg, stevedore(["config", "--print-default"]).ok()).unwrap();
    let dir = fixture_dir("mixtral");
    let out = generate_ids(&dir, &[424], 4, &["--config", cfg.to_str().unwrap()]);
    assert_eq!(out["stats"]["expert_cache"]["policy"], "predictive");

    std::fs::write(&cfg, "[cache]\npolcy = \"lru\"\n").unwrap();
    stevedore([
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "1",
        "--config",
        cfg.to_str().unwrap(),
    ])
    .err(&["stevedore.toml", "polcy"]);
}
