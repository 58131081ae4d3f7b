//! GLM-4.5 / 4.5-Air (`Glm4MoeForCausalLM`): DeepSeek-V3's router (sigmoid scores with a
//! correction bias, group-limited top-k, routed scaling), `n_shared_experts` ungated shared
//! experts, dense first layers (`first_k_dense_replace`), GQA with partial RoPE (0.5 by
//! default), optional per-head q/k norm and q/k/v bias; Qwen's expert layout.

use super::{MoeNames, Parts, QkNormKind, Shared};
use crate::config::{req, RawConfig, RouterKind};

pub(super) fn parts(raw: &RawConfig, s: &Shared) -> Result<Parts, String> {
    let moe = req(raw.moe_intermediate_size, "moe_intermediate_size")?;
    let shared = (raw.n_shared_experts.unwrap_or(1))
        .checked_mul(moe)
        .ok_or("sizes in the config overflow: n_shared_experts * moe_intermediate_size")?;
    let (e, k) = (s.num_experts, s.num_experts_per_tok);
    let n_group = req(raw.n_group.or(Some(1)), "n_group")?;
    let topk_group = req(raw.topk_group.or(Some(1)), "topk_group")?;
    if e % n_group != 0 || e / n_group < 2 {
        return Err(format!(
            "field `n_group` ({n_group}) must divide the {e} experts into groups of at least 2"
        ));
    }
    if topk_group > n_group || k > topk_group * (e / n_group) {
        return Err(format!(
            "field `topk_group` ({topk_group}) must be at most `n_group` ({n_group}) and its groups must hold \
             `num_experts_per_tok` ({k}) experts"
        ));
    }
    let scaling = raw.routed_scaling_factor.unwrap_or(1.0);
    if !(scaling.is_finite() && scaling > 0.0) {
        return Err(format!("field `routed_scaling_factor` must be a positive number, got {scaling}"));
    }
    Ok(Parts {
        moe_intermediate_size: moe,
        shared_expert_intermediate_size: shared,
        router: RouterKind::SigmoidGrouped { n_group, topk_group, routed_scaling_factor: scaling as f32 },
        norm_topk_prob: raw.norm_topk_prob.unwrap_or(true),
        first_k_dense_replace: raw.first_k_dense_replace.unwrap_or(1),
        attention_bias: raw.attention_bias.unwrap_or(false),
        qk_norm: if raw.use_qk_norm.unwrap_or(false) { QkNormKind::PerHead } else { QkNormKind::None },
        default_partial_rotary: 0.5,
        ..Parts::plain(s.intermediate_size)
    })
}

pub(super) fn moe_names(layer: usize) -> MoeNames {
    let mlp = format!("model.layers.{layer}.mlp");
    MoeNames { router: format!("{mlp}.gate.weight"), shared: Some(format!("{mlp}.shared_experts")) }
}
