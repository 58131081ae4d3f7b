//! Routing traces as data: per token, per MoE layer, the experts chosen and their gate weights.

/// Whether a token was part of the prompt (processed as a batch) or generated one at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Prefill,
    Decode,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LayerChoice {
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

/// One token's path through the MoE layers.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenRouting {
    /// Sequence (request) the token belongs to.
    pub seq: u32,
    /// Position within its sequence.
    pub pos: u32,
    pub token_id: Option<u32>,
    pub phase: Phase,
    /// Indexed by MoE layer; `None` where the trace did not record that layer for this token.
    pub layers: Vec<Option<LayerChoice>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TraceMeta {
    /// Free-form model name.
    pub model: String,
    pub num_experts: usize,
    pub top_k: usize,
    /// Decoder-layer index of each MoE layer (its length is the number of MoE layers).
    pub layer_ids: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    pub meta: TraceMeta,
    /// Tokens in the order they were processed.
    pub tokens: Vec<TokenRouting>,
}

impl Trace {
    pub fn num_layers(&self) -> usize {
        self.meta.layer_ids.len()
    }
}
