//! Qwen2-MoE and Qwen3-MoE: `moe_intermediate_size` experts, dense layers by
//! `decoder_sparse_step` and `mlp_only_layers`, a sliding window only with
//! `use_sliding_window`. Qwen2-MoE: q/k/v bias and a sigmoid-gated shared expert; Qwen3-MoE:
//! per-head q/k norm. Their expert layout (`mlp.experts.N.gate_proj/up_proj/down_proj`) is
//! OLMoE's and GLM's too.

use super::{MoeNames, Parts, QkNormKind, Shared};
use crate::config::{req, RawConfig};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Version {
    Qwen2,
    Qwen3,
}

pub(super) fn parts(raw: &RawConfig, s: &Shared, v: Version) -> Result<Parts, String> {
    let shared = match v {
        Version::Qwen2 => {
            raw.shared_expert_intermediate_size.ok_or("missing field `shared_expert_intermediate_size`")?
        }
        Version::Qwen3 => 0,
    };
    Ok(Parts {
        moe_intermediate_size: req(raw.moe_intermediate_size, "moe_intermediate_size")?,
        shared_expert_intermediate_size: shared,
        shared_expert_gated: v == Version::Qwen2,
        norm_topk_prob: raw.norm_topk_prob.unwrap_or(false),
        decoder_sparse_step: req(raw.decoder_sparse_step.or(Some(1)), "decoder_sparse_step")?,
        mlp_only_layers: raw.mlp_only_layers.clone().unwrap_or_default(),
        attention_bias: v == Version::Qwen2 || raw.attention_bias.unwrap_or(false),
        qk_norm: if v == Version::Qwen3 { QkNormKind::PerHead } else { QkNormKind::None },
        // The configs carry `sliding_window` with `use_sliding_window: false` (transformers 5
        // writes Qwen2-MoE's unused window as 0).
        sliding_window: match raw.use_sliding_window.unwrap_or(false) {
            true => raw.sliding_window.filter(|&w| w > 0),
            false => None,
        },
        ..Parts::plain(s.intermediate_size)
    })
}

pub(super) fn moe_names(layer: usize) -> MoeNames {
    let mlp = format!("model.layers.{layer}.mlp");
    MoeNames { router: format!("{mlp}.gate.weight"), shared: Some(format!("{mlp}.shared_expert")) }
}

pub(super) fn expert_names(layer: usize, expert: usize) -> [String; 3] {
    let p = format!("model.layers.{layer}.mlp.experts.{expert}");
    [format!("{p}.gate_proj.weight"), format!("{p}.up_proj.weight"), format!("{p}.down_proj.weight")]
}
