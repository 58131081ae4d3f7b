//! The engine in-process on the committed fixtures: a failed expert read fails only the
//! sequences that needed it and the engine keeps serving; a cancelled request frees its KV
//! blocks at once; requests the model cannot run are refused before they run.

use std::path::Path;

use serde_json::{json, Map, Value};

use super::*;
use crate::config::{PredictorConfig, WarmStart};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

fn config(kv_cache: u64) -> EngineConfig {
    EngineConfig {
        host_cache: Some(Size::Percent(100.0)),
        policy: PolicyKind::Lru,
        predictor: PredictorConfig::default(),
        kv_cache,
        max_batch: 32,
        max_batch_tokens: 512,
        force_buffered: false,
        readers: 1,
        trace: None,
        schedule: Schedule::Fcfs,
        warm_start: WarmStart::Off,
        precision: Default::default(),
        resident_bias: 0.0,
    }
}

fn greedy(prompt_ids: Vec<u32>, max_new_tokens: usize) -> Request {
    let sampling = SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 };
    Request { prompt_ids, max_new_tokens, sampling, prompt_logprobs: false }
}

/// Splits a single-file checkpoint into two shards, the second holding only the tensors whose
/// names contain `moved`; returns the second shard's path and the offset in it where `cut` starts.
fn split_checkpoint(src: &Path, dst: &Path, moved: &str, cut: &str) -> (std::path::PathBuf, u64) {
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    names.sort_by_key(|k| header[*k]["data_offsets"][0].as_u64().unwrap());
    let (mut cut_at, mut weight_map) = (0, Map::new());
    let mut out = Vec::new();
    for (file, keep) in [("a.safetensors", false), ("b.safetensors", true)] {
        let (mut h, mut body) = (Map::new(), Vec::new());
        for name in names.iter().filter(|k| k.contains(moved) == keep) {
            let e = &header[*name];
            let (s, t) = (
                e["data_offsets"][0].as_u64().unwrap() as usize,
                e["data_offsets"][1].as_u64().unwrap() as usize,
            );
            let start = body.len();
            if name.as_str() == cut {
                cut_at = start as u64;
            }
            body.extend_from_slice(&data[s..t]);
            h.insert(
                (*name).clone(),
                json!({"dtype": e["dtype"], "shape": e["shape"], "data_offsets": [start, body.len()]}),
            );
            weight_map.insert((*name).clone(), json!(file));
        }
        let mut json = serde_json::to_vec(&h).unwrap();
        json.resize(json.len().next_multiple_of(8), b' ');
        let mut file_bytes = (json.len() as u64).to_le_bytes().to_vec();
        file_bytes.extend_from_slice(&json);
        let header_len = file_bytes.len() as u64;
        file_bytes.extend_from_slice(&body);
        std::fs::write(dst.join(file), file_bytes).unwrap();
        if keep {
            cut_at += header_len;
        }
        out.push(dst.join(file));
    }
    let index = json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dst.join("model.safetensors.index.json"), index.to_string()).unwrap();
    (out.pop().unwrap(), cut_at)
}

/// Layer 2's expert 7 cannot be read (its bytes were cut off the shard after the engine
/// started): the sequences routed to it fail with the file and range in the error, the others
/// in the same forward passes finish with exactly their usual tokens, and the engine goes on.
#[test]
fn a_failed_expert_read_fails_only_the_sequences_that_needed_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (shard, cut) = split_checkpoint(
        &fixture("olmoe"),
        tmp.path(),
        "layers.2.mlp.experts",
        "model.layers.2.mlp.experts.7.down_proj.weight",
    );
    let reference = Engine::build(&fixture("olmoe"), &config(1 << 20)).unwrap();
    let engine = Engine::build(tmp.path(), &config(1 << 20)).unwrap();
    std::fs::OpenOptions::new().write(true).open(&shard).unwrap().set_len(cut).unwrap();

    let requests: Vec<Request> = (3..19).map(|t| greedy(vec![t, (t * 7) % 300 + 3], 4)).collect();
    let handles: Vec<RequestHandle> = requests.iter().map(|r| engine.submit(r.clone()).unwrap()).collect();
    let (mut ok, mut failed) = (0, 0);
    for (r, h) in requests.iter().zip(handles) {
        match h.wait() {
            Ok(c) => {
                ok += 1;
                let want = reference.submit(r.clone()).unwrap().wait().unwrap();
                assert_eq!(c.generated_ids, want.generated_ids, "prompt {:?}", r.prompt_ids);
            }
            Err(EngineError::Failed(msg)) => {
                failed += 1;
                assert!(
                    msg.starts_with("reading layer 2 expert 7: ")
                        && msg.contains("b.safetensors")
                        && msg.contains("truncated"),
                    "{msg}"
                );
            }
            Err(e) => panic!("{e}"),
        }
    }
    eprintln!("{ok} finished, {failed} failed");
    assert!(ok > 0 && failed > 0, "{ok} finished, {failed} failed: the test needs both");
    let stats = engine.stats();
    assert_eq!((stats.steps.requests_finished, stats.steps.requests_failed), (ok, failed));
    // Still serving: a prompt that avoids the broken expert runs after the failures.
    let after = requests.iter().find_map(|r| engine.submit(r.clone()).unwrap().wait().ok());
    assert!(after.is_some());
}

/// A request dropped mid-way leaves the batch and frees its blocks: a request needing the whole
/// KV cache then runs.
#[test]
fn a_cancelled_request_frees_its_kv_blocks() {
    let dir = fixture("pydoc-moe");
    let loaded = Loaded::load(&dir).unwrap();
    let kv = loaded.kv_bytes_for([200]);
    let engine = loaded.start(&config(kv)).unwrap();
    let (tx, events) = crossbeam_channel::unbounded();
    let long = engine.submit_to(greedy(vec![1, 547, 1114, 1239], 196), &tx).unwrap();
    for _ in 0..3 {
        assert!(matches!(events.recv().unwrap(), (id, Event::Token { .. }) if id == long.id()));
    }
    // Waits: the KV cache is full.
    let next = engine.submit(greedy(vec![1, 2, 3, 4], 196)).unwrap();
    let id = long.id();
    long.cancel();
    // The owner hears of it, after any tokens already on their way.
    let last = events.iter().find(|(i, e)| *i == id && !matches!(e, Event::Token { .. })).unwrap();
    assert!(matches!(&last.1, Event::Failed(m) if m == "the request was cancelled"), "{last:?}");
    let c = next.wait().unwrap();
    assert_eq!(c.generated_ids.len(), 196);
    let stats = engine.finish().unwrap();
    assert_eq!(stats.steps.max_batch_seen, 1);
    assert_eq!((stats.steps.requests_cancelled, stats.steps.requests_finished), (1, 1));
}

#[test]
fn requests_the_model_cannot_run_are_refused_up_front() {
    let engine = Engine::build(&fixture("pydoc-moe"), &config(1 << 20)).unwrap();
    let err = |r: Request| engine.submit(r).err().unwrap().to_string();
    assert_eq!(err(greedy(vec![], 4)), "the prompt is empty");
    assert!(
        err(greedy(vec![1, 4096], 4)).contains("prompt token id 4096 is outside the vocabulary (4096 ids)")
    );
    assert!(err(greedy(vec![1, 2], 255)).contains("exceed the model's context of 256 positions"));
    // A KV cache larger than memory is refused before anything is allocated.
    let err = Engine::build(&fixture("pydoc-moe"), &config(u64::MAX / 2)).err().unwrap().to_string();
    assert!(err.contains("is more than the") && err.contains("of memory available"), "{err}");
    // No new tokens: finished at once, without running the model.
    let c = engine.submit(greedy(vec![1, 2], 0)).unwrap().wait().unwrap();
    assert!(c.generated_ids.is_empty());
    assert_eq!(engine.stats().steps.steps, 0);
}

fn scored(prompt_ids: Vec<u32>, max_new_tokens: usize) -> Request {
    Request { prompt_logprobs: true, ..greedy(prompt_ids, max_new_tokens) }
}

/// Prompts of lengths 1 to 250 (some longer than a prefill chunk of 37 rows, or several) in
/// pydoc-moe's vocabulary.
fn prompts() -> Vec<Vec<u32>> {
    [1usize, 2, 5, 37, 38, 100, 200, 250]
        .iter()
        .enumerate()
        .map(|(k, &len)| {
            (0..len as u32)
                .map(|i| 2 + i.wrapping_mul(2654435761).wrapping_add(k as u32 * 97) % 4094)
                .collect()
        })
        .collect()
}

/// Prompt log-probabilities are a property of the sequence alone: the same, bit for bit, for
/// each prompt run alone in one pass and for all of them sharing passes in chunks of 37 rows;
/// asking for them changes none of the generated tokens; a score-only request (no new tokens)
/// runs the model and finishes with its prompt's log-probabilities and nothing generated.
#[test]
fn prompt_logprobs_do_not_depend_on_the_batch_or_the_chunks() {
    let dir = fixture("pydoc-moe");
    let kv = Loaded::load(&dir).unwrap().kv_bytes_for(prompts().iter().map(|p| p.len() + 4));
    let alone_engine = Engine::build(&dir, &EngineConfig { max_batch: 1, ..config(kv) }).unwrap();
    let alone: Vec<Completion> =
        prompts().into_iter().map(|p| alone_engine.submit(scored(p, 0)).unwrap().wait().unwrap()).collect();
    assert_eq!(alone_engine.stats().steps.generated_tokens, 0);
    assert!(alone_engine.stats().steps.steps >= prompts().len() as u64);
    for (p, c) in prompts().iter().zip(&alone) {
        let lp = c.prompt_logprobs.as_ref().expect("asked for");
        assert_eq!(lp.len(), p.len() - 1);
        assert!(lp.iter().all(|&x| x.is_finite() && x <= 0.0), "{lp:?}");
        assert!(c.generated_ids.is_empty());
        assert_eq!(c.finish_reason, FinishReason::Length);
    }

    let shared = Engine::build(&dir, &EngineConfig { max_batch_tokens: 37, ..config(kv) }).unwrap();
    let handles: Vec<RequestHandle> = prompts()
        .into_iter()
        .flat_map(|p| [scored(p.clone(), 0), scored(p.clone(), 4), greedy(p, 4)])
        .map(|r| shared.submit(r).unwrap())
        .collect();
    let mut done = handles.into_iter().map(|h| h.wait().unwrap());
    for a in &alone {
        let (score_only, with_tokens, plain) =
            (done.next().unwrap(), done.next().unwrap(), done.next().unwrap());
        assert_eq!(score_only.prompt_logprobs, a.prompt_logprobs);
        assert_eq!(with_tokens.prompt_logprobs, a.prompt_logprobs);
        assert_eq!(plain.prompt_logprobs, None);
        assert_eq!(with_tokens.generated_ids, plain.generated_ids);
        assert!(!plain.generated_ids.is_empty());
    }
    assert!(shared.stats().steps.max_batch_seen > 1);
}

/// Scoring a prompt and its greedy continuation: each continuation token was the most likely
/// one, so its log-probability is at least ln(1/vocab), and the prompt part equals the prompt
/// scored alone.
#[test]
fn prompt_logprobs_of_a_greedy_continuation() {
    let engine = Engine::build(&fixture("pydoc-moe"), &config(1 << 22)).unwrap();
    let prompt = vec![1, 547, 1114, 1239];
    let c = engine.submit(greedy(prompt.clone(), 20)).unwrap().wait().unwrap();
    let all: Vec<u32> = prompt.iter().chain(&c.generated_ids).copied().collect();
    let lp = engine.submit(scored(all, 0)).unwrap().wait().unwrap().prompt_logprobs.unwrap();
    let floor = -(4096f32.ln());
    assert!(lp[prompt.len() - 1..].iter().all(|&x| x >= floor), "{lp:?}");
    let alone = engine.submit(scored(prompt.clone(), 0)).unwrap().wait().unwrap().prompt_logprobs.unwrap();
    assert_eq!(alone[..], lp[..prompt.len() - 1]);
}
