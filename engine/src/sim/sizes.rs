//! Bytes of each routed expert, from a model checkpoint's safetensors headers or from the
//! config's `simulator.expert_bytes`.

use std::path::Path;

use stevedore_models::names::expert_tensor_names;
use stevedore_models::{ModelConfig, WeightIndex};

use super::SimError;
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

    /// Sizes from the checkpoint in `dir` (config.json and safetensors headers; no weights are
    /// read). The model must match the trace: same number of routed experts, and every traced
    /// layer a sparse layer of the model.
    pub fn from_model(dir: &Path, meta: &TraceMeta) -> Result<Self, SimError> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        if cfg.num_experts != meta.num_experts {
            return Err(SimError::Invalid(format!(
                "the model in {} has {} routed experts per layer but the trace ({}) has {}",
                dir.display(),
                cfg.num_experts,
                meta.model,
                meta.num_experts
            )));
        }
        let index = WeightIndex::open(dir)?;
        let mut bytes = Vec::with_capacity(meta.layer_ids.len());
        for &layer in &meta.layer_ids {
            let layer = layer as usize;
            if layer >= cfg.num_hidden_layers || !cfg.is_moe_layer(layer) {
                return Err(SimError::Invalid(format!(
                    "the trace routes decoder layer {layer}, which is not a sparse layer of the model in {}",
                    dir.display()
                )));
            }
            let per_expert = (0..meta.num_experts)
                .map(|e| {
                    let names = expert_tensor_names(cfg.arch, layer, e);
                    names.iter().try_fold(0u64, |sum, n| Ok::<_, SimError>(sum + index.info(n)?.len))
                })
                .collect::<Result<Vec<u64>, _>>()?;
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
