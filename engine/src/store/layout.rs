//! Where each expert's bytes lie: on disk (shard, aligned spans) and in its one buffer. Built
//! once from the expert tensors the model checked at load; this and the expert keys are all the
//! store knows of the model.

use stevedore_cache::{ExpertKey, Precision};
use stevedore_kernels::{DType, SwiGlu, Weight};
use stevedore_models::{ExpertTensors, ExpertWeights, LayerId, LayerMap, Model, TensorLoc};

use super::StoreError;
use crate::io::{Span, ALIGN};

/// One tensor's place in its expert's buffer.
#[derive(Clone, Debug)]
pub(crate) struct TensorSlot {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    /// Offset of the first byte in the expert's buffer.
    pub at: usize,
    pub len: usize,
}

/// One read: an aligned span of one shard, placed at `at` (a multiple of `ALIGN`) in the buffer.
#[derive(Clone, Debug)]
pub(crate) struct Segment {
    pub shard: usize,
    pub span: Span,
    pub at: usize,
}

#[derive(Clone, Debug)]
pub(crate) struct ExpertLayout {
    /// Gate, up, down.
    pub tensors: [TensorSlot; 3],
    /// One per group of tensors close enough on disk to read together; usually exactly one.
    pub segments: Vec<Segment>,
    /// Bytes of the expert's buffer: the segments' aligned spans end to end. This is what the
    /// cache accounts, so the budget counts real allocations, padding included.
    pub alloc: usize,
}

impl ExpertLayout {
    /// The three weights, borrowed from the expert's filled buffer.
    pub fn weights<'a>(&self, buf: &'a [u8]) -> ExpertWeights<'a> {
        let w = |t: &TensorSlot| Weight {
            dtype: t.dtype,
            data: &buf[t.at..t.at + t.len],
            rows: t.rows,
            cols: t.cols,
        };
        SwiGlu { gate: w(&self.tensors[0]), up: w(&self.tensors[1]), down: w(&self.tensors[2]) }
    }
}

/// Every routed expert of every MoE layer, planned once from the tensors the model checked at
/// load, and what they cost the store.
pub struct Layouts {
    /// Indexed by decoder layer; `None` for dense layers.
    by_layer: Vec<Option<Vec<ExpertLayout>>>,
    /// The low-bit copies, likewise, when the store may use them.
    low: Option<Vec<Option<Vec<ExpertLayout>>>>,
    num_experts: usize,
    footprint: ExpertFootprint,
}

/// What a checkpoint's routed experts cost the store, in accounted (aligned) bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ExpertFootprint {
    /// Routed experts over all MoE layers.
    pub experts: u64,
    /// The largest expert's buffer.
    pub max_expert_bytes: u64,
    /// All experts' buffers: a budget of this much holds every expert at once.
    pub total_bytes: u64,
    /// The smallest budget the store accepts: `top_k` times `max_expert_bytes`, one layer's
    /// active experts for one token.
    pub min_budget: u64,
    /// The low-bit copies', when the store uses them: the largest and all together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub low_max_expert_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub low_total_bytes: Option<u64>,
}

impl Layouts {
    /// Layouts of `model`'s experts.
    pub fn of(model: &Model) -> Self {
        Self::new(&model.experts, &model.layers, model.config.num_experts_per_tok)
    }

    /// Layouts of `tensors`, for a model of `map`'s layers whose router picks `top_k` experts.
    pub fn new(tensors: &ExpertTensors, map: &LayerMap, top_k: usize) -> Self {
        let (by_layer, experts, max_alloc, total) = plan_all(tensors, map);
        let top_k = top_k as u64;
        let footprint = ExpertFootprint {
            experts,
            max_expert_bytes: max_alloc,
            total_bytes: total,
            min_budget: top_k * max_alloc,
            low_max_expert_bytes: None,
            low_total_bytes: None,
        };
        Layouts { by_layer, low: None, num_experts: tensors.num_experts, footprint }
    }

    /// With the low-bit copies `tensors` too (keys of [`Precision::Low`]).
    pub fn with_low(mut self, tensors: &ExpertTensors, map: &LayerMap) -> Self {
        let (low, _, max_alloc, total) = plan_all(tensors, map);
        self.footprint.low_max_expert_bytes = Some(max_alloc);
        self.footprint.low_total_bytes = Some(total);
        self.low = Some(low);
        self
    }

    pub fn footprint(&self) -> ExpertFootprint {
        self.footprint
    }

    /// Every expert in `precision` (none without its copies) with its accounted bytes, in
    /// layer order (then expert id): the order a warm start reads them in, the order the first
    /// tokens need them.
    pub fn all_keys(&self, precision: Precision) -> Vec<(ExpertKey, u64)> {
        let mut keys = Vec::with_capacity(self.footprint.experts as usize);
        for (layer, experts) in self.of_precision(precision).into_iter().flatten().enumerate() {
            for (e, layout) in experts.iter().flatten().enumerate() {
                keys.push((ExpertKey::new(layer, e).at(precision), layout.alloc as u64));
            }
        }
        keys
    }

    /// Experts per MoE layer.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// The low-bit copies' format, if the store has them.
    pub fn low_format(&self) -> Option<DType> {
        let first = self.low.as_ref()?.iter().flatten().next()?.first()?;
        Some(first.tensors[0].dtype)
    }

    /// Whether keys of [`Precision::Low`] have layouts.
    pub fn has_low(&self) -> bool {
        self.low.is_some()
    }

    fn of_precision(&self, precision: Precision) -> Option<&Vec<Option<Vec<ExpertLayout>>>> {
        match precision {
            Precision::Full => Some(&self.by_layer),
            Precision::Low => self.low.as_ref(),
        }
    }

    pub(crate) fn get(&self, key: ExpertKey) -> Option<&ExpertLayout> {
        self.of_precision(key.precision)?.get(key.layer as usize)?.as_ref()?.get(key.expert as usize)
    }

    /// Checks that `key` names a routed expert of this model, in a precision the store holds.
    pub(crate) fn check(&self, key: ExpertKey) -> Result<&ExpertLayout, StoreError> {
        let layer = LayerId(key.layer as usize);
        let by_layer = self.of_precision(key.precision).ok_or(StoreError::NoLowBitCopies)?;
        match by_layer.get(layer.0) {
            Some(Some(experts)) => experts.get(key.expert as usize).ok_or(StoreError::NoSuchExpert {
                layer: layer.0,
                expert: key.expert as usize,
                num_experts: self.num_experts,
            }),
            _ => Err(StoreError::NotMoeLayer { layer: layer.0, num_layers: self.by_layer.len() }),
        }
    }
}

/// Every expert's layout by decoder layer, with the count, the largest and the total bytes.
type Planned = (Vec<Option<Vec<ExpertLayout>>>, u64, u64, u64);

fn plan_all(tensors: &ExpertTensors, map: &LayerMap) -> Planned {
    let mut by_layer = vec![None; map.num_decoder_layers()];
    let (mut experts, mut max_alloc, mut total) = (0u64, 0u64, 0u64);
    for (moe, e, tensors) in tensors.iter() {
        let layer = map.decoder(moe).expect("expert tensors exist for MoE layers only");
        let layout = expert_layout(tensors);
        max_alloc = max_alloc.max(layout.alloc as u64);
        experts += 1;
        total += layout.alloc as u64;
        let slot: &mut Option<Vec<ExpertLayout>> = &mut by_layer[layer.0];
        let v = slot.get_or_insert_with(Vec::new);
        debug_assert_eq!(v.len(), e);
        v.push(layout);
    }
    (by_layer, experts, max_alloc, total)
}

/// Plans an expert's reads: tensors of the same shard whose aligned blocks touch or overlap are
/// read as one span (the usual case: a checkpoint stores an expert's projections side by side),
/// others separately.
fn expert_layout(tensors: &[TensorLoc; 3]) -> ExpertLayout {
    let mut found: Vec<(usize, &TensorLoc)> = tensors.iter().enumerate().collect();
    found.sort_by_key(|(_, t)| (t.shard, t.offset));

    // Group tensors into reads: (shard, first offset, end offset, members).
    type Group<'a> = (usize, u64, u64, Vec<(usize, &'a TensorLoc)>);
    let mut groups: Vec<Group> = Vec::new();
    for &(i, t) in &found {
        let end = t.offset + t.len;
        match groups.last_mut() {
            Some((shard, _, group_end, members))
                if *shard == t.shard
                    && t.offset - t.offset % ALIGN as u64 <= group_end.next_multiple_of(ALIGN as u64) =>
            {
                *group_end = (*group_end).max(end);
                members.push((i, t));
            }
            _ => groups.push((t.shard, t.offset, end, vec![(i, t)])),
        }
    }

    let mut slots: [Option<TensorSlot>; 3] = [None, None, None];
    let mut segments = Vec::with_capacity(groups.len());
    let mut at = 0;
    for (shard, start, end, members) in groups {
        let span = Span::enclosing(start, (end - start) as usize);
        for (i, t) in members {
            let pos = at + (t.offset - span.start) as usize;
            slots[i] =
                Some(TensorSlot { dtype: t.dtype, rows: t.rows, cols: t.cols, at: pos, len: t.len as usize });
        }
        segments.push(Segment { shard, span, at });
        at += span.padded;
    }
    let [Some(gate), Some(up), Some(down)] = slots else {
        unreachable!("each of the three tensors joins one group")
    };
    ExpertLayout { tensors: [gate, up, down], segments, alloc: at }
}
