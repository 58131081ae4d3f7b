//! DeepSeek-V2 / V2-Lite (`DeepseekV2ForCausalLM`): DeepSeek-V3's shape (multi-head latent
//! attention, shared experts, dense first layers, Qwen's expert layout) with V2's router:
//! softmax scores, `topk_method` `greedy` (the top-k) or `group_limited_greedy` (the top-k
//! within the `topk_group` groups whose best score is highest), times `routed_scaling_factor`,
//! never renormalised (transformers ignores `norm_topk_prob` for V2).

use super::{deepseek_v3, Parts, Shared};
use crate::config::{req, RawConfig, RouterKind};

pub(super) fn parts(raw: &RawConfig, s: &Shared) -> Result<Parts, String> {
    let (n_group, topk_group) = match raw.topk_method.as_deref().unwrap_or("greedy") {
        "greedy" => (1, 1),
        "group_limited_greedy" => {
            let n_group = req(raw.n_group.or(Some(1)), "n_group")?;
            let topk_group = req(raw.topk_group.or(Some(1)), "topk_group")?;
            if !s.num_experts.is_multiple_of(n_group) || topk_group > n_group {
                return Err(format!(
                    "fields `n_group` ({n_group}) and `topk_group` ({topk_group}): the groups must split the {} \
                     experts evenly and keep at most all of them",
                    s.num_experts
                ));
            }
            (n_group, topk_group)
        }
        other => {
            return Err(format!(
                "field `topk_method`: `{other}` is not DeepSeek-V2's (`greedy` or `group_limited_greedy`)"
            ))
        }
    };
    if raw.mlp_bias.unwrap_or(false) {
        return Err("field `mlp_bias`: MLP biases are not supported".into());
    }
    let scaling = raw.routed_scaling_factor.unwrap_or(1.0);
    if !(scaling.is_finite() && scaling > 0.0) {
        return Err(format!("field `routed_scaling_factor` must be a positive number, got {scaling}"));
    }
    // V3's parts for the rest, with V2's grouping left out of their checks.
    let mut v3_view = raw.clone();
    (v3_view.n_group, v3_view.topk_group) = (Some(1), Some(1));
    Ok(Parts {
        router: RouterKind::SoftmaxGroupLimited {
            n_group,
            topk_group,
            routed_scaling_factor: scaling as f32,
        },
        norm_topk_prob: false,
        first_k_dense_replace: raw.first_k_dense_replace.unwrap_or(0),
        ..deepseek_v3::parts(&v3_view, s)?
    })
}
