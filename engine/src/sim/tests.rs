use std::path::Path;

use stevedore_cache::{AnticipationParams, ExpertKey, PolicyKind};
use stevedore_predictor::{OnlineKind, Prediction, RouteCursor, RoutePredictor, RoutingShape};

use super::*;
use crate::config::{Layers, Split};
use crate::trace::tests::shared_traces;
use crate::trace::{LayerChoice, Phase, TokenRouting, TraceMeta};

/// A trace of one sequence over `paths[token][moe_layer]` (experts chosen); each token's id is
/// its position.
fn trace(num_experts: usize, paths: &[&[&[u32]]]) -> Trace {
    let layers = paths[0].len();
    Trace {
        meta: TraceMeta {
            model: "toy".into(),
            num_experts,
            top_k: paths[0][0].len(),
            layer_ids: (0..layers as u32).collect(),
        },
        tokens: (paths.iter().enumerate())
            .map(|(pos, path)| TokenRouting {
                ahead: Vec::new(),
                horizon: None,
                seq: 0,
                pos: pos as u32,
                step: None,
                token_id: Some(pos as u32),
                phase: Phase::Decode,
                layers: path
                    .iter()
                    .map(|e| Some(LayerChoice { experts: e.to_vec(), weights: vec![] }))
                    .collect(),
            })
            .collect(),
    }
}

fn run(t: &Trace, slots: u64, c: Contender, steering: Option<Steering>) -> RunStats {
    let sizes = ExpertSizes::uniform(&t.meta, 10);
    replay(t, &sizes, slots * 10, Split::Shared, c, steering, 0).unwrap()
}

#[test]
fn lru_and_belady_on_a_loop_larger_than_the_cache() {
    // One layer, experts 0,1,2 in a loop, two slots: LRU always evicts the next one needed.
    let t = trace(4, &[&[&[0]], &[&[1]], &[&[2]], &[&[0]], &[&[1]], &[&[2]]]);
    let lru = run(&t, 2, Contender::Policy(PolicyKind::Lru), None);
    assert_eq!((lru.accesses, lru.hits, lru.demand_bytes, lru.tokens), (6, 0, 60, 6));
    // Belady keeps 0 for position 3, then 2 for position 5.
    let belady = run(&t, 2, Contender::Belady, None);
    assert_eq!((belady.hits, belady.bytes_moved()), (2, 40));
    assert_eq!(run(&t, 2, Contender::Policy(PolicyKind::Lfu), None).hits, 0);
}

#[test]
fn a_layer_never_evicts_the_experts_it_is_using() {
    // Two slots, top-2. Token 2 needs {2, 0}: 0 is resident and must survive loading 2, even
    // though 0 is the least recently used entry.
    let t = trace(4, &[&[&[0, 1]], &[&[2, 0]]]);
    let s = run(&t, 2, Contender::Policy(PolicyKind::Lru), None);
    assert_eq!((s.hits, s.accesses), (1, 4));
}

/// Knows the trace (of one sequence, token ids = positions) and predicts every next layer
/// exactly, with score 1.
struct Oracle {
    trace: Trace,
}

impl RoutePredictor for Oracle {
    fn name(&self) -> &'static str {
        "oracle"
    }
    fn learn(&mut self, _: &RouteCursor, _: usize) {}
    fn predict(&self, cursor: &RouteCursor, depth: usize) -> Vec<Prediction> {
        let layers = self.trace.num_layers();
        let first = cursor.last_layer().map_or(0, |l| l + 1);
        (1..=depth)
            .filter_map(|distance| {
                let pos = first + distance - 1;
                let token = self.trace.tokens.get(cursor.token_id()? as usize + pos / layers)?;
                let choice = token.layers[pos % layers].as_ref()?;
                let experts = choice.experts.iter().map(|&e| (e, 1.0)).collect();
                Some(Prediction { distance, layer: pos % layers, next_token: pos >= layers, experts })
            })
            .collect()
    }
}

fn steering(predictor: Box<dyn RoutePredictor>, prefetch_depth: usize, budget: u64) -> Steering {
    Steering {
        predictor,
        params: AnticipationParams {
            protect_min_score: 0.0,
            prefetch_min_score: 0.5,
            prefetch_depth,
            prefetch_top: 8,
            max_protected_fraction: 0.75,
        },
        depth: 2,
        prefetch_budget: budget,
    }
}

#[test]
fn perfect_prefetch_hits_every_access_and_moves_each_expert_once() {
    // Two layers, four experts each, paths that never repeat within the cache's reach.
    let paths: Vec<[[u32; 1]; 2]> = (0..12).map(|i| [[i % 4], [(i + 1) % 4]]).collect();
    let refs: Vec<Vec<&[u32]>> = paths.iter().map(|p| p.iter().map(|e| &e[..]).collect()).collect();
    let refs: Vec<&[&[u32]]> = refs.iter().map(|p| &p[..]).collect();
    let t = trace(4, &refs);
    let oracle = || Box::new(Oracle { trace: t.clone() });
    let lru = run(&t, 2, Contender::Policy(PolicyKind::Lru), None);
    // Prefetch issued one step ahead is in time: every access hits, every load was a prefetch.
    let s = run(&t, 2, Contender::Policy(PolicyKind::Predictive), Some(steering(oracle(), 1, 10)));
    assert_eq!((s.hits, s.accesses, s.demand_bytes), (24, 24, 0));
    assert_eq!(s.prefetches_useful, s.prefetches_issued);
    assert!(s.bytes_moved() <= lru.bytes_moved());
    // Without prefetch (depth 0) or without budget, the predictive policy is LRU.
    for st in [steering(oracle(), 0, 10), steering(oracle(), 1, 0)] {
        let s = run(&t, 2, Contender::Policy(PolicyKind::Predictive), Some(st));
        assert_eq!((s.hits, s.bytes_moved(), s.prefetches_issued), (lru.hits, lru.bytes_moved(), 0));
    }
}

#[test]
fn transition_predictor_learns_fixed_paths_online() {
    // Each token's layer-0 expert decides its whole path; layer 0 itself is unpredictable.
    let paths: Vec<[[u32; 1]; 4]> = (0..200u32)
        .map(|i| {
            let e = (i * 7 + i / 3) % 8;
            [[e], [(e + 1) % 8], [(e + 3) % 8], [(e + 5) % 8]]
        })
        .collect();
    let refs: Vec<Vec<&[u32]>> = paths.iter().map(|p| p.iter().map(|e| &e[..]).collect()).collect();
    let refs: Vec<&[&[u32]]> = refs.iter().map(|p| &p[..]).collect();
    let t = trace(8, &refs);
    let lru = run(&t, 4, Contender::Policy(PolicyKind::Lru), None);
    let p = OnlineKind::Transition.build(RoutingShape::from(&t.meta));
    let s = run(&t, 4, Contender::Policy(PolicyKind::Predictive), Some(steering(p, 1, 10)));
    // Layers 1..4 become hits once the transitions are learned: well over half of all uses.
    assert!(s.hit_rate() > 0.8 && lru.hit_rate() < 0.4, "predictive {} lru {}", s.hit_rate(), lru.hit_rate());
    assert!(s.prefetches_useful as f64 > 0.9 * s.prefetches_issued as f64);
}

#[test]
fn warmup_tokens_are_not_counted() {
    let t = trace(4, &[&[&[0]], &[&[1]], &[&[0]], &[&[1]]]);
    let sizes = ExpertSizes::uniform(&t.meta, 10);
    let s = replay(&t, &sizes, 20, Split::Shared, Contender::Policy(PolicyKind::Lru), None, 2).unwrap();
    assert_eq!((s.tokens, s.accesses, s.hits, s.bytes_moved()), (2, 2, 2, 0));
}

#[test]
fn per_layer_split_gives_each_layer_its_share() {
    // Two layers; layer 1 always uses expert 0, layer 0 cycles through three experts.
    let paths: Vec<[[u32; 1]; 2]> = (0..9).map(|i| [[i % 3], [0]]).collect();
    let refs: Vec<Vec<&[u32]>> = paths.iter().map(|p| p.iter().map(|e| &e[..]).collect()).collect();
    let refs: Vec<&[&[u32]]> = refs.iter().map(|p| &p[..]).collect();
    let t = trace(4, &refs);
    let sizes = ExpertSizes::uniform(&t.meta, 10);
    // Shared, 2 slots: layer 0's loop pushes layer 1's expert out half the time; per layer,
    // layer 1 keeps its slot and hits 8 of 9 times while layer 0 never hits.
    let per_layer =
        replay(&t, &sizes, 20, Split::PerLayer, Contender::Policy(PolicyKind::Lru), None, 0).unwrap();
    assert_eq!(per_layer.hits, 8);
    let err = replay(&t, &sizes, 19, Split::PerLayer, Contender::Policy(PolicyKind::Lru), None, 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a cache of 9 bytes cannot hold the 1 experts one token uses at MoE layer 0"),
        "{err}"
    );
}

#[test]
fn expert_sizes_come_from_the_checkpoint() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixtral");
    // The fixture: 3 sparse layers of 8 experts, hidden 64, intermediate 48, bf16.
    let meta = TraceMeta { model: "fixture".into(), num_experts: 8, top_k: 2, layer_ids: vec![0, 2] };
    let sizes = ExpertSizes::from_model(&dir, &meta).unwrap();
    // As the live store accounts them: each expert's 4 KiB-aligned buffer.
    let model = stevedore_models::Model::load(&dir).unwrap();
    let layouts = crate::store::Layouts::of(&model);
    let alloc = |l: usize, e: usize| layouts.get(ExpertKey::new(l, e)).unwrap().alloc as u64;
    assert_eq!(sizes.get(1, 7), alloc(2, 7));
    assert!(sizes.get(1, 7) >= 3 * 64 * 48 * 2 && sizes.get(1, 7).is_multiple_of(4096));
    assert_eq!(sizes.total(), (0..8).map(|e| alloc(0, e) + alloc(2, e)).sum::<u64>());
    let bad = TraceMeta { num_experts: 64, ..meta.clone() };
    let err = ExpertSizes::from_model(&dir, &bad).unwrap_err().to_string();
    assert!(err.contains("has 8 routed experts per layer but the trace (fixture) has 64"), "{err}");
    let bad = TraceMeta { layer_ids: vec![5], ..meta };
    let err = ExpertSizes::from_model(&dir, &bad).unwrap_err().to_string();
    assert!(err.contains("decoder layer 5, which is not a sparse layer"), "{err}");
}

#[test]
fn report_json_has_the_documented_shape() {
    let t = trace(4, &[&[&[0, 1], &[2, 3]], &[&[1, 2], &[3, 0]], &[&[0, 1], &[2, 3]]]);
    let sizes = ExpertSizes::uniform(&t.meta, 100);
    let cfg = Config::default();
    let report =
        simulate(&t, "toy.jsonl", &cfg, &sizes, &[Size::Percent(50.0), Size::Bytes(600)], 0.0).unwrap();
    let v: serde_json::Value = serde_json::to_value(&report).unwrap();
    assert_eq!((v["trace"].as_str(), v["tokens"].as_u64()), (Some("toy.jsonl"), Some(3)));
    let caps = v["capacities"].as_array().unwrap();
    assert_eq!((caps[0]["capacity"].as_f64(), caps[1]["capacity"].as_f64()), (Some(0.5), Some(0.75)));
    for c in caps {
        for p in ["lru", "lfu", "predictive", "belady"] {
            let r = &c["policies"][p];
            assert!(r["hit_rate"].as_f64().is_some() && r["bytes_moved"].as_u64().is_some(), "{p}: {r}");
        }
    }
    let text = render(&report);
    assert!(text.contains("capacity 50% (400 B)") && text.contains("* predictive"), "{text}");
}

#[test]
fn simulate_reports_missing_expert_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.jsonl");
    crate::trace::write(&path, &trace(4, &[&[&[0]]])).unwrap();
    let args = SimulateArgs {
        trace: path,
        config: None,
        capacity: vec![],
        model: None,
        experts: None,
        holdout: 0.0,
        json: true,
    };
    let err = super::run(&args).unwrap_err().to_string();
    assert!(err.contains("expert sizes unknown: pass --model DIR or set `expert_bytes`"), "{err}");
}

/// The bars, at 25% capacity on every shared trace, with the default config: the
/// predictive policy hits at least as often as LRU while moving at most 1.5x its bytes, and
/// on FLAME-MoE-290M closes at least 70% of the gap between LRU and Belady.
#[test]
fn predictive_meets_the_bars_on_the_shared_traces() {
    let Some(dir) = shared_traces() else { return };
    let files = [
        "flame-moe-290m/flame_moe_290m_prefill_2048tok.csv",
        "flame-moe-290m/flame_moe_290m_first10tok_64seq.csv",
        "mixtral-8x7b/mixtral_humaneval_p0_prefill_decode.csv",
        "mixtral-8x7b/gsm8k_2_routing.jsonl",
        "mixtral-8x7b/humaneval_2_routing.jsonl",
        "qwen1.5-moe-a2.7b/qwen15moe_gsm8k25_5layers.csv",
    ];
    let cfg = Config::default();
    assert_eq!((cfg.cache.policy.name(), cfg.predictor.depth), ("predictive", Layers::Percent(60.0)));
    for file in files {
        let t = crate::trace::load(&dir.join(file)).unwrap();
        let sizes = ExpertSizes::uniform(&t.meta, 1 << 20);
        let r = simulate(&t, file, &cfg, &sizes, &[Size::Percent(25.0)], 0.0).unwrap();
        let p = &r.capacities[0].policies;
        let (lru, pred, belady) = (&p.lru, &p.predictive, &p.belady);
        let ratio = pred.bytes_moved as f64 / lru.bytes_moved as f64;
        let closed = (pred.hit_rate - lru.hit_rate) / (belady.hit_rate - lru.hit_rate);
        println!(
            "{file}: lru {:.3} lfu {:.3} predictive {:.3} belady {:.3}; bytes x{ratio:.2}; gap closed {closed:.2}",
            lru.hit_rate, p.lfu.hit_rate, pred.hit_rate, belady.hit_rate
        );
        assert!(pred.hit_rate >= lru.hit_rate, "{file}: predictive {} < lru {}", pred.hit_rate, lru.hit_rate);
        assert!(ratio <= 1.5, "{file}: predictive moves {ratio:.2}x LRU's bytes");
        assert!(
            belady.hit_rate >= lru.hit_rate && belady.hit_rate >= p.lfu.hit_rate,
            "{file}: Belady below LRU/LFU"
        );
        if file.starts_with("flame-moe-290m/flame_moe_290m_prefill") {
            assert!(closed >= 0.7, "{file}: closes {closed:.2} of the LRU-Belady gap");
        }
    }
}
