//! The boundary between a model's MoE layers and wherever expert weights live. Models never
//! know whether an expert comes from RAM, disk or a device: an MoE layer describes what it needs
//! as an [`ExpertPlan`] (which experts, and for each the rows routed to it with their gate
//! weights) and pulls the weights from an [`ExpertSource`]'s [`ExpertStream`] as they become
//! ready. The layer computes each expert's rows as its weights arrive and adds the outputs in
//! ascending expert order at the end, so the result never depends on the order of arrival.

use std::ops::Range;
use std::sync::Arc;

use stevedore_kernels::{DType, SwiGlu, Weight};

use crate::{Error, LayerId, MoeIndex, Row, WeightIndex};

/// One expert's weights as a source hands them over: its three projections, each in its stored
/// format.
pub type ExpertWeights<'a> = SwiGlu<'a>;

/// An error from an expert source (a failed read, a stopped I/O thread). Shared, because one
/// failed expert fails every sequence that was routed to it.
pub type ExpertsError = Arc<dyn std::error::Error + Send + Sync>;

/// One expert a layer needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertUse {
    pub expert: u32,
    /// Its rows and gate weights in [`ExpertPlan::assigned_rows`] / [`ExpertPlan::assigned_weights`].
    pub assigned: Range<usize>,
}

/// What one MoE layer needs for one batch: the router's choice for every row, and the experts
/// to load with the rows routed to each.
#[derive(Clone, Debug)]
pub struct ExpertPlan<'a> {
    pub layer: LayerId,
    pub moe: MoeIndex,
    pub top_k: usize,
    /// The batch's rows (sequence, token, position).
    pub rows: &'a [Row],
    /// Per row, `top_k` experts best first (row-major), as the router chose them.
    pub topk_ids: &'a [u32],
    /// Gate weights parallel to `topk_ids`, after any renormalisation.
    pub topk_weights: &'a [f32],
    /// Whether each row takes part: rows of a sequence that failed earlier in this forward pass
    /// are routed but not assigned to any expert.
    pub routed: &'a [bool],
    /// The experts the routed rows use, ascending.
    pub experts: &'a [ExpertUse],
    /// Row indices (into `rows`) grouped by expert, ascending within each expert.
    pub assigned_rows: &'a [u32],
    /// The gate weight of each entry of `assigned_rows`.
    pub assigned_weights: &'a [f32],
    /// Next-gate estimates of the MoE layers ahead, nearest first, when the source asked for
    /// them ([`ExpertSource::foresight`]); empty otherwise.
    pub ahead: &'a [GateEstimate],
}

/// Which hidden state an MoE layer applies the routers of the layers ahead to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateInput {
    /// The residual stream after the layer's attention: the newest state at the layer's
    /// routing.
    PostAttention,
    /// The residual stream entering the layer, before its attention.
    LayerInput,
}

/// What a source asks each MoE layer to estimate ahead (see [`GateEstimate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Foresight {
    /// MoE layers ahead of the current one (the current token's only).
    pub depth: usize,
    /// Experts kept per row and estimate, best first.
    pub candidates: usize,
    pub input: GateInput,
}

/// A next-gate estimate (mixtral-offloading's speculative loading): at one MoE layer, the
/// router of a later MoE layer applied to a hidden state available now (normalised with that
/// layer's own pre-FFN norm), before the later layer's routing is known. Per row, its best
/// experts with their router probabilities (softmax over every expert).
#[derive(Clone, Debug, PartialEq)]
pub struct GateEstimate {
    pub moe: MoeIndex,
    /// MoE layers between the plan's layer and `moe` (1 = the next MoE layer).
    pub distance: usize,
    /// Experts per row.
    pub per_row: usize,
    /// Row-major, `per_row` each, best first.
    pub experts: Vec<u32>,
    pub probs: Vec<f32>,
}

impl GateEstimate {
    /// Row `r`'s experts and probabilities.
    pub fn row(&self, r: usize) -> (&[u32], &[f32]) {
        let k = self.per_row;
        (&self.experts[r * k..(r + 1) * k], &self.probs[r * k..(r + 1) * k])
    }
}

impl ExpertPlan<'_> {
    /// Rows routed to `self.experts[i]`.
    pub fn rows_of(&self, i: usize) -> &[u32] {
        &self.assigned_rows[self.experts[i].assigned.clone()]
    }

    /// Their gate weights.
    pub fn weights_of(&self, i: usize) -> &[f32] {
        &self.assigned_weights[self.experts[i].assigned.clone()]
    }

    /// The routed rows' `top_k` experts, for row `r`.
    pub fn choice(&self, r: usize) -> (&[u32], &[f32]) {
        let k = self.top_k;
        (&self.topk_ids[r * k..(r + 1) * k], &self.topk_weights[r * k..(r + 1) * k])
    }
}

/// A source could not deliver an expert.
#[derive(Clone, Debug)]
pub struct ExpertFailure {
    /// Which expert of the plan (index into [`ExpertPlan::experts`]); `None` when the source as
    /// a whole failed and the stream ends.
    pub expert: Option<usize>,
    pub error: ExpertsError,
}

/// One layer's experts, delivered as they become ready.
pub trait ExpertStream {
    /// The next experts whose weights are ready, each as its index in the plan's `experts` and
    /// its weights: waits until the next one in the stream's order is ready (those already
    /// resident come first, the others as their reads finish), and gives it with up to `max - 1`
    /// of those after it that are ready too, without waiting for more. The weights stay valid
    /// (pinned where they live) until the next call or until the stream is dropped. Each expert
    /// is delivered or failed exactly once; a failure comes alone; `None` after the last.
    ///
    /// Several at once let a layer compute a decode's experts side by side, one per core,
    /// instead of splitting each small matrix product across the cores.
    fn next_ready(&mut self, max: usize) -> Option<Result<ReadyExperts<'_>, ExpertFailure>>;

    /// The next expert alone (see [`ExpertStream::next_ready`]).
    fn next(&mut self) -> Option<Result<(usize, Served<'_>), ExpertFailure>> {
        self.next_ready(1).map(|r| r.map(|mut v| v.swap_remove(0)))
    }
}

/// What a source serves for one expert of a plan.
#[derive(Clone, Copy, Debug)]
pub enum Served<'a> {
    /// Its weights, in whatever format the source holds them (full precision or a low-bit
    /// copy).
    Weights(ExpertWeights<'a>),
    /// Nothing: the source's precision policy skipped the expert (HOBBIT skips a missed
    /// expert whose gate weight is negligible for every row routed to it), so it adds nothing
    /// to its rows' outputs.
    Skipped,
}

/// Experts ready together: (index in the plan's `experts`, what was served), in delivery
/// order; never empty.
pub type ReadyExperts<'a> = Vec<(usize, Served<'a>)>;

/// Where expert weights come from.
pub trait ExpertSource: Sync {
    /// The next-gate estimates each MoE layer's plan should carry; `None` for none (they cost
    /// a router product per layer ahead).
    fn foresight(&self) -> Option<Foresight>;

    /// What to add to MoE layer `layer`'s router logits before its top-k, one value per
    /// expert, or `None` for nothing (the default routing: the reference's tokens). A source
    /// may favour experts it already holds (cache-conditional routing); the gate weights stay
    /// the unbiased router's.
    fn routing_bias(&self, layer: LayerId) -> Option<Vec<f32>>;

    /// Starts delivering `plan.experts`.
    fn stream<'p>(&'p self, plan: &'p ExpertPlan<'_>) -> Result<Box<dyn ExpertStream + 'p>, ExpertsError>;
}

/// Where one expert tensor lies in the checkpoint: shard, absolute byte range, format, shape.
/// Checked once, when the model loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorLoc {
    pub shard: usize,
    pub offset: u64,
    pub len: u64,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
}

/// Every routed expert's gate, up and down tensors, `[moe layer][expert]`.
#[derive(Clone, Debug)]
pub struct ExpertTensors {
    pub num_experts: usize,
    by_moe: Vec<Vec<[TensorLoc; 3]>>,
}

impl ExpertTensors {
    /// Looks up and checks (dtype, shape, byte length) every routed expert's tensors.
    pub fn load(
        index: &WeightIndex,
        cfg: &crate::ModelConfig,
        layers: &crate::LayerMap,
    ) -> Result<Self, Error> {
        let shapes = crate::names::expert_tensor_shapes(cfg);
        let mut by_moe = Vec::with_capacity(layers.num_moe_layers());
        for &layer in layers.moe_layers() {
            let mut experts = Vec::with_capacity(cfg.num_experts);
            for e in 0..cfg.num_experts {
                let names = crate::names::expert_tensor_names(cfg.arch, layer.0, e);
                let mut locs = Vec::with_capacity(3);
                for (name, &[rows, cols]) in names.iter().zip(&shapes) {
                    let (info, dtype) = index.check(name, &[rows, cols])?;
                    let len = dtype.bytes(cols).map_or(usize::MAX, |row| row.saturating_mul(rows));
                    if info.len != len as u64 {
                        return Err(Error::Tensor {
                            path: index.shards[info.shard].path.clone(),
                            name: name.clone(),
                            msg: format!(
                                "holds {} bytes, but [{rows}, {cols}] {} needs {len}",
                                info.len,
                                dtype.name()
                            ),
                        });
                    }
                    locs.push(TensorLoc {
                        shard: info.shard,
                        offset: info.offset,
                        len: info.len,
                        dtype,
                        rows,
                        cols,
                    });
                }
                experts.push([locs[0], locs[1], locs[2]]);
            }
            by_moe.push(experts);
        }
        Ok(ExpertTensors { num_experts: cfg.num_experts, by_moe })
    }

    /// Tensors already located and checked, `[moe layer][expert]`.
    pub(crate) fn from_locs(num_experts: usize, by_moe: Vec<Vec<[TensorLoc; 3]>>) -> Self {
        ExpertTensors { num_experts, by_moe }
    }

    /// Expert `expert` of MoE layer `moe`: gate, up, down.
    pub fn get(&self, moe: MoeIndex, expert: usize) -> Option<&[TensorLoc; 3]> {
        self.by_moe.get(moe.0)?.get(expert)
    }

    /// Every expert of every MoE layer, with its MoE index and expert number.
    pub fn iter(&self) -> impl Iterator<Item = (MoeIndex, usize, &[TensorLoc; 3])> {
        self.by_moe
            .iter()
            .enumerate()
            .flat_map(|(m, experts)| experts.iter().enumerate().map(move |(e, t)| (MoeIndex(m), e, t)))
    }
}

/// Experts read in place from the memory-mapped checkpoint: everything resident, nothing
/// streamed. The reference that streamed stores must match token for token.
pub struct MappedExperts<'a> {
    index: &'a WeightIndex,
    tensors: &'a ExpertTensors,
}

impl<'a> MappedExperts<'a> {
    pub fn new(model: &'a crate::Model) -> Self {
        MappedExperts { index: &model.index, tensors: &model.experts }
    }
}

struct MappedStream<'p> {
    source: &'p MappedExperts<'p>,
    plan: &'p ExpertPlan<'p>,
    next: usize,
}

impl ExpertStream for MappedStream<'_> {
    fn next_ready(&mut self, max: usize) -> Option<Result<ReadyExperts<'_>, ExpertFailure>> {
        let mut ready = Vec::new();
        while ready.len() < max.max(1) {
            let i = self.next;
            let Some(e) = self.plan.experts.get(i) else { break };
            let Some(locs) = self.source.tensors.get(self.plan.moe, e.expert as usize) else {
                if !ready.is_empty() {
                    break;
                }
                self.next += 1;
                let msg = format!("{} has no expert {}", self.plan.moe, e.expert);
                return Some(Err(ExpertFailure { expert: Some(i), error: Arc::new(Error::Input(msg)) }));
            };
            self.next += 1;
            let w = |t: &TensorLoc| Weight {
                dtype: t.dtype,
                data: &self.source.index.shard_data(t.shard)[t.offset as usize..(t.offset + t.len) as usize],
                rows: t.rows,
                cols: t.cols,
            };
            ready
                .push((i, Served::Weights(SwiGlu { gate: w(&locs[0]), up: w(&locs[1]), down: w(&locs[2]) })));
        }
        (!ready.is_empty()).then_some(Ok(ready))
    }
}

impl ExpertSource for MappedExperts<'_> {
    /// Everything is resident: nothing to prepare for.
    fn foresight(&self) -> Option<Foresight> {
        None
    }

    /// Everything is resident: nothing to favour.
    fn routing_bias(&self, _: LayerId) -> Option<Vec<f32>> {
        None
    }

    fn stream<'p>(&'p self, plan: &'p ExpertPlan<'_>) -> Result<Box<dyn ExpertStream + 'p>, ExpertsError> {
        // The plan's contents outlive 'p; narrowing its lifetime parameter to 'p is a coercion.
        let plan: &'p ExpertPlan<'p> = plan;
        Ok(Box::new(MappedStream { source: self, plan, next: 0 }))
    }
}
