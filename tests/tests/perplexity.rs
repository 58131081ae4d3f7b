//! `stevedore perplexity` with the real binary: the same PPL as transformers
//! (`tests/fixtures/perplexity.json`, written by `make_perplexity.py` with the same chunking) on
//! the trained pydoc-moe's held-out text and on two random fixtures; the same PPL, bit for bit,
//! at every host-cache budget and however the chunks are batched; clear errors for bad inputs.

mod common;

use std::path::{Path, PathBuf};

use common::{copy_fixture, fixture_dir, stevedore, u64_at, PYDOC_MOE};
use serde_json::Value;

/// How far stevedore's PPL may be from transformers', relative, and each chunk's mean NLL, in
/// nats. Both read the same bf16 weights exactly and compute in f32, differing only in the order
/// of their sums, so logits agree to about 1e-6 (the reference tests allow 1e-4) and an NLL,
/// a logit minus a log-sum-exp, to the same order; measured: PPL within 4e-8 relative, chunks
/// within 7e-7 nats. A wrong chunk boundary, a missing BOS or a token scored off by one moves
/// a chunk by 1e-2 nats or more. Like the greedy references, this assumes no router near-tie
/// flips between the two computations (none does on these texts).
const PPL_RELATIVE: f64 = 1e-4;
const CHUNK_NLL: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn reference() -> Value {
    let path = fixtures().join("perplexity.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `perplexity --json` on `model` with `text` and the extra `flags`.
fn perplexity(model: &Path, text: &Path, flags: &[&str]) -> Value {
    let mut args: Vec<std::ffi::OsString> =
        vec!["perplexity".into(), "--model".into(), model.into(), "--text".into(), text.into()];
    args.extend(flags.iter().map(Into::into));
    args.push("--json".into());
    stevedore(args).json()
}

fn f64_at(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("`{key}` is not a number in {v}"))
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array of numbers, got {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap_or_else(|| panic!("expected a number, got {x}")))
        .collect()
}

#[test]
fn matches_transformers() {
    let reference = reference();
    let cases = reference["cases"].as_array().expect("perplexity.json has cases");
    assert!(cases.len() >= 3, "perplexity.json: expected pydoc-moe and random fixtures");
    for case in cases {
        let fixture = case["fixture"].as_str().unwrap();
        // A random fixture has no tokenizer: a copy gets the case's.
        let copy = case["tokenizer"].as_str().map(|t| {
            let tmp = copy_fixture(fixture);
            std::fs::copy(fixtures().join(t).join("tokenizer.json"), tmp.path().join("tokenizer.json"))
                .unwrap();
            tmp
        });
        let model = copy.as_ref().map_or_else(|| fixture_dir(fixture), |t| t.path().to_path_buf());
        let context = u64_at(case, "context").to_string();
        let mut flags = vec!["--context", &context];
        let limit = case["chunk_limit"].as_u64().map(|k| k.to_string());
        if let Some(k) = &limit {
            flags.extend(["--chunks", k]);
        }
        let text = fixtures().join(case["text"].as_str().unwrap());
        let out = perplexity(&model, &text, &flags);
        let what = format!("{fixture} at context {context}");
        for key in ["text_tokens", "context", "chunks", "tokens_scored"] {
            assert_eq!(out[key], case[key], "{what}: {key}");
        }
        assert_eq!(out["bos"], case["bos"], "{what}: the BOS the tokenizer adds");
        let (got, want) = (f64_at(&out, "ppl"), f64_at(case, "ppl"));
        let rel = (got - want).abs() / want;
        let chunk_diff = floats(&out["nll_per_chunk"])
            .iter()
            .zip(floats(&case["nll_per_chunk"]))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        eprintln!("{what}: PPL {got:.6} (transformers {want:.6}, relative {rel:.1e}); chunks within {chunk_diff:.1e}");
        assert!(rel <= PPL_RELATIVE, "{what}: PPL {got} against transformers' {want}");
        assert!(chunk_diff <= CHUNK_NLL, "{what}: a chunk's mean NLL is {chunk_diff} from transformers'");
        assert!((f64_at(&out, "nll_mean").exp() - got).abs() <= 1e-9 * got);
        assert!(f64_at(&out, "ppl_error") > 0.0);
        let cache = &out["stats"]["expert_cache"];
        assert!(u64_at(cache, "hits") + u64_at(cache, "misses") > 0, "{what}: expert cache stats: {cache}");
    }
}

/// pydoc-moe, first 12 chunks of its held-out text: every chunk's NLL, hence the PPL, is the same
/// bit for bit at host cache 100% and 30% (with misses), with the chunks sharing passes (two of
/// 256 tokens fill the default 512-row pass), one chunk a pass (`--max-batch 1`), and prefill
/// chunks of 37 rows that cut through every chunk (`engine.max_batch_tokens`).
#[test]
fn the_same_at_every_budget_and_batching() {
    let model = fixture_dir(PYDOC_MOE);
    let text = model.join("heldout.txt");
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("rows.toml");
    std::fs::write(&config, "[engine]\nmax_batch_tokens = 37\n").unwrap();
    let config = config.to_str().unwrap();
    let base = ["--chunks", "12"];
    let run = |flags: &[&str]| perplexity(&model, &text, &[&base[..], flags].concat());
    let full = run(&["--host-cache", "100%"]);
    assert_eq!(u64_at(&full, "chunks"), 12);
    assert!(u64_at(&full["stats"]["steps"], "max_batch_seen") > 1, "chunks shared passes: {}", full["stats"]);
    for (flags, what) in [
        (&["--host-cache", "30%"][..], "host cache 30%"),
        (&["--max-batch", "1"][..], "one chunk a pass"),
        (&["--config", config, "--policy", "lru", "--host-cache", "30%"][..], "37 rows a pass, LRU at 30%"),
    ] {
        let out = run(flags);
        assert_eq!(
            out["nll_per_chunk"], full["nll_per_chunk"],
            "{what}: chunk NLLs differ from host cache 100%"
        );
        assert_eq!(out["ppl"], full["ppl"], "{what}");
        let steps = &out["stats"]["steps"];
        match what {
            "one chunk a pass" => assert_eq!(u64_at(steps, "max_batch_seen"), 1),
            _ => assert!(
                u64_at(&out["stats"]["expert_cache"], "misses")
                    > u64_at(&full["stats"]["expert_cache"], "misses")
            ),
        }
    }
}

/// Without `--json`: llama.cpp's running PPL per chunk on stderr, `PPL = X +/- err` on stdout.
#[test]
fn prints_running_ppl_and_the_estimate() {
    let model = fixture_dir(PYDOC_MOE);
    let text = model.join("heldout.txt");
    let run = stevedore([
        "perplexity",
        "--model",
        model.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--context",
        "101",
        "--chunks",
        "12",
    ]);
    let stdout = run.ok();
    let case =
        &reference()["cases"].as_array().unwrap().iter().find(|c| c["context"] == 101).unwrap().clone();
    let ppl = format!("{:.4}", f64_at(case, "ppl"));
    assert!(stdout.starts_with(&format!("PPL = {ppl} +/- ")), "{stdout}");
    assert!(run.stderr.contains("[1]") && run.stderr.contains(&format!("[12]{ppl},")), "{}", run.stderr);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let model = fixture_dir(PYDOC_MOE);
    let m = model.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let at = |name: &str, body: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let missing = tmp.path().join("missing.txt");
    let missing = missing.to_str().unwrap();
    stevedore(["perplexity", "--model", m, "--text", missing]).err(&[missing, "No such file"]);
    let empty = at("empty.txt", " \n");
    stevedore(["perplexity", "--model", m, "--text", &empty]).err(&[&empty, "empty"]);
    // 4 words: 5 tokens with the BOS, against 256 for one chunk.
    let short = at("short.txt", "The import statement is");
    let run = stevedore(["perplexity", "--model", m, "--text", &short]);
    run.err(&[&short, "too short", "has 5 tokens with the BOS", "one chunk needs 256 (--context)"]);
    let heldout = model.join("heldout.txt");
    let heldout = heldout.to_str().unwrap();
    stevedore(["perplexity", "--model", m, "--text", heldout, "--context", "257"])
        .err(&["--context 257", "model's context of 256 positions (max_position_embeddings)"]);
    stevedore(["perplexity", "--model", m, "--text", heldout, "--chunks", "0"])
        .err(&["--chunks must be at least 1"]);
    let olmoe = fixture_dir("olmoe");
    stevedore(["perplexity", "--model", olmoe.to_str().unwrap(), "--text", heldout])
        .err(&["tokenizer.json: not found", "perplexity needs the model's tokenizer"]);
}
