//! The trained tiny model (`tests/fixtures/pydoc-moe/`, with tokenizer.json): text prompts are
//! tokenized as transformers' reference did, greedy ids match it, streamed text is the decoded
//! output, and realistic (non-random) routing gives the same tokens at the minimum cache budget.
//! The model is made by `tests/fixtures/train_tiny.py`.

mod common;

use std::path::PathBuf;

use common::{fixture_dir, ids, inspect, reference, stevedore, u64_at, Case, PYDOC_MOE};
use serde_json::Value;

fn model_dir() -> PathBuf {
    fixture_dir(PYDOC_MOE)
}

fn prompt(case: &Case) -> &str {
    case.prompt.as_deref().expect("pydoc-moe reference cases carry their prompt text")
}

fn generate_text(dir: &std::path::Path, text: &str, max_new_tokens: u64, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> =
        ["generate", "--model", dir.to_str().unwrap(), "--prompt", text, "--max-new-tokens"]
            .map(str::to_owned)
            .into();
    args.push(max_new_tokens.to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn prompt_text_matches_transformers() {
    let dir = model_dir();
    let reference = reference(PYDOC_MOE);
    for case in &reference.cases {
        let out: Value =
            stevedore(generate_text(&dir, prompt(case), reference.max_new_tokens, &["--json"])).json();
        assert_eq!(
            ids(&out["prompt_ids"]),
            case.prompt_ids,
            "{:?}: tokenization differs from the reference",
            prompt(case)
        );
        assert_eq!(
            ids(&out["generated_ids"]),
            case.generated_ids,
            "{:?}: greedy ids differ from transformers'",
            prompt(case)
        );
        let text =
            out["text"].as_str().unwrap_or_else(|| panic!("with a tokenizer, `text` is a string: {out}"));
        assert!(!text.trim().is_empty(), "{:?}: decoded text is empty: {out}", prompt(case));
    }
}

#[test]
fn streamed_text_is_the_decoded_output() {
    let dir = model_dir();
    let reference = reference(PYDOC_MOE);
    let case = &reference.cases[0];
    let json: Value =
        stevedore(generate_text(&dir, prompt(case), reference.max_new_tokens, &["--json"])).json();
    let streamed =
        stevedore(generate_text(&dir, prompt(case), reference.max_new_tokens, &[])).ok().to_owned();
    // Streaming ends with one newline after the generated text.
    assert_eq!(Some(streamed.as_str()), json["text"].as_str().map(|t| format!("{t}\n")).as_deref());
}

#[test]
fn minimum_budget_gives_the_same_tokens() {
    let dir = model_dir();
    let reference = reference(PYDOC_MOE);
    let min = u64_at(&inspect(&dir, &[]), "min_host_cache_bytes").to_string();
    for case in &reference.cases {
        let flags = ["--host-cache", &min, "--json"];
        let out: Value =
            stevedore(generate_text(&dir, prompt(case), reference.max_new_tokens, &flags)).json();
        assert_eq!(
            ids(&out["generated_ids"]),
            case.generated_ids,
            "{:?} at the minimum budget",
            prompt(case)
        );
        let cache = &out["stats"]["expert_cache"];
        assert!(u64_at(cache, "peak_bytes") <= u64_at(cache, "budget_bytes"), "{cache}");
    }
}
