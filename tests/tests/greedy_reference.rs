//! Greedy decoding with the real binary reproduces transformers' tokens for every fixture and
//! every prompt of its `reference.json` (including stopping right after EOS: mixtral's 20-token
//! prompt produces EOS at its 5th step).

mod common;

use common::{fixture_dir, generate_ids, ids, reference};

fn check_fixture(name: &str) {
    let dir = fixture_dir(name);
    let reference = reference(name);
    for (i, case) in reference.cases.iter().enumerate() {
        let out = generate_ids(&dir, &case.prompt_ids, reference.max_new_tokens, &[]);
        assert_eq!(ids(&out["prompt_ids"]), case.prompt_ids, "{name} case {i}: prompt ids echoed back");
        assert_eq!(
            ids(&out["generated_ids"]),
            case.generated_ids,
            "{name} case {i}: greedy ids differ from transformers'"
        );
        assert!(out["text"].is_null(), "{name} has no tokenizer.json, so `text` must be null: {out}");
        let stats = &out["stats"];
        for key in ["prefill_tokens_per_s", "decode_tokens_per_s"] {
            assert!(stats[key].as_f64().is_some_and(|v| v >= 0.0), "{name}: stats.{key} missing: {stats}");
        }
        assert!(
            stats["peak_rss_bytes"].as_u64().is_some_and(|v| v > 0),
            "{name}: stats.peak_rss_bytes: {stats}"
        );
    }
}

#[test]
fn mixtral_matches_transformers() {
    check_fixture("mixtral");
}

#[test]
fn mixtral_stops_after_eos() {
    // The reference's 20-token case ends in EOS before max_new_tokens; the binary must too, and
    // asking for more tokens must not carry on past it.
    let reference = reference("mixtral");
    let case = reference.cases.iter().find(|c| (c.generated_ids.len() as u64) < reference.max_new_tokens);
    let case = case.expect("mixtral's reference has a case that stops at EOS");
    let out = generate_ids(&fixture_dir("mixtral"), &case.prompt_ids, 40, &[]);
    assert_eq!(ids(&out["generated_ids"]), case.generated_ids);
}

#[test]
fn qwen2_moe_matches_transformers() {
    // Also the sharded fixture: four files and model.safetensors.index.json.
    check_fixture("qwen2_moe");
}

#[test]
fn qwen3_moe_matches_transformers() {
    check_fixture("qwen3_moe");
}

#[test]
fn olmoe_matches_transformers() {
    check_fixture("olmoe");
}
