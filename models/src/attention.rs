//! Grouped-query self-attention with rotary position embeddings over the paged KV cache,
//! covering the variants of the supported architectures: q/k/v bias (Qwen2-MoE), per-head q/k
//! RMSNorm (Qwen3-MoE), q/k RMSNorm over the whole projection and `clip_qkv` (OLMoE).
//!
//! The projections run over every row of the batch at once; each row then attends to its own
//! sequence's positions up to its own, read from that sequence's KV blocks.

use rayon::prelude::*;
use stevedore_kernels::{matmul_with, rms_norm, softmax, Backend, Isa, MatmulOptions, Threading, Weight};

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
    o_bias: Option<Vec<f32>>,
    qk_norm: QkNorm,
    clip_qkv: Option<f32>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    eps: f32,
}

/// Rotary position embedding angles, shared by every layer: `theta^(-2i/d)` for `i < d/2`, as
/// transformers computes them in f32, with `d` the rotated dimensions of a head (all of it, or
/// its leading `rotary_dim` with partial RoPE, GLM's).
pub struct Rope {
    inv_freq: Vec<f32>,
    head_dim: usize,
    /// LongRoPE's scale on cos and sin (1 without).
    mscale: f32,
}

/// The cos/sin of every row's position, computed once per forward pass for all layers.
pub struct RopeTable {
    /// `[row][i]` for `i < rotary_dim / 2`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    head_dim: usize,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        let d = cfg.rotary_dim;
        // LongRoPE and YaRN give their own frequencies.
        Rope {
            inv_freq: match &cfg.rope_inv_freq {
                Some(f) => f.clone(),
                None => (0..d / 2).map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f32 / d as f32)).collect(),
            },
            head_dim: cfg.head_dim,
            mscale: cfg.rope_mscale,
        }
    }

    /// The angles of `positions`, one row each.
    pub fn table(&self, positions: impl Iterator<Item = usize>) -> RopeTable {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for pos in positions {
            let pos = pos as f32;
            for f in &self.inv_freq {
                cos.push((pos * f).cos() * self.mscale);
                sin.push((pos * f).sin() * self.mscale);
            }
        }
        RopeTable { cos, sin, half: self.inv_freq.len(), head_dim: self.head_dim }
    }
}

impl RopeTable {
    /// Rotates the leading `rotary_dim` values of each `head_dim` chunk of `x` (rows of `width`
    /// values, row `t` at the table's row `t`) in the rotate-half convention of transformers;
    /// the rest of each head passes through.
    pub(crate) fn apply(&self, x: &mut [f32], width: usize) {
        let half = self.half;
        for (t, row) in x.chunks_mut(width).enumerate() {
            let (cos, sin) = (&self.cos[t * half..(t + 1) * half], &self.sin[t * half..(t + 1) * half]);
            for head in row.chunks_mut(self.head_dim) {
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
        let o_bias = match cfg.o_proj_bias {
            true => Some(load_vec(index, &format!("{prefix}.o_proj.bias"), h)?),
            false => None,
        };
        Ok(Attention {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            bias,
            o_bias,
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

        let scale = 1.0 / (d as f32).sqrt();
        let out =
            attend(&q, (self.n_heads, self.n_heads / self.n_kv_heads), (d, d), scale, (kv, layer), batch)?;
        drop(_t);
        let _t = profile::time(Op::OProj);
        Ok(linear(index, backend, &out, &self.o_proj, self.o_bias.as_deref()))
    }
}

/// Causal attention of the batch's rows over their sequences' cached positions: `q` holds
/// `heads` queries of width `dk` per row, query head `h` reads KV head `h / group`, whose keys
/// are `dk` wide and values `dv`; returns `dv` per row and head. GQA calls it with its heads;
/// MLA with every head on its one latent "head" (`group` = heads).
///
/// `out[t][head] = softmax(scale * q . k) v` over the positions `0..=pos` of t's sequence, one
/// task per (sequence, query head), a KV block of positions at a time: the rows of the sequence
/// that reach a block multiply its keys in one product, and their softmax weights over it its
/// (transposed) values in another. A row's scores and its sum over blocks `0..=pos/block` do not
/// depend on the other rows of the call (the matmul's row invariance) nor on where its prompt
/// was cut into chunks.
pub(crate) fn attend(
    q: &[f32],
    (heads, group): (usize, usize),
    (dk, dv): (usize, usize),
    scale: f32,
    (kv, layer): (&KvPool, usize),
    batch: &Batch,
) -> Result<Vec<f32>, KvError> {
    let spans = batch.spans();
    let mut tables: Vec<&[u32]> = Vec::with_capacity(spans.len());
    for span in spans {
        tables.push(kv.table(span.seq).ok_or(KvError::Unknown(span.seq))?);
    }
    let rows = batch.rows();
    let bs = kv.block_size();
    let q_dim = heads * dk;
    let tasks: Vec<(usize, usize)> = (0..spans.len()).flat_map(|s| (0..heads).map(move |h| (s, h))).collect();
    let parts: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(s, head)| {
            let span = &spans[s];
            let (r0, n) = (span.rows.start, span.rows.len());
            let pos = |i: usize| rows[r0 + i].pos;
            let g = head / group;
            let single = MatmulOptions { isa: Isa::detect(), threading: Threading::Single };
            let mut qs = Vec::with_capacity(n * dk);
            for i in 0..n {
                qs.extend_from_slice(&q[(r0 + i) * q_dim + head * dk..][..dk]);
            }
            // scores[i][p] for p < blocks * bs; rows are in position order.
            let blocks = pos(n - 1) / bs + 1;
            let width = blocks * bs;
            let mut scores = vec![0.0f32; n * width];
            let mut tile = vec![0.0f32; n * bs];
            // For each block, the first row whose position reaches it: those rows are a suffix
            // of the span.
            let firsts: Vec<usize> =
                (0..blocks).map(|b| (0..n).find(|&i| pos(i) >= b * bs).unwrap_or(n)).collect();
            for (b, &first) in firsts.iter().enumerate() {
                let m = n - first;
                let keys = Weight::from_f32(kv.key_block(layer, tables[s][b], g), bs, dk);
                matmul_with(single, &qs[first * dk..], &keys, &mut tile[..m * bs]);
                for j in 0..m {
                    scores[(first + j) * width + b * bs..][..bs].copy_from_slice(&tile[j * bs..(j + 1) * bs]);
                }
            }
            for i in 0..n {
                let row = &mut scores[i * width..(i + 1) * width];
                let (live, rest) = row.split_at_mut(pos(i) + 1);
                live.iter_mut().for_each(|x| *x *= scale);
                softmax(live);
                rest.fill(0.0);
            }
            let mut out = vec![0.0f32; n * dv];
            let mut weights = vec![0.0f32; n * bs];
            let mut partial = vec![0.0f32; n * dv];
            for (b, &first) in firsts.iter().enumerate() {
                let m = n - first;
                for j in 0..m {
                    weights[j * bs..(j + 1) * bs]
                        .copy_from_slice(&scores[(first + j) * width + b * bs..][..bs]);
                }
                let values = Weight::from_f32(kv.value_block(layer, tables[s][b], g), dv, bs);
                matmul_with(single, &weights[..m * bs], &values, &mut partial[..m * dv]);
                for (o, p) in out[first * dv..].iter_mut().zip(&partial[..m * dv]) {
                    *o += p;
                }
            }
            out
        })
        .collect();
    let out_dim = heads * dv;
    let mut out = vec![0.0f32; batch.len() * out_dim];
    for (&(s, head), part) in tasks.iter().zip(&parts) {
        let r0 = spans[s].rows.start;
        for (i, o) in part.chunks(dv).enumerate() {
            out[(r0 + i) * out_dim + head * dv..][..dv].copy_from_slice(o);
        }
    }
    Ok(out)
}
