//! `config.json` parsing. Accepts both the older Hugging Face layout (`rope_theta` at top level,
//! `torch_dtype`) and the newer one (`rope_parameters`, `dtype`).

use std::path::Path;

use serde::Deserialize;

use crate::Error;

/// Architectures stevedore runs, by their `architectures[0]` name in config.json.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
}

impl Arch {
    pub const SUPPORTED: [(&'static str, Arch); 4] = [
        ("MixtralForCausalLM", Arch::Mixtral),
        ("Qwen2MoeForCausalLM", Arch::Qwen2Moe),
        ("Qwen3MoeForCausalLM", Arch::Qwen3Moe),
        ("OlmoeForCausalLM", Arch::Olmoe),
    ];

    pub fn hf_name(self) -> &'static str {
        Self::SUPPORTED.iter().find(|(_, a)| *a == self).unwrap().0
    }
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
    /// Qwen2-MoE shared expert (with sigmoid gate); 0 when absent.
    pub shared_expert_intermediate_size: usize,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    pub attention_bias: bool,
    /// OLMoE `clip_qkv`.
    pub clip_qkv: Option<f32>,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// The dtype config.json declares (informational; tensors carry their own).
    pub dtype: Option<String>,
}

impl ModelConfig {
    /// Whether decoder layer `layer` has a sparse MoE block (else a dense MLP).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        !self.mlp_only_layers.contains(&layer)
            && self.num_experts > 0
            && (layer + 1).is_multiple_of(self.decoder_sparse_step)
    }

    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.num_hidden_layers).filter(|&l| self.is_moe_layer(l))
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
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize, Debug)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    moe_intermediate_size: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RawRope>,
    rope_scaling: Option<RawRope>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    num_local_experts: Option<usize>,
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    attention_bias: Option<bool>,
    clip_qkv: Option<f64>,
    eos_token_id: Option<OneOrMany>,
    bos_token_id: Option<u32>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

fn req(v: Option<usize>, name: &str) -> Result<usize, String> {
    match v {
        Some(0) => Err(format!("field `{name}` must be positive")),
        Some(x) => Ok(x),
        None => Err(format!("missing field `{name}`")),
    }
}

impl RawConfig {
    fn normalise(self) -> Result<ModelConfig, String> {
        let names = self.architectures.ok_or("missing field `architectures`")?;
        let name = names.first().ok_or("field `architectures` is empty")?;
        let arch = Arch::SUPPORTED.iter().find(|(n, _)| n == name).map(|(_, a)| *a).ok_or_else(|| {
            let list: Vec<_> = Arch::SUPPORTED.iter().map(|(n, _)| *n).collect();
            format!("unsupported architecture `{name}`; supported: {}", list.join(", "))
        })?;
        let hidden_size = req(self.hidden_size, "hidden_size")?;
        let num_attention_heads = req(self.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads =
            req(self.num_key_value_heads.or(Some(num_attention_heads)), "num_key_value_heads")?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "field `num_key_value_heads` ({num_key_value_heads}) must divide `num_attention_heads` ({num_attention_heads})"
            ));
        }
        let head_dim = match self.head_dim {
            Some(d) => req(Some(d), "head_dim")?,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(
                    "`hidden_size` is not a multiple of `num_attention_heads` and `head_dim` is missing"
                        .into(),
                )
            }
        };
        if head_dim % 2 != 0 {
            return Err(format!("field `head_dim` ({head_dim}) must be even for RoPE"));
        }
        let rope = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        if let Some(r) = rope {
            let kind = r.rope_type.as_deref().or(r.kind.as_deref()).unwrap_or("default");
            if kind != "default" {
                return Err(format!("RoPE type `{kind}` is not supported (only `default`)"));
            }
        }
        let rope_theta =
            self.rope_parameters.as_ref().and_then(|r| r.rope_theta).or(self.rope_theta).unwrap_or(10000.0);
        let (num_experts_field, num_experts) = match arch {
            Arch::Mixtral => ("num_local_experts", self.num_local_experts),
            _ => ("num_experts", self.num_experts),
        };
        let num_experts = req(num_experts, num_experts_field)?;
        let num_experts_per_tok = req(self.num_experts_per_tok, "num_experts_per_tok")?;
        if num_experts_per_tok > num_experts {
            return Err(format!(
                "field `num_experts_per_tok` ({num_experts_per_tok}) exceeds `{num_experts_field}` ({num_experts})"
            ));
        }
        let intermediate_size = req(self.intermediate_size, "intermediate_size")?;
        let moe_intermediate_size = match arch {
            Arch::Mixtral | Arch::Olmoe => intermediate_size,
            Arch::Qwen2Moe | Arch::Qwen3Moe => req(self.moe_intermediate_size, "moe_intermediate_size")?,
        };
        let shared_expert_intermediate_size = match arch {
            Arch::Qwen2Moe => self.shared_expert_intermediate_size.unwrap_or(0),
            _ => 0,
        };
        let (decoder_sparse_step, mlp_only_layers) = match arch {
            Arch::Qwen2Moe | Arch::Qwen3Moe => (
                req(self.decoder_sparse_step.or(Some(1)), "decoder_sparse_step")?,
                self.mlp_only_layers.unwrap_or_default(),
            ),
            _ => (1, Vec::new()),
        };
        let norm_topk_prob = match arch {
            Arch::Mixtral => true,
            _ => self.norm_topk_prob.unwrap_or(false),
        };
        let attention_bias = match arch {
            Arch::Qwen2Moe => true,
            Arch::Mixtral => false,
            _ => self.attention_bias.unwrap_or(false),
        };
        let eos_token_ids = match self.eos_token_id {
            Some(OneOrMany::One(x)) => vec![x],
            Some(OneOrMany::Many(v)) => v,
            None => Vec::new(),
        };
        let rms_norm_eps = self.rms_norm_eps.unwrap_or(1e-6);
        if rms_norm_eps.is_nan() || rms_norm_eps < 0.0 {
            return Err("field `rms_norm_eps` must be a non-negative number".into());
        }
        Ok(ModelConfig {
            arch,
            vocab_size: req(self.vocab_size, "vocab_size")?,
            hidden_size,
            num_hidden_layers: req(self.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: rms_norm_eps as f32,
            rope_theta: rope_theta as f32,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            num_experts,
            num_experts_per_tok,
            moe_intermediate_size,
            intermediate_size,
            norm_topk_prob,
            shared_expert_intermediate_size,
            decoder_sparse_step,
            mlp_only_layers,
            attention_bias,
            clip_qkv: self.clip_qkv.map(|c| c as f32),
            eos_token_ids,
            bos_token_id: self.bos_token_id,
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
    }
}
