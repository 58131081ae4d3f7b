//! Where each expert's bytes lie: on disk (shard, aligned spans) and in its one buffer. Built
//! once from the weight index; this and the expert keys are all the store knows of the model.

use stevedore_cache::ExpertKey;
use stevedore_kernels::{DType, Weight};
use stevedore_models::names::{expert_tensor_names, expert_tensor_shapes};
use stevedore_models::{Error as ModelError, ExpertWeights, ModelConfig, WeightIndex};

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
        ExpertWeights { gate: w(&self.tensors[0]), up: w(&self.tensors[1]), down: w(&self.tensors[2]) }
    }
}

/// Every routed expert of every MoE layer.
pub(crate) struct Layouts {
    /// Indexed by decoder layer; `None` for dense layers.
    by_layer: Vec<Option<Vec<ExpertLayout>>>,
    pub num_experts: usize,
    /// The largest expert buffer.
    pub max_alloc: usize,
}

impl Layouts {
    pub fn build(index: &WeightIndex, cfg: &ModelConfig) -> Result<Self, StoreError> {
        let shapes = expert_tensor_shapes(cfg);
        let mut by_layer = vec![None; cfg.num_hidden_layers];
        let mut max_alloc = 0;
        for layer in cfg.moe_layers() {
            let mut experts = Vec::with_capacity(cfg.num_experts);
            for expert in 0..cfg.num_experts {
                let names = expert_tensor_names(cfg.arch, layer, expert);
                let layout = expert_layout(index, &names, &shapes)?;
                max_alloc = max_alloc.max(layout.alloc);
                experts.push(layout);
            }
            by_layer[layer] = Some(experts);
        }
        Ok(Layouts { by_layer, num_experts: cfg.num_experts, max_alloc })
    }

    /// Every expert of every MoE layer.
    pub fn iter(&self) -> impl Iterator<Item = &ExpertLayout> {
        self.by_layer.iter().flatten().flatten()
    }

    pub fn get(&self, key: ExpertKey) -> Option<&ExpertLayout> {
        self.by_layer.get(key.layer as usize)?.as_ref()?.get(key.expert as usize)
    }

    /// Checks that `key` names a routed expert of this model.
    pub fn check(&self, key: ExpertKey) -> Result<&ExpertLayout, StoreError> {
        let layer = key.layer as usize;
        match self.by_layer.get(layer) {
            Some(Some(experts)) => experts.get(key.expert as usize).ok_or(StoreError::NoSuchExpert {
                layer,
                expert: key.expert as usize,
                num_experts: self.num_experts,
            }),
            _ => Err(StoreError::NotMoeLayer { layer, num_layers: self.by_layer.len() }),
        }
    }
}

/// Looks up and checks an expert's three tensors, and plans its reads: tensors of the same
/// shard whose aligned blocks touch or overlap are read as one span (the usual case: a
/// checkpoint stores an expert's projections side by side), others separately.
fn expert_layout(
    index: &WeightIndex,
    names: &[String; 3],
    shapes: &[[usize; 2]; 3],
) -> Result<ExpertLayout, StoreError> {
    struct Found {
        tensor: usize,
        dtype: DType,
        shard: usize,
        offset: u64,
        len: usize,
    }
    let mut found = Vec::with_capacity(3);
    for (tensor, (name, shape)) in names.iter().zip(shapes).enumerate() {
        let (info, dtype) = index.check(name, shape)?;
        let len = shape[0] * shape[1] * dtype.size();
        if info.len != len as u64 {
            return Err(ModelError::Tensor {
                path: index.shards[info.shard].path.clone(),
                name: name.clone(),
                msg: format!("holds {} bytes, but {shape:?} {} needs {len}", info.len, dtype.name()),
            }
            .into());
        }
        found.push(Found { tensor, dtype, shard: info.shard, offset: info.offset, len });
    }
    found.sort_by_key(|f| (f.shard, f.offset));

    // Group tensors into reads: (shard, first offset, end offset, members).
    let mut groups: Vec<(usize, u64, u64, Vec<&Found>)> = Vec::new();
    for f in &found {
        let end = f.offset + f.len as u64;
        match groups.last_mut() {
            Some((shard, _, group_end, members))
                if *shard == f.shard
                    && f.offset - f.offset % ALIGN as u64 <= group_end.next_multiple_of(ALIGN as u64) =>
            {
                *group_end = (*group_end).max(end);
                members.push(f);
            }
            _ => groups.push((f.shard, f.offset, end, vec![f])),
        }
    }

    let mut slots: [Option<TensorSlot>; 3] = [None, None, None];
    let mut segments = Vec::with_capacity(groups.len());
    let mut at = 0;
    for (shard, start, end, members) in groups {
        let span = Span::enclosing(start, (end - start) as usize);
        for f in members {
            let [rows, cols] = shapes[f.tensor];
            let pos = at + (f.offset - span.start) as usize;
            slots[f.tensor] = Some(TensorSlot { dtype: f.dtype, rows, cols, at: pos, len: f.len });
        }
        segments.push(Segment { shard, span, at });
        at += span.padded;
    }
    let [Some(gate), Some(up), Some(down)] = slots else {
        unreachable!("each of the three tensors joins one group")
    };
    Ok(ExpertLayout { tensors: [gate, up, down], segments, alloc: at })
}
