//! Mixtral (`MixtralForCausalLM`): every layer sparse, softmax top-k renormalised, no biases;
//! its sliding window applies whenever the config sets one. Its expert layout
//! (`block_sparse_moe.experts.N.w1/w3/w2`) is Phi-3.5-MoE's too.

use super::{MoeNames, Parts, Shared};
use crate::config::RawConfig;

pub(super) fn parts(raw: &RawConfig, s: &Shared) -> Parts {
    Parts {
        norm_topk_prob: true,
        sliding_window: raw.sliding_window.filter(|&w| w > 0),
        ..Parts::plain(s.intermediate_size)
    }
}

pub(super) fn moe_names(layer: usize) -> MoeNames {
    MoeNames { router: format!("model.layers.{layer}.block_sparse_moe.gate.weight"), shared: None }
}

pub(super) fn expert_names(layer: usize, expert: usize) -> [String; 3] {
    let p = format!("model.layers.{layer}.block_sparse_moe.experts.{expert}");
    [format!("{p}.w1.weight"), format!("{p}.w3.weight"), format!("{p}.w2.weight")]
}
