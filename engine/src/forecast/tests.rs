//! The forecaster alone (what the predictor is fed and when, how sequences' predictions
//! combine), then driving a real store over a real temp checkpoint
//! ([`crate::store::testutil`]) as the engine does: what protection and prefetch do to hits,
//! misses and the budget, never to the weights handed out.

use std::sync::{Arc, Mutex};

use stevedore_cache::{AnticipationParams, PolicyKind};
use stevedore_predictor::{OnlineKind, Prediction, RouteCursor};

use super::*;
use crate::store::testutil::{nothing_pinned, stream_all, Fixture, PlanData};
use crate::store::{ExpertStore, StoreOptions, StoreStats};

const SHAPE: RoutingShape = RoutingShape { moe_layers: 3, num_experts: 8, top_k: 2 };

/// Decode routing: `[token][layer]` -> the layer's top-2 experts.
type Script = Vec<Vec<[u32; 2]>>;

/// A deterministic, varied decode workload over the fixture's 3 layers and 8 experts.
fn random_script(tokens: usize) -> Script {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % 8) as u32
    };
    (0..tokens)
        .map(|_| {
            (0..3)
                .map(|_| {
                    let a = next();
                    let b = (a + 1 + next() % 7) % 8;
                    [a, b]
                })
                .collect()
        })
        .collect()
}

/// Knows the whole script: predicts exactly the experts each coming layer will use, score 1.
/// Makes protection and prefetch deterministic to test the store around them. Tokens carry
/// their index in the script as their id.
struct Oracle {
    script: Script,
}

impl RoutePredictor for Oracle {
    fn name(&self) -> &'static str {
        "oracle"
    }
    fn learn(&mut self, _: &RouteCursor, _: usize) {}
    fn predict(&self, cursor: &RouteCursor, depth: usize) -> Vec<Prediction> {
        let Some(token) = cursor.token_id() else { return Vec::new() };
        let token = token as usize;
        // Position of the next layer to be routed, counted from the current token's layer 0.
        let next = cursor.last_layer().map_or(0, |l| l + 1);
        (1..=depth)
            .filter_map(|d| {
                let pos = next + d - 1;
                let ids = self.script.get(token + pos / 3)?.get(pos % 3)?;
                let experts = ids.iter().map(|&e| (e, 1.0)).collect();
                Some(Prediction { distance: d, layer: pos % 3, next_token: pos >= 3, experts })
            })
            .collect()
    }
}

fn params(prefetch_depth: usize) -> AnticipationParams {
    AnticipationParams {
        protect_min_score: 0.0,
        prefetch_min_score: 0.0,
        prefetch_depth,
        prefetch_top: 2,
        max_protected_fraction: 1.0,
    }
}

/// Runs `script` as decode steps of one sequence through `store`, steered by `forecaster` as
/// the engine's step loop and expert source do.
fn run_script(fx: &Fixture, store: &ExpertStore, mut forecaster: Option<&mut Forecaster>, script: &Script) {
    for (t, layers) in script.iter().enumerate() {
        let rows = [StepRow { seq: 0, token: Some(t as u32) }];
        if let Some(f) = forecaster.as_deref_mut() {
            store.begin_step(&f.begin_step(&rows, |_| Vec::new()));
        }
        for (l, ids) in layers.iter().enumerate() {
            let data = PlanData::rows(l, &[ids.to_vec()]);
            let plan = data.plan();
            let candidates = match forecaster.as_deref_mut() {
                Some(f) => f.observe(l, |r| Some(plan.choice(r)), |_| Vec::new()),
                None => Vec::new(),
            };
            let mut seen = stream_all(fx, store, &plan, &candidates).unwrap();
            seen.sort_unstable();
            let mut want = ids.to_vec();
            want.sort_unstable();
            assert_eq!(seen, want);
        }
    }
}

/// A store steered by `predictor` (or plain LRU) runs `script`; returns its stats after checking
/// the budget, the pins and the request count.
fn replay(
    fx: &Fixture,
    budget: u64,
    steering: Option<(Box<dyn RoutePredictor>, AnticipationParams, u64, usize)>,
    script: &Script,
) -> StoreStats {
    let policy = if steering.is_some() { PolicyKind::Predictive } else { PolicyKind::Lru };
    let opts = StoreOptions { policy, ..StoreOptions::default() };
    match steering {
        Some((predictor, params, prefetch_budget, depth)) => {
            let store = fx.try_store(budget, opts, Some((params, prefetch_budget))).unwrap();
            let mut f = Forecaster::new(predictor, SHAPE, vec![0, 1, 2], depth);
            run_script(fx, &store, Some(&mut f), script);
            // One prediction at each token's start and one per layer.
            assert_eq!(f.stats().predictions, (4 * script.len()) as u64);
            check(fx, &store, budget, script)
        }
        None => {
            let store = fx.store(budget, opts);
            run_script(fx, &store, None, script);
            check(fx, &store, budget, script)
        }
    }
}

fn check(_fx: &Fixture, store: &ExpertStore, budget: u64, script: &Script) -> StoreStats {
    assert!(nothing_pinned(store), "a pin leaked");
    let s = store.stats();
    assert!(s.peak_bytes <= budget && s.buffer_peak_bytes <= budget, "over budget {budget}: {s:?}");
    assert_eq!(s.hits + s.misses, (6 * script.len()) as u64, "every expert asked for once: {s:?}");
    s
}

/// Accounted bytes of the fixture's largest expert.
fn largest(fx: &Fixture) -> u64 {
    fx.layouts().footprint().max_expert_bytes
}

#[test]
fn predicted_experts_are_prefetched_while_the_layer_computes_and_then_hit() {
    let fx = Fixture::new();
    let script = random_script(24);
    let budget = 8 * largest(&fx);
    let lru = replay(&fx, budget, None, &script);
    let oracle = Box::new(Oracle { script: script.clone() });
    let steered = replay(&fx, budget, Some((oracle, params(1), 2 * largest(&fx), 3)), &script);
    eprintln!("lru {lru:?}\npredictive {steered:?}");
    assert_eq!((lru.policy, steered.policy), ("lru", "predictive"));
    assert_eq!(lru.prefetch_reads, 0);
    // Every layer is predicted exactly and read a step ahead (the first at the token's start),
    // so nothing misses and every prefetch is used.
    assert!(steered.prefetch_reads > 0);
    assert_eq!(steered.misses, 0, "{steered:?}");
    assert_eq!(steered.prefetch_hits, steered.prefetch_reads, "{steered:?}");
}

/// Experts used in a loop over the layers: each token routes like the last. With room for
/// less than the loop, LRU evicts what the next layers are about to use; protecting the next
/// layer's experts moves the victim to the layer that just ran, the one needed last (what
/// Belady's policy would evict).
#[test]
fn protection_keeps_what_lru_would_evict_on_a_loop() {
    let fx = Fixture::new();
    let script: Script = vec![vec![[0, 1], [2, 3], [4, 5]]; 10];
    let store = fx.store(u64::MAX, StoreOptions::default());
    let working_set: u64 = (0..3usize)
        .flat_map(|l| [2 * l, 2 * l + 1].map(|e| store.expert_bytes(ExpertKey::new(l, e)).unwrap()))
        .sum();
    let budget = working_set - 1;
    let lru = replay(&fx, budget, None, &script);
    let oracle = Box::new(Oracle { script: script.clone() });
    let protect_only = replay(&fx, budget, Some((oracle, params(0), 0, 1)), &script);
    eprintln!("lru {lru:?}\nprotected {protect_only:?}");
    assert_eq!(protect_only.prefetch_reads, 0);
    assert!(3 * protect_only.misses <= 2 * lru.misses, "a third fewer misses than LRU: {protect_only:?}");
}

/// At the minimum budget with every expert predicted and protectable, each layer's misses
/// must still find room (protection yields to demand) and the budget still holds; with online
/// predictors at every budget the weights are exactly the file's (checked on every expert).
#[test]
fn protection_yields_to_demand_at_the_minimum_budget() {
    struct Everything;
    impl RoutePredictor for Everything {
        fn name(&self) -> &'static str {
            "everything"
        }
        fn learn(&mut self, _: &RouteCursor, _: usize) {}
        fn predict(&self, _: &RouteCursor, depth: usize) -> Vec<Prediction> {
            (1..=depth)
                .map(|d| Prediction {
                    distance: d,
                    layer: d % 3,
                    next_token: false,
                    experts: (0..8).map(|e| (e, 1.0)).collect(),
                })
                .collect()
        }
    }
    let fx = Fixture::new();
    let script = random_script(12);
    for prefetch_budget in [0, u64::MAX] {
        let s = replay(
            &fx,
            fx.min_budget(),
            Some((Box::new(Everything), params(3), prefetch_budget, 3)),
            &script,
        );
        assert!(s.misses > 0 && s.protected_evictions > 0, "{s:?}");
    }
    for budget in [u64::MAX, 10 * largest(&fx), 4 * largest(&fx) + 123, fx.min_budget()] {
        for kind in [OnlineKind::Transition, OnlineKind::Recency] {
            replay(&fx, budget, Some((kind.build(SHAPE), params(2), 3 * largest(&fx), 2)), &script);
        }
    }
}

#[derive(Debug, PartialEq)]
enum Call {
    /// Token id, layer, experts and weights, as the cursor recorded them.
    Learn(Option<u32>, usize, Vec<u32>, Vec<f32>),
    Predict(Option<u32>, Option<usize>),
}

/// Logs what it is fed; predicts `(layer + 1) % 3`'s expert `token id % 8`, score 0.5.
struct Log(Arc<Mutex<Vec<Call>>>);

impl RoutePredictor for Log {
    fn name(&self) -> &'static str {
        "log"
    }
    fn learn(&mut self, cursor: &RouteCursor, layer: usize) {
        let routed = cursor.current(layer).unwrap().in_router_order();
        let (experts, weights) = routed.iter().copied().unzip();
        self.0.lock().unwrap().push(Call::Learn(cursor.token_id(), layer, experts, weights));
    }
    fn predict(&self, cursor: &RouteCursor, _: usize) -> Vec<Prediction> {
        self.0.lock().unwrap().push(Call::Predict(cursor.token_id(), cursor.last_layer()));
        let layer = cursor.last_layer().map_or(0, |l| (l + 1) % 3);
        let e = cursor.token_id().unwrap_or(0) % 8;
        vec![Prediction { distance: 1, layer, next_token: false, experts: vec![(e, 0.5)] }]
    }
}

/// What the predictor sees in a step that mixes a prompt chunk (tokens 7, 9 of sequence 1) and
/// a decode token (11, of sequence 2): the decode token at its start and at every layer; the
/// chunk token-major once its last layer is routed.
#[test]
fn prompt_chunks_are_fed_token_major_at_the_last_layer_and_decode_tokens_as_they_run() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut f = Forecaster::new(Box::new(Log(Arc::clone(&log))), SHAPE, vec![0, 1, 2], 2);
    let rows = [
        StepRow { seq: 2, token: Some(11) },
        StepRow { seq: 1, token: Some(7) },
        StepRow { seq: 1, token: Some(9) },
    ];
    let start = f.begin_step(&rows, |_| Vec::new());
    assert_eq!(start.iter().map(|c| (c.key, c.distance)).collect::<Vec<_>>(), [(ExpertKey::new(0, 3), 1)]);
    // Per layer l: the decode token picks (l, 3); the chunk's tokens (l, l+1) and (l+4, l+5).
    let choice = |l: u32| {
        vec![
            (vec![l, 3], vec![0.5, 0.5]),
            (vec![l, l + 1], vec![0.6, 0.4]),
            (vec![l + 4, l + 5], vec![0.7, 0.3]),
        ]
    };
    for l in 0..3u32 {
        let c = choice(l);
        f.observe(l as usize, |r| Some((&c[r].0[..], &c[r].1[..])), |_| Vec::new());
    }
    let learn = |t, l, e: [u32; 2], w: [f32; 2]| Call::Learn(Some(t), l, e.to_vec(), w.to_vec());
    let want = vec![
        Call::Predict(Some(11), None),
        learn(11, 0, [0, 3], [0.5, 0.5]),
        Call::Predict(Some(11), Some(0)),
        learn(11, 1, [1, 3], [0.5, 0.5]),
        Call::Predict(Some(11), Some(1)),
        learn(11, 2, [2, 3], [0.5, 0.5]),
        learn(7, 0, [0, 1], [0.6, 0.4]),
        learn(7, 1, [1, 2], [0.6, 0.4]),
        learn(7, 2, [2, 3], [0.6, 0.4]),
        learn(9, 0, [4, 5], [0.7, 0.3]),
        learn(9, 1, [5, 6], [0.7, 0.3]),
        learn(9, 2, [6, 7], [0.7, 0.3]),
        Call::Predict(Some(11), Some(2)),
        Call::Predict(Some(9), Some(2)),
    ];
    assert_eq!(*log.lock().unwrap(), want);
    assert_eq!(f.stats().predictions, 5);
}

/// Two sequences predicting the same expert: the chance that either routes there, at the
/// nearer distance; one sequence's score is kept exactly.
#[test]
fn predictions_of_several_sequences_combine() {
    struct Fixed;
    impl RoutePredictor for Fixed {
        fn name(&self) -> &'static str {
            "fixed"
        }
        fn learn(&mut self, _: &RouteCursor, _: usize) {}
        fn predict(&self, cursor: &RouteCursor, _: usize) -> Vec<Prediction> {
            let seq_a = cursor.token_id() == Some(1);
            let (d, s) = if seq_a { (1, 0.3) } else { (2, 0.5) };
            let mut experts = vec![(4, s)];
            if seq_a {
                experts.push((6, 0.3));
            }
            vec![Prediction { distance: d, layer: 1, next_token: false, experts }]
        }
    }
    let mut f = Forecaster::new(Box::new(Fixed), SHAPE, vec![0, 5, 9], 2);
    let c = f.begin_step(&[StepRow { seq: 10, token: Some(1) }, StepRow { seq: 20, token: Some(2) }], |_| {
        Vec::new()
    });
    assert_eq!(c.len(), 2);
    assert_eq!((c[0].key, c[0].distance), (ExpertKey::new(5, 4), 1));
    assert!((c[0].score - (1.0 - 0.7 * 0.5)).abs() < 1e-6, "{c:?}");
    assert_eq!((c[1].key, c[1].score), (ExpertKey::new(5, 6), 0.3));
    f.end_sequence(10);
    assert_eq!(f.cursors.len(), 1);
}

/// Sequences follow their own routing: recency predicts each from its own last token, however
/// the two interleave in the batch.
#[test]
fn each_sequence_predicts_from_its_own_history() {
    let mut f = Forecaster::new(OnlineKind::Recency.build(SHAPE), SHAPE, vec![0, 1, 2], 1);
    let rows = [StepRow { seq: 1, token: Some(1) }, StepRow { seq: 2, token: Some(2) }];
    for step in 0..2 {
        f.begin_step(&rows, |_| Vec::new());
        for l in 0..3 {
            let c = [(vec![l as u32, 7], vec![0.5, 0.5]), (vec![(l + 3) as u32, 7], vec![0.5, 0.5])];
            let cands = f.observe(l, |r| Some((&c[r].0[..], &c[r].1[..])), |_| Vec::new());
            if step == 1 && l == 0 {
                // Layer 1 next: sequence 1 used {1, 7} there, sequence 2 {4, 7}.
                let mut keys: Vec<u32> = cands.iter().map(|c| c.key.expert).collect();
                keys.sort_unstable();
                assert_eq!(keys, [1, 4, 7]);
            }
        }
    }
}

/// Each sequence's next-layer prediction is scored against what that layer then routed: recency
/// predicts layer l+1 from the previous token's layer l+1, which repeats here, so every scored
/// prediction is right; scoring against the wrong layer would find half of them wrong.
#[test]
fn next_layer_predictions_are_scored_against_the_routing_that_followed() {
    let mut f = Forecaster::new(OnlineKind::Recency.build(SHAPE), SHAPE, vec![0, 1, 2], 1);
    let rows = [StepRow { seq: 1, token: Some(1) }, StepRow { seq: 2, token: Some(2) }];
    for _ in 0..3 {
        f.begin_step(&rows, |_| Vec::new());
        for l in 0..3 {
            let c = [(vec![l as u32, 7], vec![0.5, 0.5]), (vec![(l + 3) as u32, 7], vec![0.5, 0.5])];
            f.observe(l, |r| Some((&c[r].0[..], &c[r].1[..])), |_| Vec::new());
        }
    }
    let s = f.stats();
    assert!(s.predicted > 0 && s.routed >= s.predicted, "{s:?}");
    assert_eq!(s.correct, s.predicted, "{s:?}");
    assert_eq!(s.precision(), 1.0);
    assert!(s.recall() > 0.5 && s.recall() <= 1.0, "{s:?}");
}
