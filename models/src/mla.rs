//! Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2) over a latent KV cache.
//!
//! Each position is cached as its normalised latent `c` (`kv_lora_rank`) and its rotary key
//! `k_rot` (`qk_rope_head_dim`, shared by every head), never as per-head keys and values: the
//! pool's one "head" has the key `[c, k_rot]` and the value `c`. `kv_b_proj` expands a latent
//! into head `h`'s key part `W_k,h c` and value `W_v,h c`; both are absorbed instead of applied
//! to every cached position: head `h`'s query becomes `[W_k,h^T q_nope, q_rot]`, so that its dot
//! product with `[c, k_rot]` is `q_nope . W_k,h c + q_rot . k_rot`, exactly transformers' score,
//! and the attention-weighted latent is expanded once per row, `W_v,h (sum p c)`. The rotary
//! parts are de-interleaved first (`rope_interleave`), as transformers does.

use stevedore_kernels::{matmul, rms_norm, Backend, Weight};

use crate::attention::{attend, RopeTable};
use crate::config::MlaConfig;
use crate::kv::{KvError, KvPool};
use crate::profile::{self, Op};
use crate::tensor::{linear, load_vec, Mat};
use crate::{Batch, Error, ModelConfig, WeightIndex};

/// How queries are projected: directly, or through a normalised low-rank bottleneck.
enum QueryPath {
    Direct(Mat),
    LowRank { a: Mat, a_bias: Option<Vec<f32>>, norm: Vec<f32>, b: Mat },
}

pub struct Mla {
    query: QueryPath,
    kv_a: Mat,
    kv_a_bias: Option<Vec<f32>>,
    kv_norm: Vec<f32>,
    /// `[heads * (nope + v), lora]`: per head its key rows, then its value rows.
    kv_b: Mat,
    /// Per head, its key rows of `kv_b` transposed, f32: `[heads][lora][nope]`, the matrix a
    /// query's no-RoPE part goes through to meet the latent.
    k_absorb: Vec<f32>,
    o_proj: Mat,
    o_bias: Option<Vec<f32>>,
    m: MlaConfig,
    heads: usize,
}

/// The latent norms' epsilon: transformers builds `q_a_layernorm` and `kv_a_layernorm` with
/// the RMSNorm default, not the config's `rms_norm_eps`.
const LATENT_NORM_EPS: f32 = 1e-6;

impl Mla {
    pub fn load(index: &WeightIndex, cfg: &ModelConfig, m: &MlaConfig, prefix: &str) -> Result<Self, Error> {
        let (h, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        let (nope, rope, v, lora) = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank);
        let bias = |name: &str, len: usize| -> Result<Option<Vec<f32>>, Error> {
            match cfg.attention_bias {
                true => Ok(Some(load_vec(index, &format!("{prefix}.{name}.bias"), len)?)),
                false => Ok(None),
            }
        };
        let q_dim = heads * (nope + rope);
        let query = match m.q_lora_rank {
            None => QueryPath::Direct(Mat::load(index, &format!("{prefix}.q_proj.weight"), q_dim, h)?),
            Some(r) => QueryPath::LowRank {
                a: Mat::load(index, &format!("{prefix}.q_a_proj.weight"), r, h)?,
                a_bias: bias("q_a_proj", r)?,
                norm: load_vec(index, &format!("{prefix}.q_a_layernorm.weight"), r)?,
                b: Mat::load(index, &format!("{prefix}.q_b_proj.weight"), q_dim, r)?,
            },
        };
        let kv_b = Mat::load(index, &format!("{prefix}.kv_b_proj.weight"), heads * (nope + v), lora)?;
        let w = kv_b.weight(index);
        let mut k_absorb = vec![0.0f32; heads * lora * nope];
        let mut row = vec![0.0f32; lora];
        for hd in 0..heads {
            for i in 0..nope {
                w.row_to_f32(hd * (nope + v) + i, &mut row);
                for (j, &x) in row.iter().enumerate() {
                    k_absorb[(hd * lora + j) * nope + i] = x;
                }
            }
        }
        Ok(Mla {
            query,
            kv_a: Mat::load(index, &format!("{prefix}.kv_a_proj_with_mqa.weight"), lora + rope, h)?,
            kv_a_bias: bias("kv_a_proj_with_mqa", lora + rope)?,
            kv_norm: load_vec(index, &format!("{prefix}.kv_a_layernorm.weight"), lora)?,
            kv_b,
            k_absorb,
            o_proj: Mat::load(index, &format!("{prefix}.o_proj.weight"), h, heads * v)?,
            o_bias: bias("o_proj", h)?,
            m: m.clone(),
            heads,
        })
    }

    /// Bytes held beside the checkpoint's own (the absorbed key expansion, in f32).
    pub fn derived_bytes(&self) -> u64 {
        (self.k_absorb.len() * 4) as u64
    }

    /// Self-attention of decoder layer `layer` for the batch's rows (see the module docs):
    /// caches each row's latent and rotary key, then attends causally.
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
        let m = &self.m;
        let (nope, r, v, lora, heads) =
            (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank, self.heads);
        let n = batch.len();
        let t = profile::time(Op::QkvProj);
        let q = match &self.query {
            QueryPath::Direct(w) => linear(index, backend, x, w, None),
            QueryPath::LowRank { a, a_bias, norm, b } => {
                let mut qa = linear(index, backend, x, a, a_bias.as_deref());
                rms_norm(&mut qa, norm, LATENT_NORM_EPS);
                linear(index, backend, &qa, b, None)
            }
        };
        let ckv = linear(index, backend, x, &self.kv_a, self.kv_a_bias.as_deref());
        // Per row: the normalised latent, and the rotary key.
        let mut latent = Vec::with_capacity(n * lora);
        let mut k_rot = Vec::with_capacity(n * r);
        for row in ckv.chunks(lora + r) {
            latent.extend_from_slice(&row[..lora]);
            k_rot.extend_from_slice(&row[lora..]);
        }
        rms_norm(&mut latent, &self.kv_norm, LATENT_NORM_EPS);
        // Queries split per head into the no-RoPE part (head-major, for the absorption) and the
        // rotary part (row-major, as RoPE takes it).
        let mut q_nope = vec![0.0f32; heads * n * nope];
        let mut q_rot = Vec::with_capacity(n * heads * r);
        for (i, row) in q.chunks(heads * (nope + r)).enumerate() {
            for (hd, head) in row.chunks(nope + r).enumerate() {
                q_nope[(hd * n + i) * nope..][..nope].copy_from_slice(&head[..nope]);
                q_rot.extend_from_slice(&head[nope..]);
            }
        }
        if m.interleave {
            deinterleave(&mut q_rot, r);
            deinterleave(&mut k_rot, r);
        }
        rope.apply(&mut q_rot, heads * r);
        rope.apply(&mut k_rot, r);
        drop(t);
        let _t = profile::time(Op::Attention);
        let mut key = Vec::with_capacity(lora + r);
        for (i, row) in batch.rows().iter().enumerate() {
            key.clear();
            key.extend_from_slice(&latent[i * lora..(i + 1) * lora]);
            key.extend_from_slice(&k_rot[i * r..(i + 1) * r]);
            let slot = kv.slot(row.seq, row.pos)?;
            kv.write(layer, slot, &key, &latent[i * lora..(i + 1) * lora]);
        }
        // Each head's query in latent space, then its rotary part: `[W_k,h^T q_nope, q_rot]`.
        let dk = lora + r;
        let mut query = vec![0.0f32; n * heads * dk];
        let mut absorbed = vec![0.0f32; n * lora];
        for hd in 0..heads {
            let w = Weight::from_f32(&self.k_absorb[hd * lora * nope..(hd + 1) * lora * nope], lora, nope);
            matmul(&q_nope[hd * n * nope..(hd + 1) * n * nope], &w, &mut absorbed);
            for t in 0..n {
                let at = (t * heads + hd) * dk;
                query[at..at + lora].copy_from_slice(&absorbed[t * lora..(t + 1) * lora]);
                query[at + lora..at + dk].copy_from_slice(&q_rot[(t * heads + hd) * r..][..r]);
            }
        }
        let kv = &*kv;
        let out_latent = attend(&query, (heads, heads), (dk, lora), m.softmax_scale, (kv, layer), batch)?;
        // Each head's value: its rows of `kv_b` applied to its attention-weighted latent.
        let mut out = vec![0.0f32; n * heads * v];
        let (mut lat, mut val) = (vec![0.0f32; n * lora], vec![0.0f32; n * v]);
        let wb = self.kv_b.weight(index);
        let row_bytes = wb.row_bytes();
        for hd in 0..heads {
            for t in 0..n {
                lat[t * lora..(t + 1) * lora].copy_from_slice(&out_latent[(t * heads + hd) * lora..][..lora]);
            }
            let first = hd * (nope + v) + nope;
            let w = Weight {
                dtype: wb.dtype,
                data: &wb.data[first * row_bytes..(first + v) * row_bytes],
                rows: v,
                cols: lora,
            };
            matmul(&lat, &w, &mut val);
            for t in 0..n {
                out[(t * heads + hd) * v..][..v].copy_from_slice(&val[t * v..(t + 1) * v]);
            }
        }
        drop(_t);
        let _t = profile::time(Op::OProj);
        Ok(linear(index, backend, &out, &self.o_proj, self.o_bias.as_deref()))
    }
}

/// Reorders each `r`-wide chunk of `x` from interleaved pairs `(x0, x1), (x2, x3), ...` to
/// `x0, x2, ..., x1, x3, ...`: DeepSeek's rotary layout into the rotate-half one.
fn deinterleave(x: &mut [f32], r: usize) {
    let mut tmp = vec![0.0f32; r];
    for chunk in x.chunks_mut(r) {
        for i in 0..r / 2 {
            tmp[i] = chunk[2 * i];
            tmp[r / 2 + i] = chunk[2 * i + 1];
        }
        chunk.copy_from_slice(&tmp);
    }
}
