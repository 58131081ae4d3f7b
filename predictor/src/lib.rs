//! Routing-path prediction: which experts the next MoE layers (and the next token's first layers)
//! will need. Pure: no IO, no threads. Traces are plain data here; reading and writing them is
//! the engine's job, and so is reading or writing a trained model's bytes.
//!
//! Predictors (all behind [`RoutePredictor`]):
//! - [`FrequencyPredictor`]: the experts used most often at each layer so far;
//! - [`RecencyPredictor`]: the experts the most recent token used at each layer;
//! - [`TransitionPredictor`]: inter-layer affinity (ExFlow): experts chosen at layer `l` predict
//!   those at `l + 1`, chained for longer distances, learned online;
//! - [`PathPredictor`]: an ExpertFlow-style learned model of the whole routing path from what is
//!   known early (token id, the layers routed so far), trained offline by [`train_path_model`].
//!
//! [`evaluate`] measures any of them on held-out tokens (recall and precision per distance).

mod baseline;
mod eval;
mod path;
mod rng;
mod trace;
mod transition;

pub use baseline::{FrequencyPredictor, RecencyPredictor};
pub use eval::{evaluate, replay, split_holdout, DistanceStats, Hits, Report, Split};
pub use path::{train_path_model, ModelError, PathModel, PathPredictor, TrainConfig};
pub use trace::{LayerChoice, Phase, TokenRouting, Trace, TraceMeta};
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

/// Observes routing as it happens and predicts what comes next.
///
/// Call order, per token: `begin_token`, then `observe` once per MoE layer in increasing layer
/// order (a layer may be skipped when its routing is unknown). `predict` may be called at any
/// point; its distances count from the cursor:
/// - right after `begin_token`, distance 1 is layer 0 of the new token (`next_token == false`);
/// - after `observe(l, ..)`, distance `d` is layer `l + d` of the same token, or, past the last
///   layer, layer `l + d - num_layers` of the token after it (`next_token == true`).
///
/// Implementations keep `observe` and `predict` to microseconds: the predictive cache calls them
/// once per MoE layer per token. Inputs out of range (a layer or expert index beyond the shape)
/// are ignored rather than trusted, since the trait has no error channel on this hot path.
///
/// The hidden-state "next-gate" predictor (Pre-gated MoE, HOBBIT: apply the routers of layers
/// `l + 1 ..= l + d` to the hidden state entering layer `l`) lives in the engine, which owns the
/// router weights and the activations. It implements this trait too: the engine hands it the
/// router input of each layer through [`RoutePredictor::observe_hidden`] just before `observe`,
/// it keeps the later routers' logits, and `predict` returns their top experts. Other
/// predictors ignore hidden states.
pub trait RoutePredictor: Send {
    fn name(&self) -> &'static str;
    /// A new token starts (its id when known).
    fn begin_token(&mut self, token_id: Option<u32>);
    /// The router of MoE layer `layer` chose `experts` with gate `weights` for the current token.
    /// `weights` may be empty when unknown; otherwise it is parallel to `experts`.
    fn observe(&mut self, layer: usize, experts: &[u32], weights: &[f32]);
    /// Predictions for the next `depth` MoE layers after the last observed one, nearest first
    /// (fewer when `depth` reaches past the next token's last layer).
    fn predict(&self, depth: usize) -> Vec<Prediction>;
    /// The hidden state that MoE layer `layer`'s router reads for the current token (called
    /// before `observe` for that layer). Only hidden-state predictors use it.
    fn observe_hidden(&mut self, _layer: usize, _hidden: &[f32]) {}
}

/// The dimensions every predictor is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoutingShape {
    /// Number of MoE layers (not decoder layers).
    pub num_layers: usize,
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts the router picks per token and layer.
    pub top_k: usize,
}

impl From<&TraceMeta> for RoutingShape {
    fn from(meta: &TraceMeta) -> Self {
        RoutingShape { num_layers: meta.layer_ids.len(), num_experts: meta.num_experts, top_k: meta.top_k }
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
            OnlineKind::Recency => Box::new(RecencyPredictor::new(shape)),
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

/// Where the cursor of a predictor stands: which layer was observed last, of which token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cursor {
    /// `begin_token` was called and no layer of the token observed yet.
    TokenStart,
    /// Layer `l` of the current token was observed last.
    After(usize),
}

impl Cursor {
    /// The `(distance, layer, next_token)` targets at distances `1..=depth`, nearest first,
    /// stopping at the next token's last layer (no predictor looks two tokens ahead).
    pub(crate) fn targets(
        self,
        num_layers: usize,
        depth: usize,
    ) -> impl Iterator<Item = (usize, usize, bool)> {
        // Position of the first target, counted in layers from the current token's layer 0.
        let first = match self {
            Cursor::TokenStart => 0,
            Cursor::After(l) => l + 1,
        };
        let depth = depth.min((2 * num_layers).saturating_sub(first));
        (1..=depth).map(move |d| {
            let pos = first + d - 1;
            (d, pos % num_layers, pos >= num_layers)
        })
    }
}
