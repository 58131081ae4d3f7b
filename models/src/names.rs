//! Tensor names of each architecture's experts, as published on the Hugging Face hub.

use crate::{Arch, ModelConfig};

/// Names of expert `expert`'s gate, up and down projections in decoder layer `layer`.
pub fn expert_tensor_names(arch: Arch, layer: usize, expert: usize) -> [String; 3] {
    match arch {
        Arch::Mixtral | Arch::Phimoe => {
            let p = format!("model.layers.{layer}.block_sparse_moe.experts.{expert}");
            [format!("{p}.w1.weight"), format!("{p}.w3.weight"), format!("{p}.w2.weight")]
        }
        Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::Olmoe | Arch::Glm4Moe => {
            let p = format!("model.layers.{layer}.mlp.experts.{expert}");
            [format!("{p}.gate_proj.weight"), format!("{p}.up_proj.weight"), format!("{p}.down_proj.weight")]
        }
    }
}

/// Shapes of one routed expert's gate, up and down projections.
pub fn expert_tensor_shapes(cfg: &ModelConfig) -> [[usize; 2]; 3] {
    let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    [[i, h], [i, h], [h, i]]
}

/// Whether `name` is a routed expert's weight (as opposed to a dense, resident one).
pub fn is_expert_tensor(name: &str) -> bool {
    name.contains(".experts.")
}
