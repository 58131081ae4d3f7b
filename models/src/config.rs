//! `config.json` parsing. Accepts what transformers 4.x and 5.x write: the older layout
//! (`rope_theta` at top level, `torch_dtype`) and the newer one (`rope_parameters`, `dtype`),
//! every spelling of a field that a family's config class accepts (its `attribute_map`:
//! transformers 5 writes Qwen3-MoE's and Mixtral's expert count as `num_local_experts`, OLMoE
//! reads either), and `model_type` where `architectures` is absent (transformers falls back to
//! it too).

use std::path::Path;

use serde::Deserialize;

mod rope;

use rope::RopeScaling;

use crate::family::{self, QkNormKind};
use crate::Error;

/// Architectures stevedore runs, by their `architectures[0]` name in config.json.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
    /// GLM-4.5 / 4.5-Air: DeepSeek-V3-style routing with GQA attention and partial RoPE.
    Glm4Moe,
    /// Phi-3.5-MoE: Mixtral's layout with LayerNorm (with bias), biased projections, the
    /// sparsemixer router and LongRoPE.
    Phimoe,
    /// DeepSeek-V3 / R1 and Kimi-K2: multi-head latent attention (MLA) with a latent KV cache,
    /// YaRN RoPE, and GLM's router, shared experts and dense first layers.
    DeepseekV3,
    /// DeepSeek-V2 / V2-Lite: V3's shape with a softmax, optionally group-limited router.
    DeepseekV2,
}

impl Arch {
    /// Every architecture: its `architectures[0]` name in config.json, and its `model_type`
    /// (what a config without `architectures` names).
    pub const SUPPORTED: [(&'static str, &'static str, Arch); 8] = [
        ("MixtralForCausalLM", "mixtral", Arch::Mixtral),
        ("Qwen2MoeForCausalLM", "qwen2_moe", Arch::Qwen2Moe),
        ("Qwen3MoeForCausalLM", "qwen3_moe", Arch::Qwen3Moe),
        ("OlmoeForCausalLM", "olmoe", Arch::Olmoe),
        ("Glm4MoeForCausalLM", "glm4_moe", Arch::Glm4Moe),
        ("PhimoeForCausalLM", "phimoe", Arch::Phimoe),
        ("DeepseekV3ForCausalLM", "deepseek_v3", Arch::DeepseekV3),
        ("DeepseekV2ForCausalLM", "deepseek_v2", Arch::DeepseekV2),
    ];

    pub fn hf_name(self) -> &'static str {
        Self::SUPPORTED.iter().find(|(_, _, a)| *a == self).expect("every architecture is listed").0
    }
}

/// How a router turns its logits into a token's experts and gate weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RouterKind {
    /// Softmax over every expert, the top-k (Mixtral, Qwen, OLMoE), optionally renormalised.
    Softmax,
    /// DeepSeek-V3's: sigmoid scores; the choice adds a learned per-expert correction bias
    /// (`e_score_correction_bias`) and is limited to the `topk_group` groups (of `n_group`) whose
    /// best two biased scores sum highest; the weights are the unbiased scores, optionally
    /// renormalised, times `routed_scaling_factor`.
    SigmoidGrouped { n_group: usize, topk_group: usize, routed_scaling_factor: f32 },
    /// Phi-3.5-MoE's sparsemixer (inference path, top-2): the best expert, weighted by the
    /// softmax over the experts whose logit is within `2 * jitter_eps` (relative) of it; then
    /// the best of the others, weighted the same way among the rest.
    SparseMixer { jitter_eps: f32 },
    /// DeepSeek-V2's: softmax scores; the top-k within the `topk_group` groups (of `n_group`)
    /// whose best score is highest (all of them with one group); the weights are the scores
    /// times `routed_scaling_factor`.
    SoftmaxGroupLimited { n_group: usize, topk_group: usize, routed_scaling_factor: f32 },
}

/// Multi-head latent attention (DeepSeek-V2/V3): queries through an optional low-rank
/// projection, keys and values through a shared latent of `kv_lora_rank` (cached, with the
/// shared rotary key part) expanded per head by `kv_b_proj`.
#[derive(Clone, Debug, PartialEq)]
pub struct MlaConfig {
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// The rotary dimensions are interleaved pairs (`rope_interleave`).
    pub interleave: bool,
    /// The softmax scale: `1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)`, times YaRN's
    /// `mscale_all_dim` correction squared.
    pub softmax_scale: f32,
}

/// Normalised model configuration.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// Leading dimensions of each head that RoPE rotates (`head_dim * partial_rotary_factor`;
    /// the rest pass through).
    pub rotary_dim: usize,
    /// The rotary frequencies when they are not `theta^(-2i/d)`: LongRoPE's (the short factors:
    /// positions stay below `original_max_position_embeddings`) or YaRN's; and the scale on cos
    /// and sin (LongRoPE's `short_mscale`, YaRN's attention factor), 1 without.
    pub rope_inv_freq: Option<Vec<f32>>,
    pub rope_mscale: f32,
    pub rope_kind: RopeKind,
    /// Multi-head latent attention instead of grouped-query attention.
    pub mla: Option<MlaConfig>,
    /// LayerNorm with bias instead of RMSNorm (Phi-3.5-MoE), eps `rms_norm_eps`.
    pub layer_norm: bool,
    /// Bias on the attention output projection (Phi-3.5-MoE's `attention_bias` covers it).
    pub o_proj_bias: bool,
    /// Bias on the LM head (`lm_head_bias`).
    pub lm_head_bias: bool,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    /// Intermediate size of one routed expert.
    pub moe_intermediate_size: usize,
    /// Intermediate size of dense MLP layers (Qwen `mlp_only_layers`).
    pub intermediate_size: usize,
    /// Renormalise the top-k gate weights to sum to one.
    pub norm_topk_prob: bool,
    pub router: RouterKind,
    /// Shared expert intermediate size (Qwen2-MoE's, gated by a sigmoid; GLM's
    /// `n_shared_experts` of them as one MLP, ungated); 0 when absent.
    pub shared_expert_intermediate_size: usize,
    /// The shared expert's output is scaled by `sigmoid(shared_expert_gate(x))` (Qwen2-MoE).
    pub shared_expert_gated: bool,
    /// Where q/k normalisation applies (Qwen3-MoE and GLM per head, OLMoE over the projection).
    pub qk_norm: QkNormKind,
    /// Layers before this one are dense (DeepSeek/GLM `first_k_dense_replace`).
    pub first_k_dense_replace: usize,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    pub attention_bias: bool,
    /// OLMoE `clip_qkv`.
    pub clip_qkv: Option<f32>,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// Sliding-window attention span, where the config turns it on. stevedore attends to the
    /// whole sequence, which equals sliding-window attention only up to this many positions.
    pub sliding_window: Option<usize>,
    /// The dtype config.json declares (informational; tensors carry their own).
    pub dtype: Option<String>,
}

impl ModelConfig {
    /// Whether decoder layer `layer` has a sparse MoE block (else a dense MLP).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer >= self.first_k_dense_replace
            && !self.mlp_only_layers.contains(&layer)
            && self.num_experts > 0
            && (layer + 1).is_multiple_of(self.decoder_sparse_step)
    }

    /// What the KV cache holds per position and layer: (KV heads, key width, value width). GQA:
    /// `num_key_value_heads` heads of `head_dim` each; MLA: one latent "head", its key the
    /// normalised latent and the rotary key (`kv_lora_rank + qk_rope_head_dim`), its value the
    /// latent (`kv_lora_rank`).
    pub fn kv_layout(&self) -> (usize, usize, usize) {
        match &self.mla {
            Some(m) => (1, m.kv_lora_rank + m.qk_rope_head_dim, m.kv_lora_rank),
            None => (self.num_key_value_heads, self.head_dim, self.head_dim),
        }
    }

    /// The most positions (prompt plus generated tokens) this model runs exactly:
    /// `max_position_embeddings`, or the sliding window where one is on and shorter.
    pub fn max_positions(&self) -> usize {
        self.sliding_window.map_or(self.max_position_embeddings, |w| w.min(self.max_position_embeddings))
    }

    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.num_hidden_layers).filter(|&l| self.is_moe_layer(l))
    }

    /// Adds the stop ids of `generation_config.json`, if the file exists: instruct checkpoints
    /// often stop on ids that config.json does not list.
    pub fn merge_generation_config(&mut self, path: &Path) -> Result<(), Error> {
        if !path.exists() {
            return Ok(());
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        #[derive(Deserialize)]
        struct Generation {
            eos_token_id: Option<OneOrMany>,
        }
        let g: Generation = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.to_owned(),
            msg: format!("invalid JSON or field: {e}"),
        })?;
        for id in g.eos_token_id.map(OneOrMany::into_vec).unwrap_or_default() {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
        Ok(())
    }

    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|msg| Error::Config { path: path.to_owned(), msg })
    }

    /// Parses config.json text; the error is a message naming the offending field.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        raw.normalise()
    }
}

#[derive(Deserialize, Debug)]
struct RawRope {
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    short_factor: Option<Vec<f64>>,
    short_mscale: Option<f64>,
    original_max_position_embeddings: Option<usize>,
    factor: Option<f64>,
    beta_fast: Option<f64>,
    beta_slow: Option<f64>,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
    attention_factor: Option<f64>,
}

/// Which RoPE a model uses (what `inspect` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeKind {
    Default,
    LongRope,
    Yarn,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![x],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize, Debug)]
pub(crate) struct RawConfig {
    pub(crate) architectures: Option<Vec<String>>,
    pub(crate) model_type: Option<String>,
    pub(crate) vocab_size: Option<usize>,
    pub(crate) hidden_size: Option<usize>,
    pub(crate) intermediate_size: Option<usize>,
    pub(crate) moe_intermediate_size: Option<usize>,
    pub(crate) shared_expert_intermediate_size: Option<usize>,
    pub(crate) num_hidden_layers: Option<usize>,
    pub(crate) num_attention_heads: Option<usize>,
    pub(crate) num_key_value_heads: Option<usize>,
    pub(crate) head_dim: Option<usize>,
    pub(crate) rms_norm_eps: Option<f64>,
    pub(crate) rope_theta: Option<f64>,
    rope_parameters: Option<RawRope>,
    rope_scaling: Option<RawRope>,
    pub(crate) max_position_embeddings: Option<usize>,
    pub(crate) tie_word_embeddings: Option<bool>,
    pub(crate) num_local_experts: Option<usize>,
    pub(crate) num_experts: Option<usize>,
    pub(crate) n_routed_experts: Option<usize>,
    pub(crate) n_shared_experts: Option<usize>,
    pub(crate) first_k_dense_replace: Option<usize>,
    pub(crate) n_group: Option<usize>,
    pub(crate) topk_group: Option<usize>,
    pub(crate) routed_scaling_factor: Option<f64>,
    pub(crate) partial_rotary_factor: Option<f64>,
    pub(crate) use_qk_norm: Option<bool>,
    pub(crate) lm_head_bias: Option<bool>,
    pub(crate) q_lora_rank: Option<usize>,
    pub(crate) kv_lora_rank: Option<usize>,
    pub(crate) qk_nope_head_dim: Option<usize>,
    pub(crate) qk_rope_head_dim: Option<usize>,
    pub(crate) v_head_dim: Option<usize>,
    pub(crate) rope_interleave: Option<bool>,
    pub(crate) topk_method: Option<String>,
    pub(crate) mlp_bias: Option<bool>,
    pub(crate) router_jitter_noise: Option<f64>,
    pub(crate) original_max_position_embeddings: Option<usize>,
    pub(crate) num_experts_per_tok: Option<usize>,
    pub(crate) norm_topk_prob: Option<bool>,
    pub(crate) decoder_sparse_step: Option<usize>,
    pub(crate) mlp_only_layers: Option<Vec<usize>>,
    pub(crate) attention_bias: Option<bool>,
    pub(crate) clip_qkv: Option<f64>,
    eos_token_id: Option<OneOrMany>,
    pub(crate) bos_token_id: Option<u32>,
    pub(crate) sliding_window: Option<usize>,
    pub(crate) use_sliding_window: Option<bool>,
    pub(crate) torch_dtype: Option<String>,
    pub(crate) dtype: Option<String>,
}

/// Field `name`'s value: an error naming it when it is absent or 0.
pub(crate) fn req(v: Option<usize>, name: &str) -> Result<usize, String> {
    match v {
        Some(0) => Err(format!("field `{name}` must be positive")),
        Some(x) => Ok(x),
        None => Err(format!("missing field `{name}`")),
    }
}

impl RawConfig {
    fn normalise(self) -> Result<ModelConfig, String> {
        let arch = match (self.architectures.as_deref(), self.model_type.as_deref()) {
            (Some([name, ..]), _) => {
                Arch::SUPPORTED.iter().find(|(n, _, _)| n == name).map(|(_, _, a)| *a).ok_or_else(|| {
                    let list: Vec<_> = Arch::SUPPORTED.iter().map(|(n, _, _)| *n).collect();
                    format!("unsupported architecture `{name}`; supported: {}", list.join(", "))
                })?
            }
            (Some([]), None) => {
                return Err("field `architectures` is empty and there is no `model_type`".into())
            }
            (_, Some(t)) => {
                Arch::SUPPORTED.iter().find(|(_, n, _)| *n == t).map(|(_, _, a)| *a).ok_or_else(|| {
                    let list: Vec<_> = Arch::SUPPORTED.iter().map(|(_, n, _)| *n).collect();
                    format!(
                        "unsupported `model_type` `{t}` (and no `architectures`); supported: {}",
                        list.join(", ")
                    )
                })?
            }
            (None, None) => return Err("missing fields `architectures` and `model_type`".into()),
        };
        let hidden_size = req(self.hidden_size, "hidden_size")?;
        let num_attention_heads = req(self.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads =
            req(self.num_key_value_heads.or(Some(num_attention_heads)), "num_key_value_heads")?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "field `num_key_value_heads` ({num_key_value_heads}) must divide `num_attention_heads` ({num_attention_heads})"
            ));
        }
        // MLA's RoPE runs over its `qk_rope_head_dim` (transformers sets `head_dim` to it too).
        let head_dim = match (self.head_dim, matches!(arch, Arch::DeepseekV3 | Arch::DeepseekV2)) {
            (_, true) => req(self.qk_rope_head_dim, "qk_rope_head_dim")?,
            (Some(d), false) => req(Some(d), "head_dim")?,
            (None, false) if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            (None, false) => {
                return Err(
                    "`hidden_size` is not a multiple of `num_attention_heads` and `head_dim` is missing"
                        .into(),
                )
            }
        };
        if head_dim % 2 != 0 {
            return Err(format!("field `head_dim` ({head_dim}) must be even for RoPE"));
        }
        // LongRoPE (Phi-3.5-MoE): the short factors hold up to `original_max_position_embeddings`;
        // past it transformers switches every position to the long factors, re-encoding the
        // cache, which this engine does not do: such positions are refused (`max_positions`).
        let rope = self.rope_scaling.as_ref().or(self.rope_parameters.as_ref());
        let scaling = match rope {
            Some(r) => RopeScaling::parse(r, self.original_max_position_embeddings)?,
            None => RopeScaling::Default,
        };
        let rope_theta =
            self.rope_parameters.as_ref().and_then(|r| r.rope_theta).or(self.rope_theta).unwrap_or(10000.0);
        // Any spelling, for every family: transformers 5 writes Mixtral's and Qwen3-MoE's as
        // `num_local_experts` (4.x: Qwen3-MoE's as `num_experts`), OLMoE maps one to the other,
        // and DeepSeek-style configs say `n_routed_experts`.
        let spellings = [
            ("num_local_experts", self.num_local_experts),
            ("num_experts", self.num_experts),
            ("n_routed_experts", self.n_routed_experts),
        ];
        let given: Vec<(&str, usize)> = spellings.iter().filter_map(|&(n, v)| Some((n, v?))).collect();
        if let Some(w) = given.windows(2).find(|w| w[0].1 != w[1].1) {
            return Err(format!(
                "fields `{}` ({}) and `{}` ({}) disagree; they are one setting",
                w[0].0, w[0].1, w[1].0, w[1].1
            ));
        }
        let (num_experts_field, num_experts) = match given.first() {
            Some(&(n, v)) => (n, Some(v)),
            None => (family::expert_count_field(arch), None),
        };
        let num_experts = req(num_experts, num_experts_field)?;
        let num_experts_per_tok = req(self.num_experts_per_tok, "num_experts_per_tok")?;
        if num_experts_per_tok > num_experts {
            return Err(format!(
                "field `num_experts_per_tok` ({num_experts_per_tok}) exceeds `{num_experts_field}` ({num_experts})"
            ));
        }
        let intermediate_size = req(self.intermediate_size, "intermediate_size")?;
        let shared = family::Shared { num_experts, num_experts_per_tok, intermediate_size };
        let parts = family::parts(arch, &self, &shared)?;
        let moe_intermediate_size = parts.moe_intermediate_size;
        // `partial_rotary_factor` sits in `rope_parameters` in transformers 5, at the top in 4.x.
        let partial = (self.rope_parameters.as_ref().and_then(|r| r.partial_rotary_factor))
            .or(self.partial_rotary_factor)
            .unwrap_or(parts.default_partial_rotary);
        let rotary_dim = (head_dim as f64 * partial) as usize;
        if !(partial > 0.0 && partial <= 1.0) || rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(format!(
                "field `partial_rotary_factor` ({partial}) must give an even number of rotated dimensions \
                 in (0, head_dim = {head_dim}]"
            ));
        }
        let eos_token_ids = self.eos_token_id.map(OneOrMany::into_vec).unwrap_or_default();
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(format!("`rope_theta` must be a positive number, got {rope_theta}"));
        }
        if let Some(c) = self.clip_qkv {
            if !(c.is_finite() && c > 0.0) {
                return Err(format!("field `clip_qkv` must be a positive number, got {c}"));
            }
        }
        let sliding_window = parts.sliding_window;
        let (rope_inv_freq, rope_mscale) = scaling.frequencies(rope_theta, rotary_dim)?;
        // Where LongRoPE switches to its long factors, stop (see `RopeScaling`).
        let max_position_embeddings = self.max_position_embeddings.unwrap_or(4096);
        let max_position_embeddings = match &scaling {
            RopeScaling::LongRope { original, .. } => max_position_embeddings.min(*original),
            _ => max_position_embeddings,
        };
        let mla = match arch {
            Arch::DeepseekV3 | Arch::DeepseekV2 => {
                let nope = req(self.qk_nope_head_dim, "qk_nope_head_dim")?;
                let q_lora_rank = match self.q_lora_rank {
                    Some(r) => Some(req(Some(r), "q_lora_rank")?),
                    None => None,
                };
                Some(MlaConfig {
                    q_lora_rank,
                    kv_lora_rank: req(self.kv_lora_rank, "kv_lora_rank")?,
                    qk_nope_head_dim: nope,
                    qk_rope_head_dim: head_dim,
                    v_head_dim: req(self.v_head_dim, "v_head_dim")?,
                    interleave: self.rope_interleave.unwrap_or(true),
                    softmax_scale: (1.0 / ((nope + head_dim) as f64).sqrt() * scaling.softmax_correction())
                        as f32,
                })
            }
            _ => None,
        };
        let rms_norm_eps = self.rms_norm_eps.unwrap_or(1e-6);
        if rms_norm_eps.is_nan() || rms_norm_eps < 0.0 {
            return Err("field `rms_norm_eps` must be a non-negative number".into());
        }
        let vocab_size = req(self.vocab_size, "vocab_size")?;
        let num_hidden_layers = req(self.num_hidden_layers, "num_hidden_layers")?;
        // Every size the forward pass multiplies must fit in memory arithmetic: a config with
        // absurd numbers is an error here, before anything is allocated from it.
        let too_big = |what: &str| format!("sizes in the config overflow: {what}");
        let q_dim = num_attention_heads
            .checked_mul(head_dim)
            .ok_or_else(|| too_big("num_attention_heads * head_dim"))?;
        let products = [
            (q_dim.checked_mul(hidden_size), "num_attention_heads * head_dim * hidden_size"),
            (vocab_size.checked_mul(hidden_size), "vocab_size * hidden_size"),
            (
                num_experts.checked_mul(moe_intermediate_size.max(intermediate_size)),
                "experts * intermediate_size",
            ),
            (
                moe_intermediate_size.max(intermediate_size).checked_mul(hidden_size),
                "intermediate_size * hidden_size",
            ),
            (num_hidden_layers.checked_mul(num_experts), "num_hidden_layers * experts"),
        ];
        for (p, what) in products {
            if p.and_then(|v| v.checked_mul(4)).is_none_or(|v| v > isize::MAX as usize) {
                return Err(too_big(what));
            }
        }
        Ok(ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rotary_dim,
            rope_mscale,
            rope_inv_freq,
            rope_kind: match scaling {
                RopeScaling::Default => RopeKind::Default,
                RopeScaling::LongRope { .. } => RopeKind::LongRope,
                RopeScaling::Yarn { .. } => RopeKind::Yarn,
            },
            mla,
            layer_norm: parts.layer_norm,
            o_proj_bias: parts.o_proj_bias,
            lm_head_bias: self.lm_head_bias.unwrap_or(false),
            rms_norm_eps: rms_norm_eps as f32,
            rope_theta: rope_theta as f32,
            max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            num_experts,
            num_experts_per_tok,
            moe_intermediate_size,
            intermediate_size,
            norm_topk_prob: parts.norm_topk_prob,
            router: parts.router,
            shared_expert_intermediate_size: parts.shared_expert_intermediate_size,
            shared_expert_gated: parts.shared_expert_gated,
            qk_norm: parts.qk_norm,
            first_k_dense_replace: parts.first_k_dense_replace,
            decoder_sparse_step: parts.decoder_sparse_step,
            mlp_only_layers: parts.mlp_only_layers,
            attention_bias: parts.attention_bias,
            clip_qkv: self.clip_qkv.map(|c| c as f32),
            eos_token_ids,
            bos_token_id: self.bos_token_id,
            sliding_window,
            dtype: self.dtype.or(self.torch_dtype),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = r#"{"architectures":["MixtralForCausalLM"],"vocab_size":32,"hidden_size":16,
        "intermediate_size":24,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
        "rope_theta":1000000.0,"num_local_experts":4,"num_experts_per_tok":2,"torch_dtype":"bfloat16",
        "eos_token_id":2}"#;

    #[test]
    fn old_and_new_layouts() {
        let c = ModelConfig::from_json(OLD).unwrap();
        assert_eq!((c.arch, c.head_dim, c.num_experts, c.rope_theta), (Arch::Mixtral, 4, 4, 1e6));
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        let new = r#"{"architectures":["Qwen3MoeForCausalLM"],"vocab_size":32,"hidden_size":16,
            "intermediate_size":24,"moe_intermediate_size":8,"num_hidden_layers":4,"num_attention_heads":4,
            "num_key_value_heads":2,"head_dim":8,"rope_parameters":{"rope_type":"default","rope_theta":5000.0},
            "num_experts":8,"num_experts_per_tok":2,"norm_topk_prob":true,"decoder_sparse_step":2,
            "mlp_only_layers":[3],"dtype":"bfloat16","eos_token_id":[1,2]}"#;
        let c = ModelConfig::from_json(new).unwrap();
        assert_eq!((c.rope_theta, c.head_dim, c.moe_intermediate_size), (5000.0, 8, 8));
        assert_eq!(c.moe_layers().collect::<Vec<_>>(), vec![1]);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
    }

    /// What transformers 5 writes (`AutoConfig.from_pretrained(fixture).save_pretrained()` with
    /// 5.24): the expert count as `num_local_experts` for Qwen3-MoE, RoPE in `rope_parameters`,
    /// Qwen2-MoE's unused window as 0; and a config without `architectures` names its family by
    /// `model_type`, as transformers falls back to it.
    #[test]
    fn configs_as_transformers_5_writes_them() {
        let qwen3 = r#"{"architectures":["Qwen3MoeForCausalLM"],"model_type":"qwen3_moe","vocab_size":32,
            "hidden_size":16,"intermediate_size":24,"moe_intermediate_size":8,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"head_dim":8,"num_local_experts":8,
            "num_experts_per_tok":2,"rope_parameters":{"rope_theta":1000000.0,"rope_type":"default"},
            "sliding_window":null,"layer_types":["full_attention","full_attention"]}"#;
        let c = ModelConfig::from_json(qwen3).unwrap();
        assert_eq!((c.arch, c.num_experts, c.rope_theta), (Arch::Qwen3Moe, 8, 1e6));
        let no_arch = qwen3.replace(r#""architectures":["Qwen3MoeForCausalLM"],"#, "");
        assert_eq!(ModelConfig::from_json(&no_arch).unwrap().arch, Arch::Qwen3Moe);
        let old_spelling = qwen3.replace("num_local_experts", "num_experts");
        assert_eq!(ModelConfig::from_json(&old_spelling).unwrap().num_experts, 8);
        let both = qwen3.replace(r#""num_local_experts":8"#, r#""num_local_experts":8,"num_experts":4"#);
        let e = ModelConfig::from_json(&both).unwrap_err();
        assert!(e.contains("`num_local_experts` (8) and `num_experts` (4) disagree"), "{e}");
        // Mixtral and OLMoE under either name; each family by its model_type alone.
        let mixtral = OLD.replace(r#""architectures":["MixtralForCausalLM"]"#, r#""model_type":"mixtral""#);
        assert_eq!(ModelConfig::from_json(&mixtral).unwrap().arch, Arch::Mixtral);
        let mixtral = mixtral.replace("num_local_experts", "num_experts");
        assert_eq!(ModelConfig::from_json(&mixtral).unwrap().num_experts, 4);
        for (_, t, arch) in Arch::SUPPORTED {
            let j = qwen3
                .replace(r#""architectures":["Qwen3MoeForCausalLM"],"model_type":"qwen3_moe","#, "")
                .replace(
                    "{",
                    &format!(
                        r#"{{"model_type":"{t}","shared_expert_intermediate_size":8,"kv_lora_rank":8,"qk_nope_head_dim":8,"qk_rope_head_dim":8,"v_head_dim":8,"#
                    ),
                );
            assert_eq!(ModelConfig::from_json(&j).unwrap().arch, arch, "{t}");
        }
        let qwen2 = qwen3
            .replace("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM")
            .replace(r#""sliding_window":null"#, r#""sliding_window":0,"shared_expert_intermediate_size":8"#);
        assert_eq!(ModelConfig::from_json(&qwen2).unwrap().sliding_window, None);
        let mixtral0 = OLD.replace("\"eos_token_id\":2", "\"sliding_window\":0");
        assert_eq!(ModelConfig::from_json(&mixtral0).unwrap().max_positions(), 4096, "a window of 0 is none");
        let e = ModelConfig::from_json(&no_arch.replace("qwen3_moe", "gpt2")).unwrap_err();
        assert!(e.contains("unsupported `model_type` `gpt2`") && e.contains("olmoe"), "{e}");
        let e = ModelConfig::from_json(&no_arch.replace(r#""model_type":"qwen3_moe","#, "")).unwrap_err();
        assert!(e.contains("missing fields `architectures` and `model_type`"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let e = ModelConfig::from_json(&OLD.replace("MixtralForCausalLM", "GPT2LMHeadModel")).unwrap_err();
        assert!(e.contains("GPT2LMHeadModel") && e.contains("OlmoeForCausalLM"), "{e}");
        let e = ModelConfig::from_json(&OLD.replace("\"hidden_size\":16,", "")).unwrap_err();
        assert!(e.contains("hidden_size"), "{e}");
        let e =
            ModelConfig::from_json(&OLD.replace("\"num_experts_per_tok\":2", "\"num_experts_per_tok\":9"))
                .unwrap_err();
        assert!(e.contains("num_experts_per_tok"), "{e}");
        assert!(ModelConfig::from_json("{not json").unwrap_err().contains("invalid JSON"));
        let e = ModelConfig::from_json(&OLD.replace("1000000.0", "-1.0")).unwrap_err();
        assert!(e.contains("rope_theta"), "{e}");
        let e = ModelConfig::from_json(&OLD.replace("\"eos_token_id\":2", "\"clip_qkv\":-1.0")).unwrap_err();
        assert!(e.contains("clip_qkv"), "{e}");
        let e = ModelConfig::from_json(&OLD.replace(
            "\"num_key_value_heads\":2",
            "\"num_key_value_heads\":2,\"head_dim\":4611686018427387904",
        ))
        .unwrap_err();
        assert!(e.contains("overflow"), "{e}");
    }

    #[test]
    fn context_limit_and_generation_config() {
        let mut c =
            ModelConfig::from_json(&OLD.replace("\"eos_token_id\":2", "\"sliding_window\":100")).unwrap();
        assert_eq!(c.max_positions(), 100);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("generation_config.json");
        std::fs::write(&path, r#"{"eos_token_id":[7,2]}"#).unwrap();
        c.merge_generation_config(&path).unwrap();
        assert_eq!(c.eos_token_ids, vec![7, 2]);
        std::fs::write(&path, "{oops").unwrap();
        assert!(c.merge_generation_config(&path).unwrap_err().to_string().contains("generation_config.json"));
        let q = r#"{"architectures":["Qwen2MoeForCausalLM"],"vocab_size":32,"hidden_size":16,"intermediate_size":24,
            "moe_intermediate_size":8,"num_hidden_layers":2,"num_attention_heads":4,"num_experts":4,
            "num_experts_per_tok":2,"sliding_window":8,"use_sliding_window":false}"#;
        let e = ModelConfig::from_json(q).unwrap_err();
        assert!(e.contains("shared_expert_intermediate_size"), "{e}");
        let c = ModelConfig::from_json(
            &q.replace("\"num_experts\":4", "\"num_experts\":4,\"shared_expert_intermediate_size\":8"),
        )
        .unwrap();
        assert_eq!(c.sliding_window, None);
    }
}
