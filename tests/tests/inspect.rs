//! `stevedore inspect` describes each fixture consistently with its config.json and with the
//! safetensors headers: dense + expert bytes add up to the files' tensor payload, experts are
//! all the same size, and the minimum cache is one MoE layer's active experts.

mod common;

use common::{
    fixture_dir, inspect, payload_bytes, safetensors_files, stevedore, u64_at, SafeTensors, FIXTURES,
};
use serde_json::Value;

/// MoE layers of each fixture, from tests/fixtures/README.md.
fn expected_moe_layers(name: &str) -> Vec<u64> {
    match name {
        "mixtral" | "olmoe" | "phimoe" => vec![0, 1, 2],
        "qwen2_moe" => vec![1, 3],
        "qwen3_moe" | "glm4_moe" | "deepseek_v3" | "deepseek_v2" => vec![1, 2],
        other => panic!("no expectation for fixture {other}"),
    }
}

/// Bytes of routed-expert tensors (`...experts.N...`; Qwen's `shared_expert` is dense), summed
/// over the headers of every shard.
fn header_expert_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for file in safetensors_files(dir) {
        let st = SafeTensors::read(&file);
        for name in st.names().iter().filter(|n| n.contains(".experts.")) {
            let (s, e) = st.offsets(name);
            total += e - s;
        }
    }
    total
}

fn config(name: &str) -> Value {
    let path = fixture_dir(name).join("config.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn json_is_consistent_with_config_and_headers() {
    for name in FIXTURES {
        let dir = fixture_dir(name);
        let cfg = config(name);
        let v = inspect(&dir, &[]);
        assert_eq!(v["architecture"], cfg["architectures"][0], "{name}: {v}");
        assert_eq!(v["layers"], cfg["num_hidden_layers"], "{name}: {v}");
        let moe_layers: Vec<u64> = common::ids(&v["moe_layers"]);
        assert_eq!(moe_layers, expected_moe_layers(name), "{name}: {v}");
        let experts_key = match name {
            "mixtral" | "phimoe" => "num_local_experts",
            "glm4_moe" | "deepseek_v3" | "deepseek_v2" => "n_routed_experts",
            _ => "num_experts",
        };
        assert_eq!(v["experts"], cfg[experts_key], "{name}: {v}");
        assert_eq!(v["top_k"], cfg["num_experts_per_tok"], "{name}: {v}");

        let (dense, experts) = (u64_at(&v, "dense_bytes"), u64_at(&v, "expert_bytes"));
        assert_eq!(
            dense + experts,
            payload_bytes(&dir),
            "{name}: dense + expert bytes != the files' tensor bytes: {v}"
        );
        assert_eq!(
            experts,
            header_expert_bytes(&dir),
            "{name}: expert bytes != the headers' expert tensors: {v}"
        );
        // In the cache each expert takes at least its tensor bytes (rounded up to aligned buffers).
        let (per_expert, all_cached) = (u64_at(&v, "bytes_per_expert"), u64_at(&v, "expert_cache_bytes"));
        let count = u64_at(&v, "experts") * moe_layers.len() as u64;
        assert!(all_cached >= experts, "{name}: experts take less room cached than on disk: {v}");
        assert!(per_expert * count >= all_cached, "{name}: bytes_per_expert is not the largest expert: {v}");
        assert_eq!(u64_at(&v, "min_host_cache_bytes"), per_expert * u64_at(&v, "top_k"), "{name}: {v}");
        assert!(
            v.get("host_cache").is_none_or(Value::is_null),
            "{name}: no --host-cache, no host_cache: {v}"
        );
    }
}

#[test]
fn json_says_what_fits_a_budget() {
    let dir = fixture_dir("qwen3_moe");
    let base = inspect(&dir, &[]);
    let (all_cached, per_expert) = (u64_at(&base, "expert_cache_bytes"), u64_at(&base, "bytes_per_expert"));
    let total = u64_at(&base, "experts") * base["moe_layers"].as_array().unwrap().len() as u64;
    for (flag, budget) in
        [("50%", all_cached / 2), ("100%", all_cached), ("1MiB", 1 << 20), ("10000", 10_000)]
    {
        let hc = &inspect(&dir, &["--host-cache", flag])["host_cache"];
        assert_eq!(u64_at(hc, "budget_bytes"), budget, "{flag}: {hc}");
        let fits = (budget / per_expert).min(total);
        assert_eq!(u64_at(hc, "experts"), fits, "{flag}: {hc}");
        let fraction = hc["fraction"].as_f64().unwrap();
        assert!((fraction - fits as f64 / total as f64).abs() < 1e-9, "{flag}: {hc}");
        assert_eq!(hc["valid"], budget >= u64_at(&base, "min_host_cache_bytes"), "{flag}: {hc}");
    }
}

#[test]
fn text_describes_the_model() {
    let dir = fixture_dir("qwen2_moe");
    let out = stevedore(["inspect", "--model", dir.to_str().unwrap()]).ok().to_owned();
    for needle in ["Qwen2MoeForCausalLM", "[1, 3]", "top-4", "shared expert"] {
        assert!(out.contains(needle), "inspect output lacks {needle:?}:\n{out}");
    }
    let small =
        stevedore(["inspect", "--model", dir.to_str().unwrap(), "--host-cache", "1KiB"]).ok().to_owned();
    assert!(small.contains("below the minimum"), "a 1 KiB budget is below one layer's experts:\n{small}");
}
