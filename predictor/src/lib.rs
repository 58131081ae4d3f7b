//! Routing-path prediction: which experts the next MoE layers (and the next token's first layers)
//! will need. Pure: no IO, no threads. Traces are plain data here; reading and writing them is
//! the engine's job.

mod trace;

pub use trace::{LayerChoice, Phase, TokenRouting, Trace, TraceMeta};

/// One predicted future MoE layer: the experts expected there, best first, with scores in [0, 1].
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
pub trait RoutePredictor: Send {
    fn name(&self) -> &'static str;
    /// A new token starts (its id when known).
    fn begin_token(&mut self, token_id: Option<u32>);
    /// The router of MoE layer `layer` chose `experts` with gate `weights` for the current token.
    fn observe(&mut self, layer: usize, experts: &[u32], weights: &[f32]);
    /// Predictions for the next `depth` MoE layers after the last observed one, nearest first.
    fn predict(&self, depth: usize) -> Vec<Prediction>;
}
