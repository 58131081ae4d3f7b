//! Bytes of each routed expert, from a model checkpoint (as the live store accounts them) or
//! from the config's `simulator.expert_bytes`.

use std::path::Path;

use stevedore_cache::ExpertKey;
use stevedore_models::{LayerId, Model};

use super::SimError;
use crate::store::Layouts;
use crate::trace::TraceMeta;

/// `bytes[moe_layer][expert]`: what loading that expert moves.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertSizes {
    bytes: Vec<Vec<u64>>,
}

impl ExpertSizes {
    /// Every expert of every MoE layer of `meta` occupies `bytes`.
    pub fn uniform(meta: &TraceMeta, bytes: u64) -> Self {
        ExpertSizes { bytes: vec![vec![bytes; meta.num_experts]; meta.layer_ids.len()] }
    }

    /// Sizes from the checkpoint in `dir`, as the live store accounts them: each expert's
    /// 4 KiB-aligned buffer (so that "25%" is the same budget live and simulated). The model must
    /// match the trace: same number of routed experts, and every traced layer a sparse layer of
    /// the model.
    pub fn from_model(dir: &Path, meta: &TraceMeta) -> Result<Self, SimError> {
        let model = Model::load(dir)?;
        let cfg = &model.config;
        if cfg.num_experts != meta.num_experts {
            return Err(SimError::Invalid(format!(
                "the model in {} has {} routed experts per layer but the trace ({}) has {}",
                dir.display(),
                cfg.num_experts,
                meta.model,
                meta.num_experts
            )));
        }
        let layouts = Layouts::of(&model);
        let mut bytes = Vec::with_capacity(meta.layer_ids.len());
        for &layer in &meta.layer_ids {
            let layer = layer as usize;
            if model.layers.moe(LayerId(layer)).is_none() {
                return Err(SimError::Invalid(format!(
                    "the trace routes decoder layer {layer}, which is not a sparse layer of the model in {}",
                    dir.display()
                )));
            }
            let per_expert = (0..meta.num_experts)
                .map(|e| layouts.check(ExpertKey::new(layer, e)).map(|l| l.alloc as u64))
                .collect::<Result<Vec<u64>, _>>()
                .map_err(|e| SimError::Invalid(e.to_string()))?;
            bytes.push(per_expert);
        }
        Ok(ExpertSizes { bytes })
    }

    /// Bytes of `expert` in MoE layer `layer`.
    pub fn get(&self, layer: usize, expert: u32) -> u64 {
        self.bytes[layer][expert as usize]
    }

    /// The largest expert of MoE layer `layer`.
    pub fn largest(&self, layer: usize) -> u64 {
        self.bytes[layer].iter().copied().max().unwrap_or(0)
    }

    /// Bytes of all routed experts of all traced layers: what a capacity percentage is of.
    pub fn total(&self) -> u64 {
        self.bytes.iter().flatten().sum()
    }
}
