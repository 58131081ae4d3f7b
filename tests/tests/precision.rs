//! Mixed-precision replacement (HOBBIT) end to end: `stevedore quantize` writes low-bit copies
//! that round-trip within their format's bound, 4 KiB-aligned per expert, with an index that is
//! checked like the safetensors index; a quantize killed at any moment leaves a loadable model;
//! `--precision full` is the reference at every budget, `hobbit` is too when every expert is
//! resident, and reads fewer bytes when not (the agreement with the full run is printed); and
//! cache-conditional routing raises the hit rate when asked, changing nothing when it is 0.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{copy_fixture, generate_ids, ids, inspect, reference, stevedore, u64_at, PYDOC_MOE};
use serde_json::Value;
use stevedore_kernels::DType;
use stevedore_models::{LowBitExperts, Model};

fn quantize(dir: &Path, formats: &str, extra: &[&str]) -> common::Run {
    let mut args = vec!["quantize", "--model", dir.to_str().unwrap(), "--format", formats];
    args.extend_from_slice(extra);
    stevedore(args)
}

/// Every low-bit tensor dequantizes to within its format's bound of the checkpoint's value:
/// q8_0 within half a step (`d / 2`, `d = max|x| / 127` of the block) plus the f16 rounding of
/// `d` times the code (up to 127); q4_0 within one step `|d|` (`d = max / -8`: half a step,
/// except the value opposite the block's largest, clamped to the top code) plus likewise. Each expert starts on a 4 KiB boundary.
fn check_round_trip(dir: &Path, format: DType) {
    let model = Model::load(dir).unwrap();
    let low = LowBitExperts::open(&model, format, model.index.shards.len()).unwrap();
    let mut checked = 0;
    for ((moe, e, full), (_, _, copy)) in model.experts.iter().zip(low.tensors.iter()) {
        assert_eq!(copy[0].offset % 4096, 0, "{moe:?} expert {e}: not 4 KiB-aligned");
        for (f, c) in full.iter().zip(copy) {
            assert_eq!((c.rows, c.cols, c.dtype), (f.rows, f.cols, format));
            let n = f.rows * f.cols;
            let mut want = vec![0.0f32; n];
            let src = &model.index.shard_data(f.shard)[f.offset as usize..(f.offset + f.len) as usize];
            stevedore_kernels::to_f32(f.dtype, src, &mut want);
            let bytes = std::fs::read(&low.path).unwrap();
            let mut got = vec![0.0f32; n];
            stevedore_kernels::dequantize(
                format,
                &bytes[c.offset as usize..(c.offset + c.len) as usize],
                &mut got,
            );
            for (b, (w, g)) in want.chunks(32).zip(got.chunks(32)).enumerate() {
                let amax = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let bound = match format {
                    // f16 rounds `d` to 2^-11 relative: up to 127 (8) steps of that error.
                    DType::Q8_0 => amax / 127.0 * (0.5 + 127.0 / 2048.0) + 1e-7,
                    _ => amax / 8.0 * (1.0 + 8.0 / 2048.0) + 1e-7,
                };
                for (x, y) in w.iter().zip(g) {
                    assert!(
                        (x - y).abs() <= bound,
                        "{moe:?} expert {e} block {b}: {x} -> {y}, bound {bound}"
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(checked > 0);
}

#[test]
fn quantize_writes_aligned_copies_that_round_trip() {
    for fixture in ["qwen3_moe", PYDOC_MOE] {
        let tmp = copy_fixture(fixture);
        let out = quantize(tmp.path(), "q8_0,q4_0", &[]);
        out.ok();
        assert!(out.stderr.contains("q4_0 experts: 192 tensors") || fixture != PYDOC_MOE, "{}", out.stderr);
        for format in [DType::Q8_0, DType::Q4_0] {
            check_round_trip(tmp.path(), format);
        }
        // inspect: the bytes per expert at each precision, low-bit ones smaller.
        let info = inspect(tmp.path(), &[]);
        let full = u64_at(&info, "bytes_per_expert");
        let (q8, q4) = (
            u64_at(&info["low_bit_copies"]["q8_0"], "bytes_per_expert"),
            u64_at(&info["low_bit_copies"]["q4_0"], "bytes_per_expert"),
        );
        assert!(q4 < q8 && q8 < full, "{fixture}: {info}");
        // No temporary file stays behind.
        let stray: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
    }
}

#[test]
fn quantize_refuses_to_overwrite_and_names_odd_shapes() {
    let tmp = copy_fixture("qwen3_moe");
    quantize(tmp.path(), "q4_0", &[]).ok();
    quantize(tmp.path(), "q4_0", &[]).err(&["experts.q4_0.json exists", "--force"]);
    quantize(tmp.path(), "q4_0", &["--force"]).ok();
    // A bad flag value is clap's usage error (status 2), naming the value and the choices.
    let bad = quantize(tmp.path(), "q5_1", &[]);
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
    assert!(bad.stderr.contains("`q5_1` is not a low-bit format: q8_0 or q4_0"), "{}", bad.stderr);
    // Mixtral's fixture has experts of intermediate size 48: not whole blocks of 32.
    let odd = copy_fixture("mixtral");
    quantize(odd.path(), "q8_0", &[])
        .err(&["tensor `model.layers.0.block_sparse_moe.experts.0.w2.weight`", "48"]);
    assert!(!odd.path().join("experts.q8_0.json").exists());
    // Without copies, the HOBBIT policy says how to make them.
    let run = stevedore([
        "generate",
        "--model",
        odd.path().to_str().unwrap(),
        "--prompt-ids",
        "1,2",
        "--max-new-tokens",
        "1",
        "--precision",
        "hobbit",
    ]);
    run.err(&["experts.q4_0.json", "stevedore quantize"]);
}

/// Rewrites `dir`'s q4_0 index with `edit` applied to its JSON.
fn edit_index(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("experts.q4_0.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
}

#[test]
fn a_bad_index_or_data_file_is_named() {
    let hobbit = |dir: &Path| {
        stevedore([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            "1,2",
            "--max-new-tokens",
            "2",
            "--precision",
            "hobbit",
            "--host-cache",
            "50%",
        ])
    };
    let name = "model.layers.1.mlp.experts.3.up_proj.weight";
    // (what, how to corrupt a copy of the fixture, what the error must say)
    type Case<'a> = (&'a str, Box<dyn Fn(&Path) + 'a>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "moved offset",
            Box::new(|d| {
                edit_index(d, |v| {
                    let o = v["tensors"][name]["offset"].as_u64().unwrap();
                    v["tensors"][name]["offset"] = (o + 4096).into();
                })
            }),
            vec![name, "header"],
        ),
        (
            "wrong byte count",
            Box::new(|d| edit_index(d, |v| v["tensors"][name]["bytes"] = 7.into())),
            vec![name, "bytes"],
        ),
        (
            "missing tensor",
            Box::new(|d| {
                edit_index(d, |v| {
                    v["tensors"].as_object_mut().unwrap().remove(name);
                })
            }),
            vec![name, "missing"],
        ),
        (
            "wrong shape",
            Box::new(|d| edit_index(d, |v| v["tensors"][name]["shape"] = serde_json::json!([32, 32]))),
            vec![name, "shape"],
        ),
        (
            "not JSON",
            Box::new(|d| std::fs::write(d.join("experts.q4_0.json"), "{").unwrap()),
            vec!["experts.q4_0.json", "invalid index"],
        ),
        (
            "path as file",
            Box::new(|d| edit_index(d, |v| v["file"] = "../x.safetensors".into())),
            vec!["plain file name"],
        ),
        (
            "truncated data",
            Box::new(|d| {
                let f =
                    std::fs::OpenOptions::new().write(true).open(d.join("experts.q4_0.safetensors")).unwrap();
                let len = f.metadata().unwrap().len();
                f.set_len(len - 4096).unwrap();
            }),
            vec!["experts.q4_0.safetensors", "not the file the index describes"],
        ),
    ];
    for (what, corrupt, needles) in cases {
        let tmp = copy_fixture("qwen3_moe");
        quantize(tmp.path(), "q4_0", &[]).ok();
        corrupt(tmp.path());
        eprintln!("case: {what}");
        hobbit(tmp.path()).err(&needles);
        // The full-precision policy never reads the copies.
        let ok = stevedore([
            "generate",
            "--model",
            tmp.path().to_str().unwrap(),
            "--prompt-ids",
            "1,2",
            "--max-new-tokens",
            "2",
        ]);
        ok.ok();
    }
}

/// A quantize killed at any moment leaves a model that loads: the previous copies (or none)
/// or the new ones, never a half-written file behind an index.
#[test]
fn an_interrupted_quantize_leaves_the_model_loadable() {
    let tmp = copy_fixture(PYDOC_MOE);
    let dir = tmp.path();
    let hobbit_ids = |dir: &Path| -> Result<Vec<u64>, String> {
        let run = stevedore([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            "1,547,1114",
            "--max-new-tokens",
            "4",
            "--precision",
            "hobbit",
            "--host-cache",
            "30%",
            "--json",
        ]);
        match run.code {
            Some(0) => Ok(ids(&run.json()["generated_ids"])),
            _ => Err(run.stderr),
        }
    };
    for (i, delay_us) in [0u64, 300, 1000, 3000, 8000, 20000].into_iter().enumerate() {
        let had_copies = dir.join("experts.q4_0.json").exists();
        let mut child = Command::new(env!("CARGO_BIN_EXE_stevedore-e2e"))
            .args(["quantize", "--model", dir.to_str().unwrap(), "--format", "q8_0,q4_0", "--force"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(delay_us));
        let _ = child.kill();
        child.wait().unwrap();
        match hobbit_ids(dir) {
            Ok(ids) => assert_eq!(ids.len(), 4, "kill {i}"),
            // No copies yet: the only acceptable failure, and only if none existed before.
            Err(e) => {
                assert!(!had_copies, "kill {i} after {delay_us} us broke copies that existed: {e}");
                assert!(e.contains("stevedore quantize"), "kill {i}: {e}");
            }
        }
    }
    quantize(dir, "q8_0,q4_0", &["--force"]).ok();
    check_round_trip(dir, DType::Q4_0);
    hobbit_ids(dir).unwrap();
}

/// `--precision full` (with copies present) is transformers' at every budget; `hobbit` is too
/// when every expert is resident (resident full-precision copies are always used).
#[test]
fn full_precision_is_the_reference_and_hobbit_matches_it_when_everything_is_resident() {
    let tmp = copy_fixture("qwen3_moe");
    quantize(tmp.path(), "q4_0", &[]).ok();
    let r = reference("qwen3_moe");
    for case in &r.cases {
        for budget in ["100%", "30%"] {
            let out = generate_ids(
                tmp.path(),
                &case.prompt_ids,
                r.max_new_tokens,
                &["--precision", "full", "--host-cache", budget],
            );
            assert_eq!(ids(&out["generated_ids"]), case.generated_ids, "full at {budget}");
            assert_eq!(u64_at(&out["stats"]["expert_cache"]["precision"], "low_bytes_read"), 0);
        }
        let out = generate_ids(
            tmp.path(),
            &case.prompt_ids,
            r.max_new_tokens,
            &["--precision", "hobbit", "--host-cache", "100%", "--warm-start", "on"],
        );
        assert_eq!(ids(&out["generated_ids"]), case.generated_ids, "hobbit with every expert resident");
        let p = &out["stats"]["expert_cache"]["precision"];
        assert_eq!((u64_at(p, "low_hits"), u64_at(p, "low_misses"), u64_at(p, "skipped")), (0, 0, 0), "{p}");
    }
}

/// At a small budget the HOBBIT policy reads low-bit copies for experts of small gate weight:
/// fewer bytes than full precision, every access accounted to one precision. The tokens'
/// agreement with the full run is printed, not required.
#[test]
fn hobbit_reads_fewer_bytes_at_a_small_budget() {
    let tmp = copy_fixture(PYDOC_MOE);
    quantize(tmp.path(), "q4_0", &[]).ok();
    let prompt = [1u64, 547, 1114, 1239];
    let flags = |p: &'static str| ["--precision", p, "--host-cache", "25%", "--policy", "lru"];
    let full = generate_ids(tmp.path(), &prompt, 64, &flags("full"));
    let hobbit = generate_ids(tmp.path(), &prompt, 64, &flags("hobbit"));
    let (cf, ch) = (&full["stats"]["expert_cache"], &hobbit["stats"]["expert_cache"]);
    let p = &ch["precision"];
    assert_eq!(p["policy"], "hobbit");
    assert_eq!(p["low_format"], "Q4_0");
    assert!(u64_at(p, "low_misses") > 0, "no low-bit reads: {p}");
    assert!(u64_at(p, "skipped") > 0, "nothing skipped: {p}");
    assert_eq!(u64_at(p, "full_bytes_read") + u64_at(p, "low_bytes_read"), u64_at(ch, "bytes_read"), "{ch}");
    assert_eq!(
        u64_at(p, "full_hits") + u64_at(p, "low_hits") + u64_at(p, "full_misses") + u64_at(p, "low_misses"),
        u64_at(ch, "hits") + u64_at(ch, "misses"),
        "{ch}"
    );
    let (bf, bh) = (u64_at(cf, "bytes_read"), u64_at(ch, "bytes_read"));
    assert!(bh < bf, "hobbit read {bh} bytes, full {bf}");
    let (a, b) = (ids(&full["generated_ids"]), ids(&hobbit["generated_ids"]));
    let agree = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    eprintln!(
        "pydoc-moe at 25%: hobbit read {:.0}% of full precision's bytes; {agree}/{} tokens agree before the first difference; {p}",
        100.0 * bh as f64 / bf as f64,
        a.len()
    );
}

/// `routing.resident_bias`: 0 is the reference (the default, tested everywhere); a positive
/// bias steers routing to resident experts, so a small cache misses less.
#[test]
fn resident_bias_raises_the_hit_rate() {
    let dir = common::fixture_dir(PYDOC_MOE);
    let prompt = [1u64, 547, 1114, 1239];
    let misses = |bias: &str| {
        let out = generate_ids(
            &dir,
            &prompt,
            48,
            &["--host-cache", "25%", "--policy", "lru", "--resident-bias", bias],
        );
        u64_at(&out["stats"]["expert_cache"], "misses")
    };
    let (none, some) = (misses("0"), misses("3"));
    assert!(some < none, "resident bias 3: {some} misses, none: {none}");
    let run =
        stevedore(["generate", "--model", dir.to_str().unwrap(), "--prompt-ids", "1", "--resident-bias=-1"]);
    run.err(&["routing.resident_bias", "-1"]);
}

/// `quantize --all` writes the dense matrices too: with `precision.dense` and the `low` policy
/// the model runs fully quantized (dense bytes shrink, most greedy tokens stay); asking for
/// dense copies that were not written names the flag that makes them.
#[test]
fn quantize_all_makes_a_fully_quantized_model() {
    let tmp = copy_fixture(PYDOC_MOE);
    let dir = tmp.path();
    quantize(dir, "q8_0", &[]).ok();
    let config = dir.join("q8.toml");
    std::fs::write(&config, "[precision]\npolicy = \"low\"\nlow = \"q8_0\"\ndense = \"q8_0\"\n").unwrap();
    let config = config.to_str().unwrap();
    let prompt = [1u64, 547, 1114, 1239];
    let run = stevedore([
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "1,547",
        "--max-new-tokens",
        "2",
        "--config",
        config,
    ]);
    run.err(&["dense.q8_0.json", "--all"]);
    quantize(dir, "q8_0", &["--all", "--force"]).ok();
    let full = generate_ids(dir, &prompt, 32, &[]);
    let q8 = generate_ids(dir, &prompt, 32, &["--config", config]);
    let (bf, bq) = (u64_at(&full["stats"], "dense_bytes"), u64_at(&q8["stats"], "dense_bytes"));
    assert!(bq * 17 < bf * 10, "q8_0 dense weights take {bq} bytes, bf16 {bf}");
    let p = &q8["stats"]["expert_cache"]["precision"];
    assert_eq!((u64_at(p, "full_hits"), u64_at(p, "full_misses")), (0, 0), "{p}");
    let (a, b) = (ids(&full["generated_ids"]), ids(&q8["generated_ids"]));
    let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    eprintln!("pydoc-moe fully q8_0: {agree}/{} greedy tokens equal bf16's", a.len());
    assert!(agree >= a.len() / 2, "q8_0 changed most tokens: {a:?} vs {b:?}");
}

/// HOBBIT on every fixture whose experts quantize (the others' rows are not whole blocks): the
/// greedy tokens at a small budget against the full-precision run's, agreement printed (not
/// required), every run complete and every access counted.
#[test]
fn hobbit_agreement_on_the_fixtures() {
    for name in common::FIXTURES.iter().copied().chain([PYDOC_MOE]) {
        let tmp = copy_fixture(name);
        let q = quantize(tmp.path(), "q4_0", &[]);
        if q.code != Some(0) {
            q.err(&["not whole Q4_0 blocks"]);
            eprintln!("{name}: experts' rows are not whole blocks of 32; no copies");
            continue;
        }
        let r = reference(name);
        let (mut agree, mut total) = (0, 0);
        for case in &r.cases {
            let flags = |p: &'static str| ["--precision", p, "--host-cache", "50%", "--policy", "lru"];
            let full = generate_ids(tmp.path(), &case.prompt_ids, r.max_new_tokens, &flags("full"));
            let hobbit = generate_ids(tmp.path(), &case.prompt_ids, r.max_new_tokens, &flags("hobbit"));
            let (a, b) = (ids(&full["generated_ids"]), ids(&hobbit["generated_ids"]));
            assert_eq!(a.len(), b.len(), "{name}");
            agree += a.iter().zip(&b).take_while(|(x, y)| x == y).count();
            total += a.len();
            let c = &hobbit["stats"]["expert_cache"];
            let p = &c["precision"];
            let counted: u64 =
                ["full_hits", "full_misses", "low_hits", "low_misses"].iter().map(|k| u64_at(p, k)).sum();
            assert_eq!(counted, u64_at(c, "hits") + u64_at(c, "misses"), "{name}: {c}");
        }
        eprintln!("{name}: HOBBIT q4_0 at 50%: {agree}/{total} greedy tokens equal full precision's before the first difference");
    }
}
