//! Routing-path prediction: which experts the next MoE layers (and the next token's first layers)
//! will need. Pure: no IO, no threads. Traces are plain data here; reading and writing them is
//! the engine's job, and so is reading or writing a trained model's bytes.
//!
//! Per-sequence state (where a sequence is on its routing path, what it routed) lives in a
//! [`RouteCursor`]; predictors keep only what they learn across sequences.
//!
//! Predictors (all behind [`RoutePredictor`]):
//! - [`FrequencyPredictor`]: the experts used most often at each layer so far;
//! - [`RecencyPredictor`]: the experts the sequence's most recent token used at each layer;
//! - [`TransitionPredictor`]: inter-layer affinity (ExFlow): experts chosen at layer `l` predict
//!   those at `l + 1`, chained for longer distances, learned online;
//! - [`PathPredictor`]: an ExpertFlow-style learned model of the whole routing path from what is
//!   known early (token id, the layers routed so far), trained offline by [`train_path_model`].
//!
//! [`evaluate`] measures any of them on held-out tokens (recall and precision per distance).

mod baseline;
mod cursor;
mod eval;
mod gate;
mod path;
mod rng;
mod trace;
mod transition;

pub use baseline::{FrequencyPredictor, RecencyPredictor};
pub use cursor::{RouteCursor, Routed, SequenceCursors};
pub use eval::{evaluate, foresee_at, replay, split_holdout, DistanceStats, Hits, Report, Split};
pub use gate::{Ensemble, NextGatePredictor};
pub use path::{train_path_model, ModelError, PathModel, PathPredictor, TrainConfig};
pub use trace::{Foreseen, Horizon, LayerChoice, Phase, TokenRouting, Trace, TraceMeta};
pub use transition::TransitionPredictor;

/// One predicted future MoE layer: the experts expected there, best first, with scores in [0, 1]
/// (at most [`RoutingShape::max_candidates`] of them).
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// How many MoE layers ahead of the last observed one (1 = the next MoE layer).
    pub distance: usize,
    /// MoE layer index (0-based among MoE layers) the prediction is for.
    pub layer: usize,
    /// True when the predicted layer belongs to the next token (the path wrapped around).
    pub next_token: bool,
    pub experts: Vec<(u32, f32)>,
}

/// Predicts the routing ahead of a sequence from what it has routed so far.
///
/// Per-sequence state lives in a [`RouteCursor`] the caller keeps, one per sequence; a predictor
/// keeps only what it learns across sequences (counts, tables, a trained model), so one
/// predictor serves all sequences of a batch. Call order, per token of a sequence:
/// `cursor.begin_token`, then [`observe`] once per MoE layer in increasing layer order (a layer
/// may be skipped when its routing is unknown), which records the routing in the cursor and
/// lets the predictor `learn` from it. `predict` may be called at any point; its distances count
/// from the cursor:
/// - right after `begin_token`, distance 1 is layer 0 of the new token (`next_token == false`);
/// - after observing layer `l`, distance `d` is layer `l + d` of the same token, or, past the
///   last layer, layer `l + d - moe_layers` of the token after it (`next_token == true`);
/// - never past the next token's last layer.
///
/// Cursors must be built for the predictor's MoE layers and experts ([`RoutingShape`]). Inputs
/// out of range are the cursor's to drop (it records none of them), and `learn` ignores a layer
/// the cursor did not record. Implementations keep `learn` and `predict` to microseconds: the
/// predictive cache calls them once per MoE layer per sequence and token.
pub trait RoutePredictor: Send {
    fn name(&self) -> &'static str;
    /// Learns from the routing `cursor` has just recorded at `layer` (called right after
    /// `cursor.observe(layer, ..)`, with the cursor's sequence history as context).
    fn learn(&mut self, cursor: &RouteCursor, layer: usize);
    /// Predictions for the next `depth` MoE layers after `cursor`'s position, nearest first
    /// (fewer when `depth` reaches past the next token's last layer).
    fn predict(&self, cursor: &RouteCursor, depth: usize) -> Vec<Prediction>;
}

/// Records `layer`'s routing in `cursor` and lets `predictor` learn from it: what callers do per
/// observed layer.
pub fn observe(
    predictor: &mut dyn RoutePredictor,
    cursor: &mut RouteCursor,
    layer: usize,
    experts: &[u32],
    weights: &[f32],
) {
    cursor.observe(layer, experts, weights);
    predictor.learn(cursor, layer);
}

/// The dimensions every predictor is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoutingShape {
    /// Number of MoE layers (not decoder layers).
    pub moe_layers: usize,
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts the router picks per token and layer.
    pub top_k: usize,
}

impl From<&TraceMeta> for RoutingShape {
    fn from(meta: &TraceMeta) -> Self {
        RoutingShape { moe_layers: meta.layer_ids.len(), num_experts: meta.num_experts, top_k: meta.top_k }
    }
}

/// The predictors that need no trained model, by the names configs and reports use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnlineKind {
    Frequency,
    Recency,
    Transition,
}

impl OnlineKind {
    pub const ALL: [OnlineKind; 3] = [OnlineKind::Frequency, OnlineKind::Recency, OnlineKind::Transition];

    pub fn name(self) -> &'static str {
        match self {
            OnlineKind::Frequency => "frequency",
            OnlineKind::Recency => "recency",
            OnlineKind::Transition => "transition",
        }
    }

    /// Parses a name as written by [`OnlineKind::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    pub fn build(self, shape: RoutingShape) -> Box<dyn RoutePredictor> {
        match self {
            OnlineKind::Frequency => Box::new(FrequencyPredictor::new(shape)),
            OnlineKind::Recency => Box::new(RecencyPredictor),
            OnlineKind::Transition => Box::new(TransitionPredictor::new(shape)),
        }
    }
}

impl RoutingShape {
    /// How many experts a prediction lists per layer at most: `4 * top_k`. Enough for recall at
    /// `2 * top_k` and for a prefetch budget of a few layers' worth, and cutting there keeps
    /// `predict` cheap when a model has hundreds of experts.
    pub fn max_candidates(&self) -> usize {
        (4 * self.top_k).clamp(1, self.num_experts.max(1))
    }
}

/// Best first; ties go to the lower expert index so results are deterministic.
fn best_first(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Orders `(expert, score)` pairs best first.
pub(crate) fn sort_best_first(experts: &mut [(u32, f32)]) {
    experts.sort_unstable_by(best_first);
}

/// The `limit` best experts with a positive score, best first, from per-expert scores.
pub(crate) fn best_candidates(scores: &[f32], limit: usize) -> Vec<(u32, f32)> {
    // Positive finite floats order like their bit patterns, so one u64 key per expert (score
    // bits high, inverted index low: ties go to the lower index) sorts without a comparator.
    let mut keys: Vec<u64> = (scores.iter().enumerate())
        .filter(|(_, &s)| s > 0.0)
        .map(|(e, &s)| ((s.min(1.0).to_bits() as u64) << 32) | (u32::MAX - e as u32) as u64)
        .collect();
    if keys.len() > limit && limit > 0 {
        keys.select_nth_unstable_by(limit - 1, |a, b| b.cmp(a));
    }
    keys.truncate(limit);
    keys.sort_unstable_by(|a, b| b.cmp(a));
    keys.iter().map(|&k| (u32::MAX - k as u32, f32::from_bits((k >> 32) as u32))).collect()
}
