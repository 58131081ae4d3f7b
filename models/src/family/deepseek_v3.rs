//! DeepSeek-V3 / R1 and Kimi-K2 (`DeepseekV3ForCausalLM`): GLM's MoE side (DeepSeek-V3's router,
//! ungated shared experts, dense first layers, Qwen's expert layout) with multi-head latent
//! attention (read by `config.rs` into `MlaConfig`) and no partial RoPE over the full head: its
//! RoPE runs over `qk_rope_head_dim`.

use super::{glm4_moe, Parts, QkNormKind, Shared};
use crate::config::RawConfig;

pub(super) fn parts(raw: &RawConfig, s: &Shared) -> Result<Parts, String> {
    Ok(Parts {
        first_k_dense_replace: raw.first_k_dense_replace.unwrap_or(3),
        qk_norm: QkNormKind::None,
        default_partial_rotary: 1.0,
        ..glm4_moe::parts(raw, s)?
    })
}
