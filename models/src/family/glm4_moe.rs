//! GLM-4.5 / 4.5-Air (`Glm4MoeForCausalLM`): DeepSeek-V3's router (sigmoid scores with a
//! correction bias, group-limited top-k, routed scaling), `n_shared_experts` ungated shared
//! experts, dense first layers (`first_k_dense_replace`), GQA with partial RoPE (0.5 by
//! default), optional per-head q/k norm and q/k/v bias; Qwen's expert layout.

use super::{MoeNames, Parts, QkNormKind, Shared};
use crate::config::{req, RawConfig, RouterKind};

pub(super) fn parts(raw: &RawConfig, s: &Shared) -> Result<Parts, String> {
    let (n_group, topk_group) = groups(raw, s, 2)?;
    let routed_scaling_factor = routed_scaling(raw)?;
    Ok(Parts {
        router: RouterKind::SigmoidGrouped { n_group, topk_group, routed_scaling_factor },
        qk_norm: if raw.use_qk_norm.unwrap_or(false) { QkNormKind::PerHead } else { QkNormKind::None },
        default_partial_rotary: 0.5,
        ..deepseek_moe(raw, s, 1)?
    })
}

/// The MoE side GLM and DeepSeek-V2/V3 share, all but the router: `moe_intermediate_size`
/// experts, `n_shared_experts` of them as one ungated shared MLP, dense layers before
/// `first_k_dense_replace` (its default the family's), renormalised weights unless the config
/// says otherwise, attention bias from the config.
pub(super) fn deepseek_moe(raw: &RawConfig, s: &Shared, first_k_dense: usize) -> Result<Parts, String> {
    let moe = req(raw.moe_intermediate_size, "moe_intermediate_size")?;
    let shared = (raw.n_shared_experts.unwrap_or(1))
        .checked_mul(moe)
        .ok_or("sizes in the config overflow: n_shared_experts * moe_intermediate_size")?;
    Ok(Parts {
        moe_intermediate_size: moe,
        shared_expert_intermediate_size: shared,
        norm_topk_prob: raw.norm_topk_prob.unwrap_or(true),
        first_k_dense_replace: raw.first_k_dense_replace.unwrap_or(first_k_dense),
        attention_bias: raw.attention_bias.unwrap_or(false),
        ..Parts::plain(s.intermediate_size)
    })
}

/// A group-limited router's groups, checked: `n_group` groups of at least `min_group` experts
/// each (DeepSeek-V3 scores a group by its best two), at most all of them kept, enough experts
/// in the kept groups for the top-k.
pub(super) fn groups(raw: &RawConfig, s: &Shared, min_group: usize) -> Result<(usize, usize), String> {
    let (e, k) = (s.num_experts, s.num_experts_per_tok);
    let n_group = req(raw.n_group.or(Some(1)), "n_group")?;
    let topk_group = req(raw.topk_group.or(Some(1)), "topk_group")?;
    if e % n_group != 0 || e / n_group < min_group {
        return Err(format!(
            "field `n_group` ({n_group}) must divide the {e} experts into groups of at least {min_group}"
        ));
    }
    if topk_group > n_group || k > topk_group * (e / n_group) {
        return Err(format!(
            "field `topk_group` ({topk_group}) must be at most `n_group` ({n_group}) and its groups must hold \
             `num_experts_per_tok` ({k}) experts"
        ));
    }
    Ok((n_group, topk_group))
}

/// `routed_scaling_factor`, positive (1 when absent).
pub(super) fn routed_scaling(raw: &RawConfig) -> Result<f32, String> {
    let scaling = raw.routed_scaling_factor.unwrap_or(1.0);
    if !(scaling.is_finite() && scaling > 0.0) {
        return Err(format!("field `routed_scaling_factor` must be a positive number, got {scaling}"));
    }
    Ok(scaling as f32)
}

pub(super) fn moe_names(layer: usize) -> MoeNames {
    let mlp = format!("model.layers.{layer}.mlp");
    MoeNames { router: format!("{mlp}.gate.weight"), shared: Some(format!("{mlp}.shared_experts")) }
}
