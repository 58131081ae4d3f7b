//! The decoder: embeddings, a stack of (attention, feed-forward) layers with pre-RMSNorm and
//! residuals, final norm and LM head — the shape all supported architectures share. What
//! differs between them is chosen at load time (see `DecoderLayer::load`).

use std::collections::HashMap;
use std::path::Path;

use stevedore_kernels::{axpy, Backend, Cpu};
use tracing::debug_span;

use crate::attention::{Attention, QkNorm, Rope};
use crate::experts::{ExpertSource, ExpertTensors, ExpertsError, Foresight, GateEstimate, GateInput};
use crate::kv::KvPool;
use crate::mla::Mla;
use crate::moe::{Mlp, SparseMoe};
use crate::profile::{self, Op};
use crate::tensor::{linear, load_vec, Mat, Norm};
use crate::{Batch, Error, LayerId, LayerMap, ModelConfig, QkNormKind, SeqId, WeightIndex};

/// A layer's attention kind: grouped-query, or multi-head latent (DeepSeek).
enum SelfAttention {
    Grouped(Attention),
    Latent(Mla),
}

enum FeedForward {
    Dense(Mlp),
    Sparse(SparseMoe),
}

struct DecoderLayer {
    input_layernorm: Norm,
    self_attn: SelfAttention,
    post_attention_layernorm: Norm,
    ffn: FeedForward,
}

impl DecoderLayer {
    fn load(index: &WeightIndex, cfg: &ModelConfig, layers: &LayerMap, l: usize) -> Result<Self, Error> {
        let p = format!("model.layers.{l}");
        let h = cfg.hidden_size;
        let attn = format!("{p}.self_attn");
        let qk_norm = match cfg.qk_norm {
            QkNormKind::PerHead => QkNorm::PerHead {
                q: load_vec(index, &format!("{attn}.q_norm.weight"), cfg.head_dim)?,
                k: load_vec(index, &format!("{attn}.k_norm.weight"), cfg.head_dim)?,
            },
            QkNormKind::Full => QkNorm::Full {
                q: load_vec(index, &format!("{attn}.q_norm.weight"), cfg.num_attention_heads * cfg.head_dim)?,
                k: load_vec(index, &format!("{attn}.k_norm.weight"), cfg.num_key_value_heads * cfg.head_dim)?,
            },
            QkNormKind::None => QkNorm::None,
        };
        let ffn = match layers.moe(LayerId(l)) {
            None => FeedForward::Dense(Mlp::load(index, &format!("{p}.mlp"), h, cfg.intermediate_size)?),
            Some(moe) => {
                let names = crate::family::moe_names(cfg.arch, l);
                let shared = names.shared.as_deref().filter(|_| cfg.shared_expert_intermediate_size > 0);
                FeedForward::Sparse(SparseMoe::load(index, cfg, (LayerId(l), moe), &names.router, shared)?)
            }
        };
        Ok(DecoderLayer {
            input_layernorm: Norm::load(index, &format!("{p}.input_layernorm"), h, cfg)?,
            self_attn: match &cfg.mla {
                Some(m) => SelfAttention::Latent(Mla::load(index, cfg, m, &attn)?),
                None => SelfAttention::Grouped(Attention::load(index, cfg, &attn, qk_norm)?),
            },
            post_attention_layernorm: Norm::load(index, &format!("{p}.post_attention_layernorm"), h, cfg)?,
            ffn,
        })
    }
}

/// What one forward pass returns.
pub struct Forward {
    /// The logits of the batch's [`Batch::logit_rows`], in that order, `vocab_size` each.
    pub logits: Vec<f32>,
    /// Sequences an expert source failed for (one error each): their logits are meaningless and
    /// their KV cache did not advance; the caller ends them. The other sequences are unaffected.
    pub failed: Vec<(SeqId, ExpertsError)>,
}

/// A loaded model: config, dense weights (mapped in place), the layer stack, and where every
/// routed expert's tensors lie.
pub struct Model {
    pub config: ModelConfig,
    pub index: WeightIndex,
    /// Decoder layer <-> MoE layer, built once.
    pub layers: LayerMap,
    /// Every routed expert's tensors, checked at load.
    pub experts: ExpertTensors,
    backend: Box<dyn Backend>,
    rope: Rope,
    embed_tokens: Mat,
    decoder: Vec<DecoderLayer>,
    norm: Norm,
    lm_head: Mat,
    lm_head_bias: Option<Vec<f32>>,
}

impl Model {
    /// Loads `config.json` and the checkpoint's dense weights from `dir`, checking every tensor
    /// the forward pass needs (experts included) for presence, dtype and shape.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        Self::load_with(dir, None)
    }

    /// [`Model::load`], with the dense matrices read from their `dense` low-bit copies when
    /// given (`stevedore quantize --all`).
    pub fn load_with(dir: &Path, dense: Option<stevedore_kernels::DType>) -> Result<Self, Error> {
        let mut config = ModelConfig::from_file(&dir.join("config.json"))?;
        config.merge_generation_config(&dir.join("generation_config.json"))?;
        let mut index = WeightIndex::open(dir)?;
        if let Some(format) = dense {
            index.use_dense_copies(format)?;
        }
        Self::from_parts(config, index)
    }

    pub fn from_parts(config: ModelConfig, index: WeightIndex) -> Result<Self, Error> {
        let cfg = &config;
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let layers = LayerMap::new(cfg);
        let embed_tokens = Mat::load(&index, "model.embed_tokens.weight", v, h)?;
        let lm_head = if cfg.tie_word_embeddings && !index.contains("lm_head.weight") {
            embed_tokens
        } else {
            Mat::load(&index, "lm_head.weight", v, h)?
        };
        let decoder = (0..cfg.num_hidden_layers)
            .map(|l| DecoderLayer::load(&index, cfg, &layers, l))
            .collect::<Result<_, _>>()?;
        let experts = ExpertTensors::load(&index, cfg, &layers)?;
        let norm = Norm::load(&index, "model.norm", h, cfg)?;
        let lm_head_bias = match cfg.lm_head_bias {
            true => Some(load_vec(&index, "lm_head.bias", v)?),
            false => None,
        };
        Ok(Model {
            rope: Rope::new(cfg),
            backend: Box::new(Cpu),
            embed_tokens,
            decoder,
            norm,
            lm_head,
            lm_head_bias,
            layers,
            experts,
            config,
            index,
        })
    }

    /// Checks `batch` against the vocabulary and `kv`: every sequence holds blocks, appears
    /// once, starts where its cache ends and stays within its reservation.
    fn check(&self, batch: &Batch, kv: &KvPool) -> Result<(), Error> {
        if batch.is_empty() {
            return Err(Error::Input("no tokens to run".into()));
        }
        let vocab = self.config.vocab_size;
        if let Some(r) = batch.rows().iter().find(|r| r.token as usize >= vocab) {
            return Err(Error::Input(format!(
                "sequence {}: token id {} is outside the vocabulary ({vocab})",
                r.seq, r.token
            )));
        }
        let mut seen = HashMap::new();
        for span in batch.spans() {
            if seen.insert(span.seq, ()).is_some() {
                return Err(Error::Input(format!("sequence {} appears twice in one batch", span.seq)));
            }
            let rows = &batch.rows()[span.rows.clone()];
            let (Some(len), Some(capacity)) = (kv.len(span.seq), kv.capacity(span.seq)) else {
                return Err(Error::Input(format!("sequence {} holds no KV blocks", span.seq)));
            };
            if rows[0].pos != len {
                return Err(Error::Input(format!(
                    "sequence {}: the batch starts at position {} but its KV cache holds {len}",
                    span.seq, rows[0].pos
                )));
            }
            let end = len + rows.len();
            if end > capacity {
                return Err(Error::Input(format!(
                    "sequence {}: {end} positions exceed its KV reservation of {capacity}",
                    span.seq
                )));
            }
        }
        Ok(())
    }

    /// Runs every row of `batch` through the model: each sequence's rows at the next positions
    /// of its KV cache. Returns the logits of the batch's logit rows. A row's result does not
    /// depend on the other rows of the batch.
    pub fn forward(
        &self,
        batch: &Batch,
        kv: &mut KvPool,
        experts: &dyn ExpertSource,
    ) -> Result<Forward, Error> {
        stevedore_kernels::in_pool(|| self.forward_in_pool(batch, kv, experts))
    }

    fn forward_in_pool(
        &self,
        batch: &Batch,
        kv: &mut KvPool,
        experts: &dyn ExpertSource,
    ) -> Result<Forward, Error> {
        self.check(batch, kv)?;
        let cfg = &self.config;
        let (h, n, backend) = (cfg.hidden_size, batch.len(), &*self.backend);
        let rows = batch.rows();
        let embed = self.embed_tokens.weight(&self.index);
        let mut x = vec![0.0f32; n * h];
        {
            let _t = profile::time(Op::Embed);
            for (xr, row) in x.chunks_mut(h).zip(rows) {
                embed.row_to_f32(row.token as usize, xr);
            }
        }
        let rope = self.rope.table(rows.iter().map(|r| r.pos));
        // Rows still running: a sequence whose expert failed stops being routed.
        let mut routed = vec![true; n];
        let mut failed: Vec<(SeqId, ExpertsError)> = Vec::new();
        let foresight = experts.foresight();
        for (l, layer) in self.decoder.iter().enumerate() {
            let _span = debug_span!("layer", l).entered();
            let input = match foresight {
                Some(f) if f.input == GateInput::LayerInput => Some(x.clone()),
                _ => None,
            };
            let t = profile::time(Op::Norm);
            let mut hs = x.clone();
            layer.input_layernorm.apply(&mut hs);
            drop(t);
            let attn = match &layer.self_attn {
                SelfAttention::Grouped(a) => a.forward(&self.index, backend, &hs, batch, &rope, kv, l),
                SelfAttention::Latent(a) => a.forward(&self.index, backend, &hs, batch, &rope, kv, l),
            }
            .map_err(|e| Error::Input(e.to_string()))?;
            let t = profile::time(Op::Norm);
            axpy(1.0, &attn, &mut x);
            let mut hs = x.clone();
            layer.post_attention_layernorm.apply(&mut hs);
            drop(t);
            let ff = match &layer.ffn {
                FeedForward::Dense(mlp) => {
                    let _t = profile::time(Op::DenseFfn);
                    mlp.forward(&self.index, backend, &hs)
                }
                FeedForward::Sparse(moe) => {
                    let ahead = match foresight {
                        Some(f) => {
                            let _t = profile::time(Op::Router);
                            self.estimate_ahead(l, input.as_deref().unwrap_or(&x), f)
                        }
                        None => Vec::new(),
                    };
                    let (out, failed_rows) =
                        moe.forward(&self.index, backend, &hs, rows, &routed, (experts, &ahead));
                    for (r, error) in failed_rows {
                        let seq = rows[r].seq;
                        if !failed.iter().any(|(s, _)| *s == seq) {
                            failed.push((seq, error));
                        }
                    }
                    for span in batch.spans().iter().filter(|s| failed.iter().any(|(f, _)| *f == s.seq)) {
                        routed[span.rows.clone()].fill(false);
                    }
                    out
                }
            };
            let _t = profile::time(Op::Combine);
            axpy(1.0, &ff, &mut x);
        }
        for span in batch.spans().iter().filter(|s| !failed.iter().any(|(f, _)| *f == s.seq)) {
            kv.set_len(span.seq, rows[span.rows.end - 1].pos + 1);
        }
        let mut last = Vec::with_capacity(batch.logit_rows().len() * h);
        for &r in batch.logit_rows() {
            last.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        self.norm.apply(&mut last);
        let _t = profile::time(Op::LmHead);
        let logits = linear(&self.index, backend, &last, &self.lm_head, self.lm_head_bias.as_deref());
        Ok(Forward { logits, failed })
    }

    /// Next-gate estimates at decoder layer `l` of the next `f.depth` MoE layers from `x` (see
    /// [`GateEstimate`]), nearest first.
    fn estimate_ahead(&self, l: usize, x: &[f32], f: Foresight) -> Vec<GateEstimate> {
        self.estimate_from(l + 1, x, f)
    }

    /// Next-gate estimates at the start of a forward pass, before any layer: the first
    /// `f.depth` MoE layers' routers applied to the embeddings of `tokens` (one row each), the
    /// first MoE layer at distance 1. What a token's first layers can be prefetched from once
    /// the token is known.
    pub fn estimate_at_start(&self, tokens: &[u32], f: Foresight) -> Vec<GateEstimate> {
        let h = self.config.hidden_size;
        let embed = self.embed_tokens.weight(&self.index);
        let mut x = vec![0.0f32; tokens.len() * h];
        for (xr, &t) in x.chunks_mut(h).zip(tokens) {
            if (t as usize) < self.config.vocab_size {
                embed.row_to_f32(t as usize, xr);
            }
        }
        self.estimate_from(0, &x, f)
    }

    /// The routers of the first `f.depth` MoE layers from decoder layer `first` on, applied to
    /// `x`, nearest first (distance 1).
    fn estimate_from(&self, first: usize, x: &[f32], f: Foresight) -> Vec<GateEstimate> {
        (self.decoder[first.min(self.decoder.len())..].iter())
            .filter_map(|layer| match &layer.ffn {
                FeedForward::Sparse(moe) => Some((moe, &layer.post_attention_layernorm)),
                FeedForward::Dense(_) => None,
            })
            .take(f.depth)
            .enumerate()
            .map(|(i, (moe, norm))| moe.estimate(&self.index, &*self.backend, (x, norm), i + 1, f.candidates))
            .collect()
    }

    /// Weight bytes one decode token reads: every dense weight but the embedding table (one row
    /// of it; the whole table when it is also the LM head) and `top_k` routed experts of the
    /// average size in every MoE layer. What a decode's weight bandwidth is measured by.
    pub fn decode_weight_bytes(&self) -> u64 {
        let dense = self.dense_bytes();
        let embed = self.index.info("model.embed_tokens.weight").map_or(0, |t| t.len);
        let tied = self.config.tie_word_embeddings && !self.index.contains("lm_head.weight");
        let dense = if tied { dense } else { dense.saturating_sub(embed) };
        let experts = self.index.bytes_where(crate::names::is_expert_tensor);
        let count = self.experts.iter().count() as u64;
        let per_token = self.layers.num_moe_layers() as u64 * self.config.num_experts_per_tok as u64;
        dense + experts.checked_div(count).unwrap_or(0) * per_token
    }

    /// Bytes of dense (always resident) weights in the checkpoint.
    pub fn dense_bytes(&self) -> u64 {
        self.index.bytes_where(|n| !crate::names::is_expert_tensor(n))
    }

    /// Bytes the model holds beside the checkpoint's (MLA's absorbed key expansions): resident
    /// memory too, which an automatic host budget leaves room for.
    pub fn derived_bytes(&self) -> u64 {
        (self.decoder.iter())
            .map(|l| match &l.self_attn {
                SelfAttention::Latent(m) => m.derived_bytes(),
                SelfAttention::Grouped(_) => 0,
            })
            .sum()
    }

    /// The backend the forward pass computes with.
    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }
}
