//! Tensor names of each architecture's experts, as published on the Hugging Face hub.

use crate::{Arch, ModelConfig};

/// Names of expert `expert`'s gate, up and down projections in decoder layer `layer` (each
/// family says: [`crate::family::expert_tensor_names`]).
pub fn expert_tensor_names(arch: Arch, layer: usize, expert: usize) -> [String; 3] {
    crate::family::expert_tensor_names(arch, layer, expert)
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
