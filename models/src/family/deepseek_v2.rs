//! DeepSeek-V2 / V2-Lite (`DeepseekV2ForCausalLM`): DeepSeek-V3's shape (multi-head latent
//! attention, shared experts, dense first layers, Qwen's expert layout) with V2's router:
//! softmax scores, `topk_method` `greedy` (the top-k) or `group_limited_greedy` (the top-k
//! within the `topk_group` groups whose best score is highest), times `routed_scaling_factor`,
//! never renormalised (transformers ignores `norm_topk_prob` for V2).

use super::{glm4_moe, Parts, Shared};
use crate::config::{RawConfig, RouterKind};

pub(super) fn parts(raw: &RawConfig, s: &Shared) -> Result<Parts, String> {
    let (n_group, topk_group) = match raw.topk_method.as_deref().unwrap_or("greedy") {
        // Every expert in one group: no limit.
        "greedy" => (1, 1),
        "group_limited_greedy" => glm4_moe::groups(raw, s, 1)?,
        other => {
            return Err(format!(
                "field `topk_method`: `{other}` is not DeepSeek-V2's (`greedy` or `group_limited_greedy`)"
            ))
        }
    };
    if raw.mlp_bias.unwrap_or(false) {
        return Err("field `mlp_bias`: MLP biases are not supported".into());
    }
    Ok(Parts {
        router: RouterKind::SoftmaxGroupLimited {
            n_group,
            topk_group,
            routed_scaling_factor: glm4_moe::routed_scaling(raw)?,
        },
        norm_topk_prob: false,
        ..glm4_moe::deepseek_moe(raw, s, 0)?
    })
}
