//! Live routing prediction for the `predictive` policy: [`Prefetcher`] wraps the
//! [`ExpertStore`] as the model's [`Experts`] source, feeds each MoE layer's routing to a
//! [`RoutePredictor`], turns its predictions for the next `depth` MoE layers into
//! [`Candidate`]s, and hands them to the store with the layer
//! ([`ExpertStore::for_each_steered`]), which protects and prefetches through its
//! `Lookahead`. The predictor stays pure and the store stays "keys and byte ranges": this is
//! the only place where the two meet.
//!
//! Steps, as the simulator takes them (`sim::replay`):
//! - Decode (one token per forward pass): at the first MoE layer `begin_token(token)`; at every
//!   MoE layer `observe` its routing, `predict`, and pass the candidates with the layer. The
//!   store moves protection onto them before loading the layer's misses, and queues the planned
//!   prefetches right after the layer's demand reads, so they are read while it computes.
//!   The simulator's token-start step (a prediction made before the first MoE layer's routing
//!   is known) has no live counterpart: the token id is known only when the forward pass runs,
//!   and by the time the first MoE layer asks for experts, its routing is known too. The
//!   previous token's last layer already predicted (and prefetched) the new token's first ones.
//! - Prefill (a batch of prompt tokens): the predictor learns from the prompt token-major once
//!   the routing of every MoE layer is known, at the batch's last MoE layer, which then predicts
//!   the first generated token's layers. Earlier layers of the batch drop the protection and
//!   prefetch nothing: a batch routes to most experts anyway, and the predictor has not seen
//!   its routing yet.
//!
//! Cost: one `observe` and one `predict` per MoE layer and token (microseconds; see
//! [`PrefetchStats::seconds`]), nothing per expert.

use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;
use stevedore_cache::{Candidate, ExpertKey};
use stevedore_models::{ExpertWeights, Experts, ExpertsError, LayerRouting, ModelConfig};
use stevedore_predictor::{Prediction, RoutePredictor, RoutingShape};

use crate::store::{ExpertStore, StoreError};

/// The routing shape of `cfg`'s MoE layers, what predictors are built for.
pub fn routing_shape(cfg: &ModelConfig) -> RoutingShape {
    RoutingShape {
        num_layers: cfg.moe_layers().count(),
        num_experts: cfg.num_experts,
        top_k: cfg.num_experts_per_tok,
    }
}

/// What the driver did, for the stats JSON.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PrefetchStats {
    pub predictor: &'static str,
    /// MoE layers looked ahead.
    pub depth: usize,
    /// Predictions made (one per decode MoE layer, one per prefill batch).
    pub steps: u64,
    /// Time spent feeding the predictor and building candidates, in all.
    pub seconds: f64,
}

/// An [`Experts`] source that steers an [`ExpertStore`] with a routing predictor. See the
/// module docs. The store must have a lookahead set ([`ExpertStore::set_lookahead`]) for the
/// predictions to protect or prefetch anything.
pub struct Prefetcher<'a> {
    store: &'a ExpertStore,
    /// Decoder layer id of each MoE layer.
    layer_ids: Vec<usize>,
    /// MoE index of each decoder layer (`None` for dense layers).
    moe_index: Vec<Option<usize>>,
    /// Accounted bytes of each expert, `[moe_layer][expert]`.
    bytes: Vec<Vec<u64>>,
    depth: usize,
    state: Mutex<State>,
}

/// One MoE layer's routing of a prefill batch, kept until the batch's last MoE layer.
#[derive(Clone)]
struct BatchLayer {
    top_k: usize,
    /// Token-major, `top_k` per token.
    ids: Vec<u32>,
    weights: Vec<f32>,
}

struct State {
    predictor: Box<dyn RoutePredictor>,
    /// A prefill batch's routing so far, per MoE layer.
    batch: Vec<Option<BatchLayer>>,
    steps: u64,
    seconds: f64,
}

impl<'a> Prefetcher<'a> {
    /// Steers `store` (built for `cfg`) with `predictor`, looking `depth` MoE layers ahead.
    pub fn new(
        store: &'a ExpertStore,
        cfg: &ModelConfig,
        predictor: Box<dyn RoutePredictor>,
        depth: usize,
    ) -> Result<Self, StoreError> {
        let layer_ids: Vec<usize> = cfg.moe_layers().collect();
        let mut moe_index = vec![None; cfg.num_hidden_layers];
        let mut bytes = Vec::with_capacity(layer_ids.len());
        for (m, &l) in layer_ids.iter().enumerate() {
            moe_index[l] = Some(m);
            let sizes: Result<Vec<u64>, _> =
                (0..cfg.num_experts).map(|e| store.expert_bytes(ExpertKey::new(l, e))).collect();
            bytes.push(sizes?);
        }
        let state = State { predictor, batch: vec![None; layer_ids.len()], steps: 0, seconds: 0.0 };
        Ok(Prefetcher { store, layer_ids, moe_index, bytes, depth, state: Mutex::new(state) })
    }

    pub fn stats(&self) -> PrefetchStats {
        let st = self.lock();
        PrefetchStats {
            predictor: st.predictor.name(),
            depth: self.depth,
            steps: st.steps,
            seconds: st.seconds,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere leaves the predictor usable: at worst it missed one observation.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Feeds `routing` to the predictor; returns the candidates to steer this layer with.
    fn observe(&self, moe: usize, routing: &LayerRouting<'_>) -> Vec<Candidate> {
        let t0 = Instant::now();
        let mut st = self.lock();
        let (k, n) = (routing.top_k, routing.n_tokens());
        let weights = |t: usize| routing.topk_weights.get(t * k..(t + 1) * k).unwrap_or(&[]);
        if n == 1 {
            if moe == 0 {
                st.predictor.begin_token(routing.tokens.first().copied());
            }
            st.predictor.observe(moe, routing.topk_ids, weights(0));
        } else {
            if moe == 0 {
                st.batch.iter_mut().for_each(|b| *b = None);
            }
            st.batch[moe] = Some(BatchLayer {
                top_k: k,
                ids: routing.topk_ids.to_vec(),
                weights: routing.topk_weights.to_vec(),
            });
            if moe + 1 < self.layer_ids.len() {
                return Vec::new();
            }
            let State { predictor, batch, .. } = &mut *st;
            for t in 0..n {
                predictor.begin_token(routing.tokens.get(t).copied());
                for (l, layer) in batch.iter().enumerate() {
                    // A layer of another batch size (or missing) is skipped, as predictors allow.
                    let Some(BatchLayer { top_k: k, ids, weights }) = layer else { continue };
                    if let Some(ids) = ids.get(t * k..(t + 1) * k) {
                        predictor.observe(l, ids, weights.get(t * k..(t + 1) * k).unwrap_or(&[]));
                    }
                }
            }
            batch.iter_mut().for_each(|b| *b = None);
        }
        let candidates = self.candidates(&st.predictor.predict(self.depth));
        st.steps += 1;
        st.seconds += t0.elapsed().as_secs_f64();
        candidates
    }

    /// Predictions as the store's candidates (experts or layers out of range are dropped).
    fn candidates(&self, predictions: &[Prediction]) -> Vec<Candidate> {
        let mut out = Vec::new();
        for p in predictions {
            let (Some(&layer), Some(bytes)) = (self.layer_ids.get(p.layer), self.bytes.get(p.layer)) else {
                continue;
            };
            for &(e, score) in &p.experts {
                if let Some(&b) = bytes.get(e as usize) {
                    let key = ExpertKey::new(layer, e as usize);
                    out.push(Candidate { key, distance: p.distance, score, bytes: b });
                }
            }
        }
        out
    }
}

impl Experts for Prefetcher<'_> {
    fn for_each(
        &self,
        routing: &LayerRouting<'_>,
        f: &mut dyn FnMut(u32, ExpertWeights<'_>) -> Result<(), ExpertsError>,
    ) -> Result<(), ExpertsError> {
        let moe =
            self.moe_index.get(routing.layer).copied().flatten().ok_or_else(|| {
                format!("layer {} routed experts but the config marks it dense", routing.layer)
            })?;
        let candidates = self.observe(moe, routing);
        self.store.for_each_steered(routing, Some(&candidates), f)
    }
}

#[cfg(test)]
mod tests;
