//! Grouped-query self-attention with rotary position embeddings over the paged KV cache,
//! covering the variants of the supported architectures: q/k/v bias (Qwen2-MoE), per-head q/k
//! RMSNorm (Qwen3-MoE), q/k RMSNorm over the whole projection and `clip_qkv` (OLMoE).
//!
//! The projections run over every row of the batch at once; each row then attends to its own
//! sequence's positions up to its own, read from that sequence's KV blocks.

use rayon::prelude::*;
use stevedore_kernels::{axpy, dot, rms_norm, softmax, Backend};

use crate::kv::{KvError, KvPool};
use crate::profile::{self, Op};
use crate::tensor::{linear, linears, load_vec, Mat};
use crate::{Batch, Error, ModelConfig, WeightIndex};

/// Where q/k normalisation applies, if anywhere.
pub enum QkNorm {
    None,
    /// RMSNorm over each head's `head_dim` values (Qwen3-MoE).
    PerHead {
        q: Vec<f32>,
        k: Vec<f32>,
    },
    /// RMSNorm over the whole q and k projections (OLMoE).
    Full {
        q: Vec<f32>,
        k: Vec<f32>,
    },
}

pub struct Attention {
    q_proj: Mat,
    k_proj: Mat,
    v_proj: Mat,
    o_proj: Mat,
    bias: Option<[Vec<f32>; 3]>,
    qk_norm: QkNorm,
    clip_qkv: Option<f32>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    eps: f32,
}

/// Rotary position embedding angles, shared by every layer: `theta^(-2i/d)` for `i < d/2`, as
/// transformers computes them in f32.
pub struct Rope {
    inv_freq: Vec<f32>,
}

/// The cos/sin of every row's position, computed once per forward pass for all layers.
pub struct RopeTable {
    /// `[row][i]` for `i < head_dim / 2`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        let d = cfg.head_dim;
        Rope { inv_freq: (0..d / 2).map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f32 / d as f32)).collect() }
    }

    /// The angles of `positions`, one row each.
    pub fn table(&self, positions: impl Iterator<Item = usize>) -> RopeTable {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for pos in positions {
            let pos = pos as f32;
            for f in &self.inv_freq {
                cos.push((pos * f).cos());
                sin.push((pos * f).sin());
            }
        }
        RopeTable { cos, sin, half: self.inv_freq.len() }
    }
}

impl RopeTable {
    /// Rotates each `head_dim` chunk of `x` (rows of `width` values, row `t` at the table's row
    /// `t`) in the rotate-half convention of transformers.
    fn apply(&self, x: &mut [f32], width: usize) {
        let half = self.half;
        for (t, row) in x.chunks_mut(width).enumerate() {
            let (cos, sin) = (&self.cos[t * half..(t + 1) * half], &self.sin[t * half..(t + 1) * half]);
            for head in row.chunks_mut(2 * half) {
                for i in 0..half {
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * cos[i] - b * sin[i];
                    head[i + half] = b * cos[i] + a * sin[i];
                }
            }
        }
    }
}

impl Attention {
    pub fn load(
        index: &WeightIndex,
        cfg: &ModelConfig,
        prefix: &str,
        qk_norm: QkNorm,
    ) -> Result<Self, Error> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (q_dim, kv_dim) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
        let bias = if cfg.attention_bias {
            Some([
                load_vec(index, &format!("{prefix}.q_proj.bias"), q_dim)?,
                load_vec(index, &format!("{prefix}.k_proj.bias"), kv_dim)?,
                load_vec(index, &format!("{prefix}.v_proj.bias"), kv_dim)?,
            ])
        } else {
            None
        };
        // The projections first: their shapes, checked against the file, bound every size below.
        let q_proj = Mat::load(index, &format!("{prefix}.q_proj.weight"), q_dim, h)?;
        let k_proj = Mat::load(index, &format!("{prefix}.k_proj.weight"), kv_dim, h)?;
        let v_proj = Mat::load(index, &format!("{prefix}.v_proj.weight"), kv_dim, h)?;
        let o_proj = Mat::load(index, &format!("{prefix}.o_proj.weight"), h, q_dim)?;
        Ok(Attention {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            bias,
            qk_norm,
            clip_qkv: cfg.clip_qkv,
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim: d,
            eps: cfg.rms_norm_eps,
        })
    }

    /// Self-attention of decoder layer `layer` for the batch's rows: writes each row's key and
    /// value at its position in its sequence's blocks, then lets it attend to its sequence's
    /// positions `0..=pos` (causal). The caller has checked every row's position against its
    /// sequence's reservation.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        index: &WeightIndex,
        backend: &dyn Backend,
        x: &[f32],
        batch: &Batch,
        rope: &RopeTable,
        kv: &mut KvPool,
        layer: usize,
    ) -> Result<Vec<f32>, KvError> {
        let d = self.head_dim;
        let (q_dim, kv_dim) = (self.n_heads * d, self.n_kv_heads * d);
        let n = batch.len();
        let b = self.bias.as_ref();
        let t = profile::time(Op::QkvProj);
        let ws = [
            (&self.q_proj, b.map(|b| &b[0][..])),
            (&self.k_proj, b.map(|b| &b[1][..])),
            (&self.v_proj, b.map(|b| &b[2][..])),
        ];
        let [mut q, mut k, mut v]: [Vec<f32>; 3] =
            linears(index, backend, x, &ws).try_into().expect("three projections in, three out");
        match &self.qk_norm {
            QkNorm::None => {}
            // The norm weight's length selects per-head or whole-projection normalisation.
            QkNorm::PerHead { q: qn, k: kn } | QkNorm::Full { q: qn, k: kn } => {
                rms_norm(&mut q, qn, self.eps);
                rms_norm(&mut k, kn, self.eps);
            }
        }
        if let Some(c) = self.clip_qkv {
            for t in q.iter_mut().chain(k.iter_mut()).chain(v.iter_mut()) {
                *t = t.clamp(-c, c);
            }
        }
        rope.apply(&mut q, q_dim);
        rope.apply(&mut k, kv_dim);
        drop(t);
        let _t = profile::time(Op::Attention);
        for (i, row) in batch.rows().iter().enumerate() {
            let slot = kv.slot(row.seq, row.pos)?;
            kv.write(layer, slot, &k[i * kv_dim..(i + 1) * kv_dim], &v[i * kv_dim..(i + 1) * kv_dim]);
        }

        // out[t][head] = softmax(q . k / sqrt(d)) v over the positions 0..=pos of t's sequence.
        let kv = &*kv;
        let mut tables: Vec<&[u32]> = Vec::with_capacity(n);
        for span in batch.spans() {
            let table = kv.table(span.seq).ok_or(KvError::Unknown(span.seq))?;
            tables.extend(std::iter::repeat_n(table, span.rows.len()));
        }
        let rows = batch.rows();
        let group = self.n_heads / self.n_kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0.0f32; n * q_dim];
        out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
            let (t, head) = (i / self.n_heads, i % self.n_heads);
            let at = (head / group) * d;
            let qv = &q[t * q_dim + head * d..][..d];
            let table = tables[t];
            let mut scores: Vec<f32> = (0..=rows[t].pos)
                .map(|p| dot(qv, &kv.key(layer, kv.slot_in(table, p))[at..at + d]) * scale)
                .collect();
            softmax(&mut scores);
            for (p, s) in scores.iter().enumerate() {
                axpy(*s, &kv.value(layer, kv.slot_in(table, p))[at..at + d], o);
            }
        });
        drop(_t);
        let _t = profile::time(Op::OProj);
        Ok(linear(index, backend, &out, &self.o_proj, None))
    }
}
