//! OLMoE (`OlmoeForCausalLM`): every layer sparse, q/k RMSNorm over the whole projections,
//! optional `clip_qkv` (read by every family) and q/k/v bias; Qwen's expert layout.

use super::{Parts, QkNormKind, Shared};
use crate::config::RawConfig;

pub(super) fn parts(raw: &RawConfig, s: &Shared) -> Parts {
    Parts {
        norm_topk_prob: raw.norm_topk_prob.unwrap_or(false),
        attention_bias: raw.attention_bias.unwrap_or(false),
        qk_norm: QkNormKind::Full,
        sliding_window: raw.sliding_window.filter(|&w| w > 0),
        ..Parts::plain(s.intermediate_size)
    }
}
