//! Routing traces as data: per token, per MoE layer, the experts chosen and their gate weights.

use std::collections::HashMap;

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

/// A next-gate estimate: at MoE layer `at` (`None`: at the token's start, from its embedding),
/// the router of MoE layer `layer` (further on in the same token) applied to the hidden state
/// available then, before `layer`'s routing is known.
/// Its best experts, best first, with their router probabilities. The live engine makes these
/// (`predictor.kind = "gate"`) and records them in its traces, so that a replay feeds a
/// predictor exactly what it was fed live.
#[derive(Clone, Debug, PartialEq)]
pub struct Foreseen {
    pub at: Option<usize>,
    pub layer: usize,
    pub experts: Vec<u32>,
    /// Parallel to `experts`: the router's softmax probability of each over all experts.
    pub probs: Vec<f32>,
}

/// One token's path through the MoE layers.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenRouting {
    /// Sequence (request) the token belongs to.
    pub seq: u64,
    /// Position within its sequence.
    pub pos: u32,
    /// The forward pass (step) that ran the token, when the trace records it: tokens of one
    /// step shared one batch. `None`: each token is taken as a step of its own.
    pub step: Option<u64>,
    pub token_id: Option<u32>,
    pub phase: Phase,
    /// Indexed by MoE layer; `None` where the trace did not record that layer for this token.
    pub layers: Vec<Option<LayerChoice>>,
    /// Next-gate estimates made while the token ran (empty when none were recorded), in the
    /// order they were made.
    pub ahead: Vec<Foreseen>,
    /// The prefetch horizon in force for the token's step, when the engine set it from
    /// measurement (`predictor.horizon = "auto"`).
    pub horizon: Option<Horizon>,
}

/// How far ahead a step prefetched: MoE layers, and bytes at most per prefetch round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Horizon {
    pub layers: usize,
    pub bytes: u64,
}

impl TokenRouting {
    /// The estimates made at MoE layer `at` (`None`: at the token's start).
    pub fn ahead_at(&self, at: Option<usize>) -> impl Iterator<Item = &Foreseen> {
        self.ahead.iter().filter(move |f| f.at == at)
    }
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

/// For each token of `tokens`, the indices of the previous and the next token of its own
/// sequence (`TokenRouting::seq`), if any: a token's neighbours on its routing path.
pub(crate) fn sequence_neighbours(tokens: &[TokenRouting]) -> Vec<(Option<usize>, Option<usize>)> {
    let mut out = vec![(None, None); tokens.len()];
    let mut last: HashMap<u64, usize> = HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        if let Some(p) = last.insert(t.seq, i) {
            out[i].0 = Some(p);
            out[p].1 = Some(i);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbours_stay_within_their_sequence() {
        let tokens: Vec<TokenRouting> = [0, 1, 0, 2, 1]
            .iter()
            .enumerate()
            .map(|(pos, &seq)| TokenRouting {
                horizon: None,
                ahead: Vec::new(),
                seq,
                pos: pos as u32,
                step: None,
                token_id: None,
                phase: Phase::Decode,
                layers: Vec::new(),
            })
            .collect();
        assert_eq!(
            sequence_neighbours(&tokens),
            [(None, Some(2)), (None, Some(4)), (Some(0), None), (None, None), (Some(1), None)]
        );
    }
}
