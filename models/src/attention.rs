//! Grouped-query self-attention with rotary position embeddings and a KV cache, covering the
//! variants of the supported architectures: q/k/v bias (Qwen2-MoE), per-head q/k RMSNorm
//! (Qwen3-MoE), q/k RMSNorm over the whole projection and `clip_qkv` (OLMoE).

use rayon::prelude::*;
use stevedore_kernels::{axpy, dot, rms_norm, softmax};

use crate::tensor::{linear, load_vec, Mat};
use crate::{Error, ModelConfig, WeightIndex};

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
    /// `theta^(-2i/d)` for `i < d/2`, as transformers computes it in f32.
    inv_freq: Vec<f32>,
}

/// Keys and values of every past position of one layer: `[pos][kv_head][head_dim]`.
#[derive(Default)]
pub struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
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
        let inv_freq = (0..d / 2).map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f32 / d as f32)).collect();
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
            inv_freq,
        })
    }

    /// Rotates each `head_dim` chunk of `x` (rows of `width` values, row `t` at position
    /// `first_pos + t`) in the rotate-half convention of transformers.
    fn rope(&self, x: &mut [f32], width: usize, first_pos: usize) {
        let half = self.head_dim / 2;
        for (t, row) in x.chunks_mut(width).enumerate() {
            let pos = (first_pos + t) as f32;
            let (cos, sin): (Vec<f32>, Vec<f32>) =
                self.inv_freq.iter().map(|f| ((pos * f).cos(), (pos * f).sin())).unzip();
            for head in row.chunks_mut(self.head_dim) {
                for i in 0..half {
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * cos[i] - b * sin[i];
                    head[i + half] = b * cos[i] + a * sin[i];
                }
            }
        }
    }

    /// Self-attention for `n` tokens at positions `kv.len()..`; appends their keys and values.
    pub fn forward(&self, index: &WeightIndex, x: &[f32], kv: &mut LayerKv, first_pos: usize) -> Vec<f32> {
        let d = self.head_dim;
        let (q_dim, kv_dim) = (self.n_heads * d, self.n_kv_heads * d);
        let n = x.len() / self.q_proj.cols;
        let b = self.bias.as_ref();
        let mut q = linear(index, x, &self.q_proj, b.map(|b| &b[0][..]));
        let mut k = linear(index, x, &self.k_proj, b.map(|b| &b[1][..]));
        let mut v = linear(index, x, &self.v_proj, b.map(|b| &b[2][..]));
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
        self.rope(&mut q, q_dim, first_pos);
        self.rope(&mut k, kv_dim, first_pos);
        kv.k.extend_from_slice(&k);
        kv.v.extend_from_slice(&v);

        // out[t][head] = softmax(q . k / sqrt(d)) v over positions 0..=first_pos+t (causal).
        let group = self.n_heads / self.n_kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0.0f32; n * q_dim];
        out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
            let (t, head) = (i / self.n_heads, i % self.n_heads);
            let kvh = head / group;
            let qv = &q[t * q_dim + head * d..][..d];
            let len = first_pos + t + 1;
            let mut scores: Vec<f32> =
                (0..len).map(|p| dot(qv, &kv.k[p * kv_dim + kvh * d..][..d]) * scale).collect();
            softmax(&mut scores);
            for (p, s) in scores.iter().enumerate() {
                axpy(*s, &kv.v[p * kv_dim + kvh * d..][..d], o);
            }
        });
        linear(index, &out, &self.o_proj, None)
    }
}

impl LayerKv {
    pub fn with_capacity(positions: usize, kv_dim: usize) -> Self {
        LayerKv { k: Vec::with_capacity(positions * kv_dim), v: Vec::with_capacity(positions * kv_dim) }
    }

    pub fn bytes(&self) -> usize {
        (self.k.capacity() + self.v.capacity()) * 4
    }
}
