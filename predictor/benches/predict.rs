//! Cost of running each predictor live: one token = the cursor's `begin_token`, then per MoE
//! layer `observe` (the cursor records, the predictor learns) + `predict(3)`, as the predictive
//! cache calls them. Divide by the number of layers for the per-layer cost.
//!
//! `cargo bench -p stevedore-predictor --bench predict`

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use stevedore_predictor::{
    observe, replay, train_path_model, LayerChoice, OnlineKind, PathPredictor, Phase, RouteCursor,
    RoutePredictor, RoutingShape, SequenceCursors, TokenRouting, TrainConfig,
};

/// Synthetic routing with some layer-to-layer structure (each layer's experts are a noisy
/// function of the previous layer's), deterministic.
fn tokens(shape: RoutingShape, n: usize) -> Vec<TokenRouting> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..n)
        .map(|i| {
            let mut lead = (next() % shape.num_experts as u64) as u32;
            let layers = (0..shape.moe_layers)
                .map(|_| {
                    lead = (lead * 7 + (next() % 3) as u32) % shape.num_experts as u32;
                    let mut experts = vec![lead];
                    while experts.len() < shape.top_k {
                        let e = (next() % shape.num_experts as u64) as u32;
                        if !experts.contains(&e) {
                            experts.push(e);
                        }
                    }
                    let weights = vec![1.0 / shape.top_k as f32; shape.top_k];
                    Some(LayerChoice { experts, weights })
                })
                .collect();
            TokenRouting {
                ahead: Vec::new(),
                horizon: None,
                seq: 0,
                pos: i as u32,
                step: None,
                token_id: Some((next() % 500) as u32),
                phase: Phase::Prefill,
                layers,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let shapes = [
        ("flame_8x64_top6", RoutingShape { moe_layers: 8, num_experts: 64, top_k: 6 }),
        ("qwen_24x60_top4", RoutingShape { moe_layers: 24, num_experts: 60, top_k: 4 }),
        ("mixtral_32x8_top2", RoutingShape { moe_layers: 32, num_experts: 8, top_k: 2 }),
    ];
    for (label, shape) in shapes {
        let train = tokens(shape, 1000);
        let test = tokens(shape, 200);
        let model = Arc::new(train_path_model(shape, &train, &TrainConfig::default()).unwrap());
        let mut predictors: Vec<Box<dyn RoutePredictor>> =
            OnlineKind::ALL.iter().map(|kind| kind.build(shape)).collect();
        predictors.push(Box::new(PathPredictor::new(model)));
        for mut p in predictors {
            let mut cursors = SequenceCursors::new(shape);
            replay(p.as_mut(), &mut cursors, &train);
            let mut cursor: RouteCursor = cursors.of(0).clone();
            let mut i = 0;
            c.bench_function(&format!("{label}/{}/token", p.name()), |b| {
                b.iter(|| {
                    let t = &test[i % test.len()];
                    i += 1;
                    cursor.begin_token(t.token_id);
                    let mut n = 0;
                    for (l, choice) in t.layers.iter().enumerate() {
                        let choice = choice.as_ref().unwrap();
                        observe(p.as_mut(), &mut cursor, l, &choice.experts, &choice.weights);
                        n += p.predict(&cursor, 3).len();
                    }
                    n
                })
            });
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
