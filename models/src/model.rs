//! The decoder: embeddings, a stack of (attention, feed-forward) layers with pre-RMSNorm and
//! residuals, final norm and LM head — the shape all four supported architectures share. What
//! differs between them is chosen at load time (see `DecoderLayer::load`).

use std::path::Path;

use stevedore_kernels::{axpy, rms_norm};
use tracing::debug_span;

use crate::attention::{Attention, LayerKv, QkNorm};
use crate::experts::Experts;
use crate::moe::{Mlp, SparseMoe};
use crate::tensor::{linear, load_vec, Mat};
use crate::{Arch, Error, ModelConfig, WeightIndex};

enum FeedForward {
    Dense(Mlp),
    Sparse(SparseMoe),
}

struct DecoderLayer {
    input_layernorm: Vec<f32>,
    self_attn: Attention,
    post_attention_layernorm: Vec<f32>,
    ffn: FeedForward,
}

impl DecoderLayer {
    fn load(index: &WeightIndex, cfg: &ModelConfig, l: usize) -> Result<Self, Error> {
        let p = format!("model.layers.{l}");
        let h = cfg.hidden_size;
        let attn = format!("{p}.self_attn");
        let qk_norm = match cfg.arch {
            Arch::Mixtral | Arch::Qwen2Moe => QkNorm::None,
            Arch::Qwen3Moe => QkNorm::PerHead {
                q: load_vec(index, &format!("{attn}.q_norm.weight"), cfg.head_dim)?,
                k: load_vec(index, &format!("{attn}.k_norm.weight"), cfg.head_dim)?,
            },
            Arch::Olmoe => QkNorm::Full {
                q: load_vec(index, &format!("{attn}.q_norm.weight"), cfg.num_attention_heads * cfg.head_dim)?,
                k: load_vec(index, &format!("{attn}.k_norm.weight"), cfg.num_key_value_heads * cfg.head_dim)?,
            },
        };
        let ffn = if !cfg.is_moe_layer(l) {
            FeedForward::Dense(Mlp::load(index, &format!("{p}.mlp"), h, cfg.intermediate_size)?)
        } else {
            match cfg.arch {
                Arch::Mixtral => FeedForward::Sparse(SparseMoe::load(
                    index,
                    cfg,
                    l,
                    &format!("{p}.block_sparse_moe.gate.weight"),
                    None,
                )?),
                Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::Olmoe => {
                    let mlp = format!("{p}.mlp");
                    let shared = (cfg.shared_expert_intermediate_size > 0).then_some(mlp.as_str());
                    FeedForward::Sparse(SparseMoe::load(
                        index,
                        cfg,
                        l,
                        &format!("{mlp}.gate.weight"),
                        shared,
                    )?)
                }
            }
        };
        Ok(DecoderLayer {
            input_layernorm: load_vec(index, &format!("{p}.input_layernorm.weight"), h)?,
            self_attn: Attention::load(index, cfg, &attn, qk_norm)?,
            post_attention_layernorm: load_vec(index, &format!("{p}.post_attention_layernorm.weight"), h)?,
            ffn,
        })
    }
}

/// Per-layer keys and values of the sequence so far.
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// Room for `positions` tokens (allocated up front, so its size is known at start).
    pub fn new(cfg: &ModelConfig, positions: usize) -> Self {
        let kv_dim = cfg.num_key_value_heads * cfg.head_dim;
        let layers = (0..cfg.num_hidden_layers).map(|_| LayerKv::with_capacity(positions, kv_dim)).collect();
        KvCache { layers, len: 0, capacity: positions }
    }

    /// Bytes a cache for `positions` tokens occupies (saturating; positions are bounded by
    /// `ModelConfig::max_positions` before a cache is made).
    pub fn bytes_for(cfg: &ModelConfig, positions: usize) -> u64 {
        [cfg.num_hidden_layers, positions, cfg.num_key_value_heads, cfg.head_dim, 2, 4]
            .iter()
            .fold(1u64, |acc, &x| acc.saturating_mul(x as u64))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::bytes).sum()
    }
}

/// A loaded model: config, dense weights (mapped in place) and the layer stack.
pub struct Model {
    pub config: ModelConfig,
    pub index: WeightIndex,
    embed_tokens: Mat,
    layers: Vec<DecoderLayer>,
    norm: Vec<f32>,
    lm_head: Mat,
}

impl Model {
    /// Loads `config.json` and the checkpoint's dense weights from `dir`, checking every tensor
    /// the forward pass needs (experts included) for presence, dtype and shape.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let mut config = ModelConfig::from_file(&dir.join("config.json"))?;
        config.merge_generation_config(&dir.join("generation_config.json"))?;
        let index = WeightIndex::open(dir)?;
        Self::from_parts(config, index)
    }

    pub fn from_parts(config: ModelConfig, index: WeightIndex) -> Result<Self, Error> {
        let cfg = &config;
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = Mat::load(&index, "model.embed_tokens.weight", v, h)?;
        let lm_head = if cfg.tie_word_embeddings && !index.contains("lm_head.weight") {
            embed_tokens
        } else {
            Mat::load(&index, "lm_head.weight", v, h)?
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| DecoderLayer::load(&index, cfg, l))
            .collect::<Result<_, _>>()?;
        let shapes = crate::names::expert_tensor_shapes(cfg);
        for l in cfg.moe_layers() {
            for e in 0..cfg.num_experts {
                for (name, shape) in crate::names::expert_tensor_names(cfg.arch, l, e).iter().zip(&shapes) {
                    index.check(name, shape)?;
                }
            }
        }
        let norm = load_vec(&index, "model.norm.weight", h)?;
        Ok(Model { embed_tokens, layers, norm, lm_head, config, index })
    }

    /// Runs `tokens` at the next positions of `kv` and returns the logits of the last one.
    pub fn forward(
        &self,
        tokens: &[u32],
        kv: &mut KvCache,
        experts: &dyn Experts,
    ) -> Result<Vec<f32>, Error> {
        let cfg = &self.config;
        let h = cfg.hidden_size;
        if tokens.is_empty() {
            return Err(Error::Input("no tokens to run".into()));
        }
        if kv.len + tokens.len() > kv.capacity {
            return Err(Error::Input(format!(
                "sequence of {} tokens exceeds the KV cache's {} positions",
                kv.len + tokens.len(),
                kv.capacity
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(Error::Input(format!("token id {t} is outside the vocabulary ({})", cfg.vocab_size)));
        }
        let first_pos = kv.len;
        let embed = self.embed_tokens.weight(&self.index);
        let mut x = vec![0.0f32; tokens.len() * h];
        for (row, &t) in x.chunks_mut(h).zip(tokens) {
            embed.row_to_f32(t as usize, row);
        }
        for (l, (layer, lkv)) in self.layers.iter().zip(kv.layers.iter_mut()).enumerate() {
            let _span = debug_span!("layer", l).entered();
            let mut hs = x.clone();
            rms_norm(&mut hs, &layer.input_layernorm, cfg.rms_norm_eps);
            let attn = layer.self_attn.forward(&self.index, &hs, lkv, first_pos);
            axpy(1.0, &attn, &mut x);
            let mut hs = x.clone();
            rms_norm(&mut hs, &layer.post_attention_layernorm, cfg.rms_norm_eps);
            let ff = match &layer.ffn {
                FeedForward::Dense(mlp) => mlp.forward(&self.index, &hs),
                FeedForward::Sparse(moe) => moe.forward(&self.index, &hs, tokens, first_pos, experts)?,
            };
            axpy(1.0, &ff, &mut x);
        }
        kv.len += tokens.len();
        let mut last = x[(tokens.len() - 1) * h..].to_vec();
        rms_norm(&mut last, &self.norm, cfg.rms_norm_eps);
        Ok(linear(&self.index, &last, &self.lm_head, None))
    }

    /// Bytes of dense (always resident) weights.
    pub fn dense_bytes(&self) -> u64 {
        self.index.bytes_where(|n| !crate::names::is_expert_tensor(n))
    }
}
