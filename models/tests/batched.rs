//! Batched equals alone, at the model level: sequences of different prompt lengths, started at
//! different steps, sharing forward passes (prefill chunks of some beside decode tokens of
//! others), produce exactly the greedy tokens each produces alone; and the golden 200-token runs
//! of the trained pydoc-moe equal transformers' (`tests/fixtures/pydoc-moe/golden.json`), alone
//! and batched together. Experts are read in place (`MappedExperts`); the engine's streamed
//! store is checked the same way end to end in `tests/`.

mod common;

use common::{argmax, fixture};
use serde_json::Value;
use stevedore_models::{Batch, KvPool, Logits, MappedExperts, Model, SeqId};

/// One sequence of a run: its prompt, the step it joins at, how many tokens to generate.
#[derive(Clone)]
struct Job {
    prompt: Vec<u32>,
    start: usize,
    new_tokens: usize,
}

/// Greedy decoding of `jobs` in shared forward passes: from its start step on, a job feeds its
/// prompt in chunks of at most `chunk` tokens, then one token per step. Returns each job's tokens.
fn run(model: &Model, jobs: &[Job], chunk: usize) -> Vec<Vec<u32>> {
    let experts = MappedExperts::new(model);
    let total: usize = jobs.iter().map(|j| j.prompt.len() + j.new_tokens).sum();
    let mut kv =
        KvPool::new(&model.config, KvPool::bytes_for(&model.config, 4, total + 4 * jobs.len()), 4).unwrap();
    let mut fed = vec![0usize; jobs.len()];
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); jobs.len()];
    for (i, j) in jobs.iter().enumerate() {
        kv.allocate(i as SeqId, j.prompt.len() + j.new_tokens).unwrap();
    }
    for step in 0.. {
        let mut batch = Batch::new();
        let mut who = Vec::new();
        for (i, j) in jobs.iter().enumerate() {
            if step < j.start || out[i].len() >= j.new_tokens {
                continue;
            }
            if fed[i] < j.prompt.len() {
                let end = (fed[i] + chunk).min(j.prompt.len());
                let done = end == j.prompt.len();
                batch.push(
                    i as SeqId,
                    fed[i],
                    &j.prompt[fed[i]..end],
                    if done { Logits::Last } else { Logits::None },
                );
                fed[i] = end;
                if done {
                    who.push(i);
                }
            } else {
                let pos = j.prompt.len() + out[i].len() - 1;
                batch.push(i as SeqId, pos, &[*out[i].last().unwrap()], Logits::Last);
                who.push(i);
            }
        }
        if batch.is_empty() {
            if jobs.iter().zip(&out).all(|(j, o)| o.len() >= j.new_tokens) {
                break;
            }
            continue;
        }
        let f = model.forward(&batch, &mut kv, &experts).unwrap();
        assert!(f.failed.is_empty());
        let vocab = model.config.vocab_size;
        for (k, &i) in who.iter().enumerate() {
            out[i].push(argmax(&f.logits[k * vocab..(k + 1) * vocab]));
        }
    }
    for i in 0..jobs.len() {
        assert!(kv.release(i as SeqId));
    }
    assert_eq!(kv.free_blocks(), kv.total_blocks());
    out
}

/// Prompts of lengths 1..=20 from a fixed generator, valid for `vocab`.
fn prompts(vocab: usize, n: usize) -> Vec<Vec<u32>> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|i| {
            let len = [1, 7, 20, 3, 12, 5, 16, 2][i % 8];
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    3 + (x % (vocab as u64 - 3)) as u32
                })
                .collect()
        })
        .collect()
}

fn check(name: &str) {
    let model = Model::load(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let all = prompts(model.config.vocab_size, 8);
    let jobs: Vec<Job> = all
        .iter()
        .enumerate()
        .map(|(i, p)| Job { prompt: p.clone(), start: [0, 0, 2, 5, 1, 9, 3, 7][i], new_tokens: 10 })
        .collect();
    let alone: Vec<Vec<u32>> =
        jobs.iter().map(|j| run(&model, &[Job { start: 0, ..j.clone() }], usize::MAX)[0].clone()).collect();
    for n in [1, 3, 8] {
        for chunk in [usize::MAX, 4] {
            let together = run(&model, &jobs[..n], chunk);
            for i in 0..n {
                assert_eq!(
                    together[i], alone[i],
                    "{name}: sequence {i} of {n} (prefill chunk {chunk}) differs from alone"
                );
            }
        }
    }
}

/// `Logits::All` returns every row's logits in row order: for a 20-token prompt run in one pass
/// beside another sequence, row `i`'s logits equal, bit for bit, the last-row logits of the
/// prompt's first `i + 1` tokens run alone; and the same in chunks of 6 rows.
fn check_all_rows(name: &str) {
    let model = Model::load(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let experts = MappedExperts::new(&model);
    let vocab = model.config.vocab_size;
    let all = prompts(vocab, 3);
    let (prompt, other) = (&all[2], &all[1]);
    assert_eq!(prompt.len(), 20);
    let pool = |n: usize| {
        let mut kv =
            KvPool::new(&model.config, KvPool::bytes_for(&model.config, 4, 64) * n as u64, 4).unwrap();
        for s in 0..n {
            kv.allocate(s as SeqId, 32).unwrap();
        }
        kv
    };
    let last_alone: Vec<Vec<f32>> = (1..=prompt.len())
        .map(|n| {
            let mut batch = Batch::new();
            batch.push(0, 0, &prompt[..n], Logits::Last);
            model.forward(&batch, &mut pool(1), &experts).unwrap().logits
        })
        .collect();
    for chunk in [prompt.len(), 6] {
        let mut kv = pool(2);
        let mut rows = Vec::new();
        for (k, start) in (0..prompt.len()).step_by(chunk).enumerate() {
            let end = (start + chunk).min(prompt.len());
            let mut batch = Batch::new();
            if k == 0 {
                batch.push(1, 0, other, Logits::Last);
            }
            batch.push(0, start, &prompt[start..end], Logits::All);
            let out = model.forward(&batch, &mut kv, &experts).unwrap();
            let skip = if k == 0 { vocab } else { 0 };
            assert_eq!(out.logits.len(), skip + (end - start) * vocab);
            rows.extend(out.logits[skip..].chunks_exact(vocab).map(<[f32]>::to_vec));
        }
        for (i, (got, want)) in rows.iter().zip(&last_alone).enumerate() {
            assert!(
                got == want,
                "{name}: row {i} of the prompt (chunks of {chunk}) differs from its prefix alone"
            );
        }
    }
}

#[test]
fn every_row_logits_equal_each_prefix_alone() {
    for name in [
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
        "glm4_moe",
        "phimoe",
        "deepseek_v3",
        "deepseek_v2",
        "pydoc-moe",
    ] {
        check_all_rows(name);
    }
}

#[test]
fn mixtral_batched_equals_alone() {
    check("mixtral");
}

#[test]
fn qwen2_moe_batched_equals_alone() {
    check("qwen2_moe");
}

#[test]
fn qwen3_moe_batched_equals_alone() {
    check("qwen3_moe");
}

#[test]
fn olmoe_batched_equals_alone() {
    check("olmoe");
}

#[test]
fn glm4_moe_batched_equals_alone() {
    check("glm4_moe");
}

#[test]
fn phimoe_batched_equals_alone() {
    check("phimoe");
}

#[test]
fn deepseek_v3_batched_equals_alone() {
    check("deepseek_v3");
}

#[test]
fn deepseek_v2_batched_equals_alone() {
    check("deepseek_v2");
}

#[test]
fn pydoc_moe_batched_equals_alone() {
    check("pydoc-moe");
}

/// llama2.c's golden test: 200 greedy tokens of the trained model equal transformers' (4.57 and
/// 5.24 agree on them), each prompt alone and all three in one batch.
#[test]
fn pydoc_moe_golden_200_tokens() {
    let dir = fixture("pydoc-moe");
    let model = Model::load(&dir).unwrap();
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let ids =
        |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
    let n = golden["max_new_tokens"].as_u64().unwrap() as usize;
    let cases = golden["cases"].as_array().unwrap();
    let jobs: Vec<Job> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| Job { prompt: ids(&c["prompt_ids"]), start: i, new_tokens: n })
        .collect();
    let together = run(&model, &jobs, usize::MAX);
    for (i, c) in cases.iter().enumerate() {
        let want = ids(&c["generated_ids"]);
        assert_eq!(want.len(), 200);
        let alone = &run(&model, &[Job { start: 0, ..jobs[i].clone() }], usize::MAX)[0];
        assert_eq!(alone, &want, "{:?}: 200 greedy tokens differ from transformers'", c["prompt"]);
        assert_eq!(together[i], want, "{:?}: batched with the other prompts", c["prompt"]);
    }
}
