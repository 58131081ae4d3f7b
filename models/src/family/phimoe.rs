//! Phi-3.5-MoE (`PhimoeForCausalLM`): Mixtral's layout with LayerNorm (with bias) for every
//! norm, `attention_bias` covering q/k/v and o, the sparsemixer top-2 router; LongRoPE and the
//! LM head bias are read for every family.

use super::{Parts, Shared};
use crate::config::{RawConfig, RouterKind};

pub(super) fn parts(raw: &RawConfig, s: &Shared) -> Result<Parts, String> {
    if s.num_experts_per_tok != 2 {
        return Err(format!(
            "field `num_experts_per_tok` ({}): Phi-3.5-MoE's sparsemixer router picks 2",
            s.num_experts_per_tok
        ));
    }
    let jitter = raw.router_jitter_noise.unwrap_or(0.01);
    if !(jitter.is_finite() && jitter >= 0.0) {
        return Err(format!("field `router_jitter_noise` must be zero or more, got {jitter}"));
    }
    let bias = raw.attention_bias.unwrap_or(false);
    Ok(Parts {
        router: RouterKind::SparseMixer { jitter_eps: jitter as f32 },
        norm_topk_prob: true,
        attention_bias: bias,
        o_proj_bias: bias,
        layer_norm: true,
        sliding_window: raw.sliding_window.filter(|&w| w > 0),
        ..Parts::plain(s.intermediate_size)
    })
}
