//! One module per model family: what its config says beyond the fields every family shares
//! (with the family's own defaults and its own fields), how it names its tensors, and which
//! parts its layers are built from. The rest of the crate asks here instead of matching on the
//! architecture; the parts (router kinds, q/k norm kinds, norms, RoPE variants) are small types
//! a family composes.

mod deepseek_v2;
mod deepseek_v3;
mod glm4_moe;
mod mixtral;
mod olmoe;
mod phimoe;
mod qwen_moe;

use crate::config::{Arch, RawConfig, RouterKind};

/// Where q/k normalisation applies, if anywhere (the weights come at load).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNormKind {
    None,
    /// RMSNorm over each head's `head_dim` values (Qwen3-MoE, GLM with `use_qk_norm`).
    PerHead,
    /// RMSNorm over the whole q and k projections (OLMoE).
    Full,
}

/// What a family's config decides beyond the fields every family shares.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Parts {
    pub moe_intermediate_size: usize,
    pub shared_expert_intermediate_size: usize,
    pub shared_expert_gated: bool,
    pub router: RouterKind,
    pub norm_topk_prob: bool,
    pub first_k_dense_replace: usize,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    pub attention_bias: bool,
    pub o_proj_bias: bool,
    pub layer_norm: bool,
    pub qk_norm: QkNormKind,
    pub sliding_window: Option<usize>,
    /// `partial_rotary_factor` when the config does not give one.
    pub default_partial_rotary: f64,
}

impl Parts {
    /// What a family without anything of its own has: Mixtral's shape.
    fn plain(intermediate_size: usize) -> Self {
        Parts {
            moe_intermediate_size: intermediate_size,
            shared_expert_intermediate_size: 0,
            shared_expert_gated: false,
            router: RouterKind::Softmax,
            norm_topk_prob: false,
            first_k_dense_replace: 0,
            decoder_sparse_step: 1,
            mlp_only_layers: Vec::new(),
            attention_bias: false,
            o_proj_bias: false,
            layer_norm: false,
            qk_norm: QkNormKind::None,
            sliding_window: None,
            default_partial_rotary: 1.0,
        }
    }
}

/// The checked fields every family's `parts` may read.
pub(crate) struct Shared {
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub intermediate_size: usize,
}

/// The family's parts from its config.
pub(crate) fn parts(arch: Arch, raw: &RawConfig, s: &Shared) -> Result<Parts, String> {
    match arch {
        Arch::Mixtral => Ok(mixtral::parts(raw, s)),
        Arch::Qwen2Moe => qwen_moe::parts(raw, s, qwen_moe::Version::Qwen2),
        Arch::Qwen3Moe => qwen_moe::parts(raw, s, qwen_moe::Version::Qwen3),
        Arch::Olmoe => Ok(olmoe::parts(raw, s)),
        Arch::Glm4Moe => glm4_moe::parts(raw, s),
        Arch::Phimoe => phimoe::parts(raw, s),
        Arch::DeepseekV3 => deepseek_v3::parts(raw, s),
        Arch::DeepseekV2 => deepseek_v2::parts(raw, s),
    }
}

/// The field a family's config names its routed-expert count by (for messages when none is
/// given; every spelling is read for every family).
pub(crate) fn expert_count_field(arch: Arch) -> &'static str {
    match arch {
        Arch::Mixtral | Arch::Phimoe => "num_local_experts",
        Arch::Glm4Moe | Arch::DeepseekV3 | Arch::DeepseekV2 => "n_routed_experts",
        Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::Olmoe => "num_experts",
    }
}

/// Names in one decoder layer's sparse block: the router's weight and the shared expert's
/// prefix (its `gate_proj`/`up_proj`/`down_proj`; a gated one's gate is `{prefix}_gate`).
pub(crate) struct MoeNames {
    pub router: String,
    pub shared: Option<String>,
}

pub(crate) fn moe_names(arch: Arch, layer: usize) -> MoeNames {
    match arch {
        Arch::Mixtral | Arch::Phimoe => mixtral::moe_names(layer),
        Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::Olmoe => qwen_moe::moe_names(layer),
        Arch::Glm4Moe | Arch::DeepseekV3 | Arch::DeepseekV2 => glm4_moe::moe_names(layer),
    }
}

/// Names of expert `expert`'s gate, up and down projections in decoder layer `layer`, as
/// published on the Hugging Face hub.
pub fn expert_tensor_names(arch: Arch, layer: usize, expert: usize) -> [String; 3] {
    match arch {
        Arch::Mixtral | Arch::Phimoe => mixtral::expert_names(layer, expert),
        Arch::Qwen2Moe
        | Arch::Qwen3Moe
        | Arch::Olmoe
        | Arch::Glm4Moe
        | Arch::DeepseekV3
        | Arch::DeepseekV2 => qwen_moe::expert_names(layer, expert),
    }
}
