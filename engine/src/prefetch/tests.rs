//! The driver on a real store over a real temp checkpoint ([`crate::store::testutil`]), with
//! hand-made routing: what the predictor is fed and when, and what protection and prefetch do
//! to hits, misses and the budget, never to the weights handed out.

use std::sync::{Arc, Mutex};

use stevedore_cache::{LookaheadParams, LruPolicy, Policy, PredictivePolicy};
use stevedore_predictor::{OnlineKind, Prediction};

use super::*;
use crate::store::testutil::{nothing_pinned, Fixture};
use crate::store::{StoreOptions, StoreStats};

/// One MoE layer of one decode token: routes `ids` (top-k order) through `experts`, checking
/// every expert's bytes and the ascending call order.
fn decode(fx: &Fixture, experts: &dyn Experts, layer: usize, token: u32, ids: &[u32]) {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    let weights = vec![1.0 / ids.len() as f32; ids.len()];
    let routing = LayerRouting {
        layer,
        first_pos: 0,
        tokens: &[token],
        topk_ids: ids,
        topk_weights: &weights,
        top_k: ids.len(),
        experts: &sorted,
    };
    let mut seen = Vec::new();
    experts
        .for_each(&routing, &mut |e, w| {
            fx.check(layer, e, &w);
            seen.push(e);
            Ok(())
        })
        .unwrap();
    assert_eq!(seen, sorted);
}

/// Decode routing: `[token][layer]` -> the layer's top-2 experts.
type Script = Vec<Vec<[u32; 2]>>;

/// Runs every token of `script` through `experts`, layer by layer.
fn run_script(fx: &Fixture, experts: &dyn Experts, script: &Script) {
    for (t, layers) in script.iter().enumerate() {
        for (l, ids) in layers.iter().enumerate() {
            decode(fx, experts, l, t as u32, ids);
        }
    }
}

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
/// Makes protection and prefetch deterministic to test the driver and store around them.
struct Oracle {
    script: Script,
    /// Index of the current token; `None` before the first.
    token: Option<usize>,
    /// Position of the next layer to be routed, counted from the current token's layer 0.
    next: usize,
}

impl Oracle {
    fn boxed(script: &Script) -> Box<dyn RoutePredictor> {
        Box::new(Oracle { script: script.clone(), token: None, next: 0 })
    }
}

impl RoutePredictor for Oracle {
    fn name(&self) -> &'static str {
        "oracle"
    }
    fn begin_token(&mut self, _: Option<u32>) {
        self.token = Some(self.token.map_or(0, |t| t + 1));
        self.next = 0;
    }
    fn observe(&mut self, layer: usize, _: &[u32], _: &[f32]) {
        self.next = layer + 1;
    }
    fn predict(&self, depth: usize) -> Vec<Prediction> {
        let Some(token) = self.token else { return Vec::new() };
        (1..=depth)
            .filter_map(|d| {
                let pos = self.next + d - 1;
                let ids = self.script.get(token + pos / 3)?.get(pos % 3)?;
                let experts = ids.iter().map(|&e| (e, 1.0)).collect();
                Some(Prediction { distance: d, layer: pos % 3, next_token: pos >= 3, experts })
            })
            .collect()
    }
}

fn params(prefetch_depth: usize) -> LookaheadParams {
    LookaheadParams {
        protect_min_score: 0.0,
        prefetch_min_score: 0.0,
        prefetch_depth,
        prefetch_top: 2,
        max_protected_fraction: 1.0,
    }
}

/// How a test steers the store: predictor, lookahead params, prefetch budget, depth.
type Steering = (Box<dyn RoutePredictor>, LookaheadParams, u64, usize);

/// A store steered as `steering` says (or plain LRU when `None`) runs `script`; returns its
/// stats after checking the budget, the pins and the request count.
fn replay(fx: &Fixture, budget: u64, steering: Option<Steering>, script: &Script) -> StoreStats {
    let policy: Box<dyn Policy> =
        if steering.is_some() { Box::new(PredictivePolicy::new()) } else { Box::new(LruPolicy::new()) };
    let mut store = ExpertStore::new(&fx.index, &fx.cfg, budget, policy, StoreOptions::default()).unwrap();
    match steering {
        Some((predictor, params, prefetch_budget, depth)) => {
            store.set_lookahead(params, prefetch_budget);
            let driver = Prefetcher::new(&store, &fx.cfg, predictor, depth).unwrap();
            run_script(fx, &driver, script);
            assert_eq!(driver.stats().steps, (3 * script.len()) as u64);
        }
        None => run_script(fx, &store, script),
    }
    assert!(nothing_pinned(&store), "a pin leaked");
    let s = store.stats();
    assert!(s.peak_bytes <= budget, "peak {} over budget {budget}: {s:?}", s.peak_bytes);
    assert_eq!(s.hits + s.misses, (6 * script.len()) as u64, "every expert asked for once: {s:?}");
    s
}

/// Accounted bytes of the fixture's experts of `layer`.
fn layer_bytes(fx: &Fixture, layer: usize) -> u64 {
    let store = fx.store(u64::MAX, StoreOptions::default());
    (0..8).map(|e| store.expert_bytes(ExpertKey::new(layer, e)).unwrap()).max().unwrap()
}

#[test]
fn predicted_experts_are_prefetched_while_the_layer_computes_and_then_hit() {
    let fx = Fixture::new();
    let script = random_script(24);
    let largest = (0..3).map(|l| layer_bytes(&fx, l)).max().unwrap();
    let budget = 8 * largest;
    let lru = replay(&fx, budget, None, &script);
    let steered = replay(&fx, budget, Some((Oracle::boxed(&script), params(1), 2 * largest, 3)), &script);
    eprintln!("lru {lru:?}\npredictive {steered:?}");
    assert_eq!((lru.policy, steered.policy), ("lru", "predictive"));
    assert_eq!(lru.prefetch_reads, 0);
    // Every layer after the very first is predicted exactly and read a layer ahead, so the only
    // demand misses are the first layer's; every prefetch is used.
    assert!(steered.prefetch_reads > 0);
    assert_eq!(steered.misses, 2, "{steered:?}");
    assert_eq!(steered.prefetch_hits, steered.prefetch_reads, "{steered:?}");
    assert!(steered.misses < lru.misses);
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
    let protect_only = replay(&fx, budget, Some((Oracle::boxed(&script), params(0), 0, 1)), &script);
    eprintln!("lru {lru:?}\nprotected {protect_only:?}");
    assert_eq!(protect_only.prefetch_reads, 0);
    assert!(3 * protect_only.misses <= 2 * lru.misses, "a third fewer misses than LRU: {protect_only:?}");
}

/// At the minimum budget with every expert predicted and protectable, each layer's misses
/// must still find room (protection yields to demand) and the budget still holds.
#[test]
fn protection_yields_to_demand_at_the_minimum_budget() {
    struct Everything;
    impl RoutePredictor for Everything {
        fn name(&self) -> &'static str {
            "everything"
        }
        fn begin_token(&mut self, _: Option<u32>) {}
        fn observe(&mut self, _: usize, _: &[u32], _: &[f32]) {}
        fn predict(&self, depth: usize) -> Vec<Prediction> {
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
}

/// The weights handed to the model, and the order, never depend on the budget, the predictor
/// or prefetching: `decode` checks every byte and the order on each call.
#[test]
fn outputs_do_not_depend_on_steering_or_budget() {
    let fx = Fixture::new();
    let script = random_script(16);
    let largest = (0..3).map(|l| layer_bytes(&fx, l)).max().unwrap();
    for budget in [u64::MAX, 10 * largest, 4 * largest + 123, fx.min_budget()] {
        let lru = replay(&fx, budget, None, &script);
        for (kind, prefetch_budget) in [(OnlineKind::Transition, 3 * largest), (OnlineKind::Recency, 0)] {
            let shape = routing_shape(&fx.cfg);
            let s = replay(&fx, budget, Some((kind.build(shape), params(2), prefetch_budget, 2)), &script);
            eprintln!("budget {budget} {}: {s:?} (lru misses {})", kind.name(), lru.misses);
        }
    }
}

/// What the predictor sees: a prefill batch token-major once all its layers are routed, then
/// each decode token starting at the first MoE layer; predictions only where the store uses
/// them.
#[test]
fn the_predictor_learns_prefill_token_major_and_decode_as_it_runs() {
    #[derive(Debug, PartialEq)]
    enum Call {
        Begin(Option<u32>),
        Observe(usize, Vec<u32>, Vec<f32>),
        Predict(usize),
    }
    struct Log(Arc<Mutex<Vec<Call>>>);
    impl RoutePredictor for Log {
        fn name(&self) -> &'static str {
            "log"
        }
        fn begin_token(&mut self, token: Option<u32>) {
            self.0.lock().unwrap().push(Call::Begin(token));
        }
        fn observe(&mut self, layer: usize, experts: &[u32], weights: &[f32]) {
            self.0.lock().unwrap().push(Call::Observe(layer, experts.to_vec(), weights.to_vec()));
        }
        fn predict(&self, depth: usize) -> Vec<Prediction> {
            self.0.lock().unwrap().push(Call::Predict(depth));
            Vec::new()
        }
    }
    let fx = Fixture::new();
    let mut store = fx.store(u64::MAX, StoreOptions::default());
    store.set_lookahead(params(1), u64::MAX);
    let log = Arc::new(Mutex::new(Vec::new()));
    let driver = Prefetcher::new(&store, &fx.cfg, Box::new(Log(Arc::clone(&log))), 2).unwrap();

    // Prefill of tokens 7 and 9: per layer, token 0 picks (l, l+1), token 1 picks (l+4, l+5).
    for l in 0..3u32 {
        let ids = [l, l + 1, l + 4, l + 5];
        let weights = [0.6, 0.4, 0.7, 0.3];
        let experts = [l, l + 1, l + 4, l + 5];
        let routing = LayerRouting {
            layer: l as usize,
            first_pos: 0,
            tokens: &[7, 9],
            topk_ids: &ids,
            topk_weights: &weights,
            top_k: 2,
            experts: &experts,
        };
        driver
            .for_each(&routing, &mut |e, w| {
                fx.check(l as usize, e, &w);
                Ok(())
            })
            .unwrap();
        if l < 2 {
            assert!(log.lock().unwrap().is_empty(), "nothing fed before the batch's last layer");
        }
    }
    decode(&fx, &driver, 0, 11, &[3, 6]);
    decode(&fx, &driver, 1, 11, &[2, 0]);

    let obs = |l, e: [u32; 2], w: [f32; 2]| Call::Observe(l, e.to_vec(), w.to_vec());
    let want = vec![
        Call::Begin(Some(7)),
        obs(0, [0, 1], [0.6, 0.4]),
        obs(1, [1, 2], [0.6, 0.4]),
        obs(2, [2, 3], [0.6, 0.4]),
        Call::Begin(Some(9)),
        obs(0, [4, 5], [0.7, 0.3]),
        obs(1, [5, 6], [0.7, 0.3]),
        obs(2, [6, 7], [0.7, 0.3]),
        Call::Predict(2),
        Call::Begin(Some(11)),
        obs(0, [3, 6], [0.5, 0.5]),
        Call::Predict(2),
        obs(1, [2, 0], [0.5, 0.5]),
        Call::Predict(2),
    ];
    assert_eq!(*log.lock().unwrap(), want);
    assert_eq!(driver.stats().steps, 3);
}

#[test]
fn routing_for_a_dense_layer_is_an_error() {
    let fx = Fixture::new();
    let store = fx.store(u64::MAX, StoreOptions::default());
    let driver =
        Prefetcher::new(&store, &fx.cfg, OnlineKind::Transition.build(routing_shape(&fx.cfg)), 2).unwrap();
    let routing = LayerRouting {
        layer: 5,
        first_pos: 0,
        tokens: &[1],
        topk_ids: &[0, 1],
        topk_weights: &[0.5, 0.5],
        top_k: 2,
        experts: &[0, 1],
    };
    let err = driver.for_each(&routing, &mut |_, _| Ok(())).unwrap_err().to_string();
    assert!(err.contains("layer 5"), "{err}");
}
