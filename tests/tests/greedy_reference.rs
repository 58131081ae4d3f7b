//! Greedy decoding with the real binary reproduces transformers' tokens for every fixture and
//! every prompt of its `reference.json` (including stopping right after EOS: mixtral's 20-token
//! prompt produces EOS at its 5th step), with the config as transformers 4.57 wrote it and as
//! 5.24 writes it, with and without `architectures`.

mod common;

use std::path::Path;

use common::{copy_fixture, fixture_dir, generate_ids, ids, reference, FIXTURES, PYDOC_MOE};

fn check_fixture(name: &str) {
    check_dir(name, &fixture_dir(name));
}

/// `dir` (fixture `name`'s checkpoint, its config possibly rewritten) against `name`'s reference.
fn check_dir(name: &str, dir: &Path) {
    let dir = dir.to_path_buf();
    let reference = reference(name);
    for (i, case) in reference.cases.iter().enumerate() {
        let out = generate_ids(&dir, &case.prompt_ids, reference.max_new_tokens, &[]);
        assert_eq!(ids(&out["prompt_ids"]), case.prompt_ids, "{name} case {i}: prompt ids echoed back");
        assert_eq!(
            ids(&out["generated_ids"]),
            case.generated_ids,
            "{name} case {i}: greedy ids differ from transformers'"
        );
        if !dir.join("tokenizer.json").exists() {
            assert!(out["text"].is_null(), "{name} has no tokenizer.json, so `text` must be null: {out}");
        }
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

#[test]
fn glm4_moe_matches_transformers() {
    check_fixture("glm4_moe");
}

#[test]
fn phimoe_matches_transformers() {
    check_fixture("phimoe");
}

#[test]
fn deepseek_v3_matches_transformers() {
    check_fixture("deepseek_v3");
}

#[test]
fn deepseek_v2_matches_transformers() {
    check_fixture("deepseek_v2");
}

/// `config.transformers-5.json` is each fixture's config as transformers 5.24 saves it
/// (`tests/fixtures/make_configs_5.py`, which also checks that transformers 5 reproduces the
/// reference under it): other spellings (Qwen3-MoE's `num_local_experts`), `rope_parameters`,
/// `layer_types`. The same tokens with it, and with `architectures` removed (the family then
/// comes from `model_type`, as in transformers).
#[test]
fn configs_as_transformers_5_writes_them() {
    for name in FIXTURES.iter().copied().chain([PYDOC_MOE]) {
        let tmp = copy_fixture(name);
        let config = tmp.path().join("config.json");
        let five = std::fs::read_to_string(tmp.path().join("config.transformers-5.json")).unwrap();
        std::fs::write(&config, &five).unwrap();
        check_dir(name, tmp.path());
        let mut v: serde_json::Value = serde_json::from_str(&five).unwrap();
        v.as_object_mut().unwrap().remove("architectures").expect("5.x writes architectures");
        std::fs::write(&config, v.to_string()).unwrap();
        check_dir(name, tmp.path());
    }
}
