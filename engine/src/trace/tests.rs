use std::io::Write;
use std::path::{Path, PathBuf};

use super::*;

/// The shared real traces (`../shared/traces` from the repo root), or `None` after saying
/// `skipped: ...` on the terminal. Written straight to stderr, past the test harness's capture,
/// so that a run without the traces shows which tests checked nothing.
pub(crate) fn shared_traces() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces");
    if dir.is_dir() {
        return Some(dir);
    }
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    let _ = writeln!(std::io::stderr(), "skipped: {test}: no shared traces at {}", dir.display());
    None
}

fn meta() -> TraceMeta {
    TraceMeta { model: "tiny".into(), num_experts: 4, top_k: 2, layer_ids: vec![1, 3] }
}

fn token(seq: u64, pos: u32, phase: Phase, layers: Vec<Option<(Vec<u32>, Vec<f32>)>>) -> TokenRouting {
    TokenRouting {
        ahead: Vec::new(),
        horizon: None,
        seq,
        pos,
        step: None,
        token_id: if pos < 4 { Some(pos * 10) } else { None },
        phase,
        layers: layers
            .into_iter()
            .map(|l| l.map(|(experts, weights)| LayerChoice { experts, weights }))
            .collect(),
    }
}

fn sample() -> Trace {
    Trace {
        meta: meta(),
        tokens: vec![
            token(
                0,
                0,
                Phase::Prefill,
                vec![Some((vec![1, 2], vec![0.6, 0.4])), Some((vec![0, 3], vec![0.1, 1e-7]))],
            ),
            token(0, 1, Phase::Decode, vec![None, Some((vec![2, 1], vec![]))]),
            TokenRouting {
                step: Some(3),
                ahead: vec![
                    Foreseen { at: None, layer: 0, experts: vec![3], probs: vec![0.75] },
                    Foreseen { at: Some(0), layer: 1, experts: vec![2, 0, 3], probs: vec![0.5, 0.25, 1e-3] },
                ],
                horizon: Some(Horizon { layers: 2, bytes: 1 << 40 }),
                ..token(7, 4, Phase::Decode, vec![Some((vec![3, 0], vec![0.333_333_34, 0.666_666_7])), None])
            },
        ],
    }
}

#[test]
fn round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.jsonl");
    let trace = sample();
    write(&path, &trace).unwrap();
    assert_eq!(read(&path).unwrap(), trace);
    assert_eq!(detect(&path).unwrap(), Format::Stevedore);
    assert_eq!(load(&path).unwrap(), trace);
}

#[test]
fn writer_rejects_tokens_that_do_not_match_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.jsonl");
    let mut w = TraceWriter::create(&path, &meta()).unwrap();
    w.write_token(&sample().tokens[0]).unwrap();
    let cases = [
        (vec![Some((vec![1, 4], vec![]))], "token has 1 layers"),
        (vec![Some((vec![1, 4], vec![])), None], "expert 4 out of range"),
        (vec![Some((vec![1, 1], vec![])), None], "expert 1 chosen twice"),
        (vec![None, Some((vec![1], vec![0.5, 0.5]))], "2 weights for 1 experts"),
        (vec![None, Some((vec![1], vec![f32::NAN]))], "not finite"),
    ];
    for (layers, want) in cases {
        let err = w.write_token(&token(0, 2, Phase::Decode, layers)).unwrap_err().to_string();
        assert!(err.contains("t.jsonl:3:") && err.contains(want), "{err}");
    }
    let bad_meta = TraceMeta { layer_ids: vec![1, 1], ..meta() };
    let err = TraceWriter::create(&path, &bad_meta).err().unwrap().to_string();
    assert!(err.contains("layer 1 twice"), "{err}");
}

#[test]
fn reader_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    let header =
        r#"{"format":"stevedore-trace","version":1,"model":"m","num_experts":4,"top_k":2,"layer_ids":[0,1]}"#;
    let good = r#"{"seq":0,"pos":0,"token_id":null,"phase":"decode","experts":[[0,1],null],"weights":[[0.5,0.5],null]}"#;
    let cases = [
        (format!("{header}\n{good}\n{{\"seq\":0}}\n"), "bad.jsonl:3: bad token line: missing field"),
        (
            format!("{header}\n\n# note\n{}\n", good.replace("decode", "verify")),
            "bad.jsonl:4: bad token line: unknown variant `verify`",
        ),
        (
            format!("{header}\n{}\n", good.replace("[[0.5,0.5],null]", "[null,null]")),
            "bad.jsonl:2: MoE layer 0: `experts` and `weights`",
        ),
        (
            format!("{header}\n{}\n", good.replace("[0,1]", "[0,9]")),
            "bad.jsonl:2: MoE layer 0 (decoder layer 0): expert 9 out of range",
        ),
        (
            format!("{header}\n{}\n", good.replace("\"seq\"", "\"sequence\"")),
            "bad.jsonl:2: bad token line: unknown field `sequence`",
        ),
        (
            header.replace("\"version\":1", "\"version\":4"),
            "bad.jsonl:1: trace format version 4 is not supported",
        ),
        (
            format!(
                "{header}\n{}\n",
                good.replace("}", ",\"ahead\":[{\"at\":1,\"layer\":1,\"experts\":[0],\"probs\":[0.5]}]}")
            ),
            "bad.jsonl:2: `ahead` entry 0: an estimate made at MoE layer 1 for MoE layer 1",
        ),
        (
            format!(
                "{header}\n{}\n",
                good.replace("}", ",\"ahead\":[{\"at\":0,\"layer\":1,\"experts\":[0],\"probs\":[1.5]}]}")
            ),
            "bad.jsonl:2: `ahead` entry 0: probability 1.5 is not between 0 and 1",
        ),
        ("# only a comment\n".into(), "bad.jsonl: empty file"),
    ];
    for (text, want) in cases {
        std::fs::write(&path, text).unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains(want), "want `{want}`, got `{err}`");
    }
    std::fs::write(&path, "layer,e0\n").unwrap();
    let err = load(&path).unwrap_err().to_string();
    assert!(err.contains("bad.jsonl:1: unrecognised trace format"), "{err}");
}

#[test]
fn importers_handle_small_hand_made_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.csv");
    // Mixtral CSV: a dropped record (-1) becomes a missing layer; decode steps follow the prompt.
    let text = "# comment\nphase,pos,layer,e0,e1,w0,w1\nprefill,0,0,5,2,0.7,0.3\nprefill,0,1,-1,-1,0,0\n\
                prefill,1,0,1,2,0.5,0.5\nprefill,1,1,3,4,0.9,0.1\ndecode,0,0,7,6,0.6,0.4\ndecode,0,1,0,1,0.8,0.2\n";
    std::fs::write(&path, text).unwrap();
    let t = load(&path).unwrap();
    assert_eq!((t.meta.num_experts, t.meta.top_k, t.meta.layer_ids.clone()), (8, 2, vec![0, 1]));
    assert_eq!(t.tokens.len(), 3);
    assert_eq!(t.tokens[0].layers[1], None);
    assert_eq!((t.tokens[2].phase, t.tokens[2].pos), (Phase::Decode, 2));
    assert_eq!(t.tokens[2].layers[0].as_ref().unwrap().experts, [7, 6]);

    // Errors name the line.
    std::fs::write(&path, text.replace("decode,0,1,0,1", "decode,0,1,0,x")).unwrap();
    let err = load(&path).unwrap_err().to_string();
    assert!(err.contains("t.csv:8: column `e1`: `x` is not a valid number"), "{err}");
    std::fs::write(&path, text.replace("prefill,1,1,3,4", "prefill,1,0,3,4")).unwrap();
    let err = load(&path).unwrap_err().to_string();
    assert!(err.contains("t.csv:6: second record for layer 0"), "{err}");
    // Nothing says how many experts: the largest id + 1, said so.
    std::fs::write(&path, text).unwrap();
    let imported = load_with(&path, &Declared::none()).unwrap();
    assert_eq!((imported.trace.meta.num_experts, &imported.experts_from), (8, &ExpertsFrom::Inferred));
    assert_eq!(imported.trace.meta.model, "comment");
    std::fs::write(&path, text.replace("7,6,", "9,6,")).unwrap();
    assert_eq!(load(&path).unwrap().meta.num_experts, 10);
    let eight = declared(None, Some(8)).unwrap();
    let err = load_with(&path, &eight).unwrap_err().to_string();
    assert!(
        err.contains("t.csv:7: expert 9 out of range: the model has 8 routed experts (from --experts 8)"),
        "{err}"
    );

    // Qwen: decode slots become sequences; prefill is sequence 0.
    let text = "# Qwen1.5-MoE-A2.7B, 60 routed experts top-4\nphase,pos,slot,layer,e0,e1,e2,e3,w0,w1,w2,w3\nprefill,0,-1,8,1,2,3,4,0.4,0.3,0.2,0.1\n\
                decode,0,0,8,5,6,7,8,0.4,0.3,0.2,0.1\ndecode,0,1,8,9,10,11,12,0.4,0.3,0.2,0.1\n";
    std::fs::write(&path, text).unwrap();
    let t = load(&path).unwrap();
    assert_eq!((t.meta.num_experts, t.meta.top_k, t.meta.layer_ids.clone()), (60, 4, vec![8]));
    assert_eq!(t.meta.model, "Qwen1.5-MoE-A2.7B");
    let seqs: Vec<_> = t.tokens.iter().map(|t| (t.phase, t.seq, t.pos)).collect();
    assert_eq!(seqs, [(Phase::Prefill, 0, 0), (Phase::Decode, 0, 0), (Phase::Decode, 1, 0)]);

    // Mixtral JSONL: token i of a layer is its i-th record; short layers lack their last tokens.
    let path = dir.path().join("t.jsonl");
    let rec = |p: u32, l: u32, e: [u32; 2]| {
        format!(
            r#"{{"dataset":"x","problem_id":{p},"layer":{l},"experts":[{},{}],"gating_probs":[0.6,0.4],"token_idx":0}}"#,
            e[0], e[1]
        )
    };
    let lines =
        [rec(3, 0, [0, 1]), rec(3, 0, [2, 3]), rec(3, 1, [4, 5]), rec(1, 0, [6, 7]), rec(1, 1, [0, 2])];
    std::fs::write(&path, lines.join("\n")).unwrap();
    let t = load(&path).unwrap();
    let shape: Vec<_> = t.tokens.iter().map(|t| (t.seq, t.pos, t.layers[1].is_some())).collect();
    assert_eq!(shape, [(3, 0, true), (3, 1, false), (1, 0, true)]);
}

/// A user's own traces: the expert count comes from the file's header, a declaration, or the
/// data, never from the format; what contradicts it is an error naming the file and line.
#[test]
fn csv_traces_of_any_model_keep_their_own_shape() {
    let dir = tempfile::tempdir().unwrap();
    let rows = |experts: u32, n: u32| -> String {
        (0..n)
            .flat_map(|pos| (0..2).map(move |layer| (pos, layer)))
            .map(|(pos, layer)| {
                let e = (pos * 7 + layer * 3) % experts;
                format!("{pos},{},{layer},{e},{},0.7,0.3\n", pos + 10, (e + 1) % experts)
            })
            .collect()
    };
    // 8 experts, said by the header; 128 experts said as `num_experts: 128`.
    let eight = dir.path().join("eight.csv");
    std::fs::write(
        &eight,
        format!("# my-moe: 8 experts, top-2\npos,token_id,layer,e0,e1,w0,w1\n{}", rows(8, 40)),
    )
    .unwrap();
    let big = dir.path().join("big.csv");
    std::fs::write(&big, format!("# num_experts: 128\npos,token_id,layer,e0,e1,w0,w1\n{}", rows(100, 40)))
        .unwrap();
    let t = load_with(&eight, &Declared::none()).unwrap();
    assert_eq!((t.trace.meta.num_experts, t.trace.meta.top_k, t.experts_from), (8, 2, ExpertsFrom::Header));
    assert_eq!(t.trace.meta.model, "my-moe: 8 experts");
    let t = load_with(&big, &Declared::none()).unwrap();
    assert_eq!((t.trace.meta.num_experts, &t.experts_from), (128, &ExpertsFrom::Header));
    assert!(t.describe(&big).contains("128 experts from the file's header, top-2"), "{}", t.describe(&big));
    // Declared the same way: fine; declared otherwise: an error naming both.
    assert_eq!(load_with(&big, &declared(None, Some(128)).unwrap()).unwrap().trace.meta.num_experts, 128);
    let err = load_with(&eight, &declared(None, Some(64)).unwrap()).unwrap_err().to_string();
    assert!(err.contains("eight.csv:1: the header says 8 routed experts, but --experts 64 has 64"), "{err}");
    // Against a checkpoint: the Mixtral fixture has 8 experts, top-2, MoE layers 0 and 1.
    let mixtral = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixtral");
    let by_model = declared(Some(&mixtral), None).unwrap();
    assert_eq!(load_with(&eight, &by_model).unwrap().trace.meta.num_experts, 8);
    let err = load_with(&big, &by_model).unwrap_err().to_string();
    assert!(err.contains("big.csv:1: the header says 128 routed experts, but the model in"), "{err}");
    assert!(declared(Some(&mixtral), Some(16))
        .unwrap_err()
        .contains("--experts 16 contradicts the model in"));
    // An id beyond the count names its line.
    std::fs::write(
        &eight,
        format!("# 8 experts\npos,token_id,layer,e0,e1,w0,w1\n{}5,15,1,8,2,0.6,0.4\n", rows(8, 5)),
    )
    .unwrap();
    let err = load(&eight).unwrap_err().to_string();
    assert!(
        err.contains(
            "eight.csv:13: expert 8 out of range: the model has 8 routed experts (from the file's header)"
        ),
        "{err}"
    );
    // A layer the checkpoint does not route, and a top-k it does not use.
    std::fs::write(&eight, format!("pos,token_id,layer,e0,e1,w0,w1\n{}0,10,5,1,2,0.5,0.5\n", rows(8, 1)))
        .unwrap();
    let err = load_with(&eight, &by_model).unwrap_err().to_string();
    assert!(err.contains("eight.csv:4: layer 5 is not an MoE layer of the model in"), "{err}");
    std::fs::write(&eight, "pos,token_id,layer,e0,w0\n0,1,0,3,1.0\n").unwrap();
    let err = load_with(&eight, &by_model).unwrap_err().to_string();
    assert!(err.contains("records 1 experts per token and layer, but the model in"), "{err}");
}

#[test]
fn imports_the_shared_traces() {
    let Some(dir) = shared_traces() else { return };
    // (file, model, experts, top-k, MoE layers, tokens)
    let cases = [
        ("flame-moe-290m/flame_moe_290m_prefill_2048tok.csv", "FLAME-MoE-290M", 64, 6, 8, 2048),
        ("flame-moe-290m/flame_moe_290m_first10tok_64seq.csv", "FLAME-MoE-290M", 64, 6, 8, 640),
        (
            "mixtral-8x7b/mixtral_humaneval_p0_prefill_decode.csv",
            "Mixtral-8x7B-Instruct-v0.1-FP8 via vLLM",
            8,
            2,
            32,
            135 + 83,
        ),
        ("mixtral-8x7b/gsm8k_2_routing.jsonl", "gsm8k_2_routing", 8, 2, 32, 168 + 79),
        ("mixtral-8x7b/humaneval_2_routing.jsonl", "humaneval_2_routing", 8, 2, 32, 83 + 255),
        (
            "qwen1.5-moe-a2.7b/qwen15moe_gsm8k25_5layers.csv",
            "Qwen1.5-MoE-A2.7B-Chat via vLLM",
            60,
            4,
            5,
            1406 + 2886,
        ),
    ];
    for (file, model, experts, top_k, layers, tokens) in cases {
        let t = load(&dir.join(file)).unwrap();
        assert_eq!(
            (t.meta.model.as_str(), t.meta.num_experts, t.meta.top_k, t.num_layers(), t.tokens.len()),
            (model, experts, top_k, layers, tokens),
            "{file}"
        );
    }
    // The FLAME prefill and Qwen files state their count; the others are inferred from the ids.
    let from = |f: &str| load_with(&dir.join(f), &Declared::none()).unwrap().experts_from;
    assert_eq!(from(cases[0].0), ExpertsFrom::Header);
    assert_eq!(from(cases[1].0), ExpertsFrom::Inferred);
    assert_eq!(from(cases[5].0), ExpertsFrom::Header);
    let flame = load(&dir.join(cases[0].0)).unwrap();
    assert_eq!(flame.meta.layer_ids, (2..10).collect::<Vec<u32>>());
    assert_eq!(flame.tokens[0].token_id, Some(1512));
    assert_eq!(flame.tokens[0].layers[0].as_ref().unwrap().experts, [34, 28, 21, 47, 3, 12]);
    let qwen = load(&dir.join(cases[5].0)).unwrap();
    assert_eq!(qwen.meta.layer_ids, [0, 8, 12, 18, 23]);
    // Its decode rows of one step ran as one batch: one step each, prefill rows none.
    let decode: Vec<&TokenRouting> = qwen.tokens.iter().filter(|t| t.phase == Phase::Decode).collect();
    assert!(decode.iter().all(|t| t.step == Some(t.pos as u64)));
    assert_eq!(decode.iter().filter(|t| t.step == Some(0)).count(), 25);
    assert!(qwen.tokens.iter().filter(|t| t.phase == Phase::Prefill).all(|t| t.step.is_none()));
    // Mixtral CSV: about 3% of records were dropped by the collector (199 records carry -1).
    let mixtral = load(&dir.join(cases[2].0)).unwrap();
    let missing = mixtral.tokens.iter().flat_map(|t| &t.layers).filter(|l| l.is_none()).count();
    assert_eq!(missing, 199);

    // Every imported trace survives a round trip through stevedore's format.
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("flame.jsonl");
    write(&path, &flame).unwrap();
    assert_eq!(read(&path).unwrap(), flame);
}
