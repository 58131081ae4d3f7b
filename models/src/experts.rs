//! The interface between a model's MoE layers and wherever expert weights live. Models never
//! know whether an expert comes from RAM, disk or a device; they describe the routing and are
//! handed each expert's weights in turn.

use stevedore_kernels::Weight;

/// One expert's three projections (SwiGLU MLP): `down(silu(gate(x)) * up(x))`.
#[derive(Clone, Copy, Debug)]
pub struct ExpertWeights<'a> {
    /// `[intermediate, hidden]`
    pub gate: Weight<'a>,
    /// `[intermediate, hidden]`
    pub up: Weight<'a>,
    /// `[hidden, intermediate]`
    pub down: Weight<'a>,
}

/// The routing of one MoE layer for a batch of tokens.
#[derive(Clone, Copy, Debug)]
pub struct LayerRouting<'a> {
    /// Decoder layer index.
    pub layer: usize,
    /// Position (in the sequence) of the first token of the batch.
    pub first_pos: usize,
    /// The batch's token ids (what routing predictors key on).
    pub tokens: &'a [u32],
    /// Experts chosen per token: `n_tokens * top_k` entries, token-major, in router order.
    pub topk_ids: &'a [u32],
    /// Gate weight of each chosen expert, same layout as `topk_ids` (after any renormalisation).
    pub topk_weights: &'a [f32],
    pub top_k: usize,
    /// Distinct experts the batch uses, ascending: the order in which `for_each` must yield them.
    pub experts: &'a [u32],
}

impl LayerRouting<'_> {
    pub fn n_tokens(&self) -> usize {
        self.topk_ids.len() / self.top_k
    }
}

pub type ExpertsError = Box<dyn std::error::Error + Send + Sync>;

/// Source of expert weights.
pub trait Experts: Sync {
    /// Calls `f(expert, weights)` for every expert in `routing.experts`, in that order.
    /// Implementations may load, prefetch and evict as they like between calls, but the weights
    /// passed to `f` stay valid for the duration of that call.
    fn for_each(
        &self,
        routing: &LayerRouting<'_>,
        f: &mut dyn FnMut(u32, ExpertWeights<'_>) -> Result<(), ExpertsError>,
    ) -> Result<(), ExpertsError>;
}

/// Experts read in place from the memory-mapped checkpoint: everything resident, nothing
/// streamed. The reference that streamed stores must match token for token.
pub struct MappedExperts<'a> {
    index: &'a crate::WeightIndex,
    config: &'a crate::ModelConfig,
}

impl<'a> MappedExperts<'a> {
    pub fn new(index: &'a crate::WeightIndex, config: &'a crate::ModelConfig) -> Self {
        MappedExperts { index, config }
    }
}

impl Experts for MappedExperts<'_> {
    fn for_each(
        &self,
        routing: &LayerRouting<'_>,
        f: &mut dyn FnMut(u32, ExpertWeights<'_>) -> Result<(), ExpertsError>,
    ) -> Result<(), ExpertsError> {
        let shapes = crate::names::expert_tensor_shapes(self.config);
        for &e in routing.experts {
            let names = crate::names::expert_tensor_names(self.config.arch, routing.layer, e as usize);
            let [gate, up, down] =
                [0, 1, 2].map(|i| self.index.get(&names[i], &shapes[i]).map(|t| t.matrix()));
            f(e, ExpertWeights { gate: gate?, up: up?, down: down? })?;
        }
        Ok(())
    }
}
