//! DeepSeek-V3 / R1 and Kimi-K2 (`DeepseekV3ForCausalLM`): GLM's MoE side and router
//! (DeepSeek-V3's sigmoid router, ungated shared experts, dense first layers, Qwen's expert
//! layout) with multi-head latent attention (read by `config.rs` into `MlaConfig`), whose RoPE
//! runs over `qk_rope_head_dim`.

use super::{glm4_moe, Parts, Shared};
use crate::config::{RawConfig, RouterKind};

pub(super) fn parts(raw: &RawConfig, s: &Shared) -> Result<Parts, String> {
    let (n_group, topk_group) = glm4_moe::groups(raw, s, 2)?;
    let routed_scaling_factor = glm4_moe::routed_scaling(raw)?;
    Ok(Parts {
        router: RouterKind::SigmoidGrouped { n_group, topk_group, routed_scaling_factor },
        ..glm4_moe::deepseek_moe(raw, s, 3)?
    })
}
