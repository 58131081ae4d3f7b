//! Whole models against Hugging Face transformers: greedy ids and top-5 logits per step, from
//! `tests/fixtures/*/reference.json` (made by `tests/fixtures/make_fixtures.py`), with every
//! expert read in place (`MappedExperts`). The streamed store is checked against the same
//! references end to end in `tests/`.

mod common;

use common::{argmax, fixture};
use serde_json::Value;
use stevedore_models::{Batch, KvPool, Logits, MappedExperts, Model};

/// Largest allowed |ours - transformers| for a logit, relative to max(1, |logit|). Both sides
/// compute in f32 from the same bf16 weights; only summation order differs.
const LOGIT_TOL: f32 = 1e-4;

fn check(name: &str) {
    let dir = fixture(name);
    let model = Model::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let experts = MappedExperts::new(&model);
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let max_new = reference["max_new_tokens"].as_u64().unwrap() as usize;
    let mut worst = 0.0f32;
    for case in reference["cases"].as_array().unwrap() {
        let ids =
            |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
        let prompt = ids(&case["prompt_ids"]);
        let expected = ids(&case["generated_ids"]);
        let positions = prompt.len() + max_new;
        let mut kv = KvPool::new(&model.config, KvPool::bytes_for(&model.config, 16, positions), 16).unwrap();
        kv.allocate(0, positions).unwrap();
        let run = |kv: &mut KvPool, pos: usize, tokens: &[u32]| {
            let mut batch = Batch::new();
            batch.push(0, pos, tokens, Logits::Last);
            let out = model.forward(&batch, kv, &experts).unwrap();
            assert!(out.failed.is_empty());
            out.logits
        };
        let mut logits = run(&mut kv, 0, &prompt);
        let mut got = Vec::new();
        for (step, s) in case["steps"].as_array().unwrap().iter().enumerate() {
            for (id, want) in ids(&s["top5_ids"]).iter().zip(s["top5_logits"].as_array().unwrap()) {
                let want = want.as_f64().unwrap() as f32;
                let err = (logits[*id as usize] - want).abs() / want.abs().max(1.0);
                worst = worst.max(err);
                assert!(
                    err <= LOGIT_TOL,
                    "{name} prompt {prompt:?} step {step}: logit of {id} is {} vs {want}",
                    logits[*id as usize]
                );
            }
            let next = argmax(&logits);
            got.push(next);
            if got.len() == expected.len() {
                break;
            }
            logits = run(&mut kv, prompt.len() + got.len() - 1, &[next]);
        }
        assert_eq!(got, expected, "{name}: greedy ids for prompt {prompt:?}");
    }
    println!("{name}: worst relative logit error {worst:.2e}");
}

#[test]
fn mixtral_matches_transformers() {
    check("mixtral");
}

#[test]
fn qwen2_moe_matches_transformers() {
    check("qwen2_moe");
}

#[test]
fn qwen3_moe_matches_transformers() {
    check("qwen3_moe");
}

#[test]
fn olmoe_matches_transformers() {
    check("olmoe");
}

#[test]
fn glm4_moe_matches_transformers() {
    check("glm4_moe");
}

#[test]
fn phimoe_matches_transformers() {
    check("phimoe");
}

#[test]
fn deepseek_v3_matches_transformers() {
    check("deepseek_v3");
}

#[test]
fn deepseek_v2_matches_transformers() {
    check("deepseek_v2");
}

#[test]
fn trained_pydoc_moe_matches_transformers() {
    check("pydoc-moe");
}
