//! Feed-forward blocks: the dense SwiGLU MLP and the sparse mixture-of-experts block (router
//! softmax -> top-k -> optional renormalisation -> weighted sum of experts, plus Qwen2-MoE's
//! sigmoid-gated shared expert). Expert weights come from an [`Experts`] source.

use stevedore_kernels::{matmul, silu_mul, softmax, Weight};

use crate::experts::{ExpertWeights, Experts, LayerRouting};
use crate::tensor::{linear, Mat};
use crate::{Error, ModelConfig, WeightIndex};

/// `down(silu(gate(x)) * up(x))`.
pub struct Mlp {
    gate_proj: Mat,
    up_proj: Mat,
    down_proj: Mat,
}

fn swiglu(x: &[f32], gate: Weight, up: Weight, down: Weight) -> Vec<f32> {
    let n = x.len() / gate.cols;
    let mut g = vec![0.0; n * gate.rows];
    let mut u = vec![0.0; n * up.rows];
    matmul(x, &gate, &mut g);
    matmul(x, &up, &mut u);
    silu_mul(&mut g, &u);
    let mut out = vec![0.0; n * down.rows];
    matmul(&g, &down, &mut out);
    out
}

impl Mlp {
    pub fn load(index: &WeightIndex, prefix: &str, hidden: usize, inter: usize) -> Result<Self, Error> {
        Ok(Mlp {
            gate_proj: Mat::load(index, &format!("{prefix}.gate_proj.weight"), inter, hidden)?,
            up_proj: Mat::load(index, &format!("{prefix}.up_proj.weight"), inter, hidden)?,
            down_proj: Mat::load(index, &format!("{prefix}.down_proj.weight"), hidden, inter)?,
        })
    }

    pub fn forward(&self, index: &WeightIndex, x: &[f32]) -> Vec<f32> {
        swiglu(x, self.gate_proj.weight(index), self.up_proj.weight(index), self.down_proj.weight(index))
    }
}

/// Qwen2-MoE's shared expert: `sigmoid(shared_expert_gate(x)) * shared_expert(x)`.
pub struct SharedExpert {
    mlp: Mlp,
    gate: Mat,
}

pub struct SparseMoe {
    layer: usize,
    router: Mat,
    top_k: usize,
    norm_topk_prob: bool,
    shared: Option<SharedExpert>,
}

/// The router's choice for a batch of tokens.
pub struct Routing {
    /// `n * top_k` expert ids, token-major, best first.
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
    /// Distinct experts used, ascending.
    pub experts: Vec<u32>,
}

impl SparseMoe {
    /// `router` is the gate tensor's name; `shared` the shared expert's prefix, if the layer has one.
    pub fn load(
        index: &WeightIndex,
        cfg: &ModelConfig,
        layer: usize,
        router: &str,
        shared: Option<&str>,
    ) -> Result<Self, Error> {
        let h = cfg.hidden_size;
        let shared = match shared {
            Some(p) => Some(SharedExpert {
                mlp: Mlp::load(index, &format!("{p}.shared_expert"), h, cfg.shared_expert_intermediate_size)?,
                gate: Mat::load(index, &format!("{p}.shared_expert_gate.weight"), 1, h)?,
            }),
            None => None,
        };
        Ok(SparseMoe {
            layer,
            router: Mat::load(index, router, cfg.num_experts, h)?,
            top_k: cfg.num_experts_per_tok,
            norm_topk_prob: cfg.norm_topk_prob,
            shared,
        })
    }

    /// Softmax over all experts, then the top-k per token (ties to the lower index).
    pub fn route(&self, index: &WeightIndex, x: &[f32]) -> Routing {
        let mut logits = linear(index, x, &self.router, None);
        let e = self.router.rows;
        let (mut ids, mut weights) = (Vec::new(), Vec::new());
        let mut used = vec![false; e];
        for probs in logits.chunks_mut(e) {
            softmax(probs);
            let mut order: Vec<u32> = (0..e as u32).collect();
            order.sort_by(|&a, &b| probs[b as usize].total_cmp(&probs[a as usize]).then(a.cmp(&b)));
            let top = &order[..self.top_k];
            let sum: f32 = top.iter().map(|&i| probs[i as usize]).sum();
            for &i in top {
                used[i as usize] = true;
                ids.push(i);
                weights.push(if self.norm_topk_prob { probs[i as usize] / sum } else { probs[i as usize] });
            }
        }
        let experts = (0..e as u32).filter(|&i| used[i as usize]).collect();
        Routing { ids, weights, experts }
    }

    pub fn forward(
        &self,
        index: &WeightIndex,
        x: &[f32],
        tokens: &[u32],
        first_pos: usize,
        experts: &dyn Experts,
    ) -> Result<Vec<f32>, Error> {
        let h = self.router.cols;
        let n = x.len() / h;
        let r = self.route(index, x);
        let routing = LayerRouting {
            layer: self.layer,
            first_pos,
            tokens,
            topk_ids: &r.ids,
            topk_weights: &r.weights,
            top_k: self.top_k,
            experts: &r.experts,
        };
        let mut out = vec![0.0f32; n * h];
        let mut rows = Vec::new();
        let mut gathered = Vec::new();
        experts
            .for_each(&routing, &mut |e, w: ExpertWeights| {
                // Tokens routed to `e` (with their gate weight), gathered into one batch.
                rows.clear();
                gathered.clear();
                for (slot, &id) in r.ids.iter().enumerate() {
                    if id == e {
                        let t = slot / self.top_k;
                        rows.push((t, r.weights[slot]));
                        gathered.extend_from_slice(&x[t * h..(t + 1) * h]);
                    }
                }
                let y = swiglu(&gathered, w.gate, w.up, w.down);
                for ((t, g), yrow) in rows.iter().zip(y.chunks(h)) {
                    for (o, v) in out[t * h..(t + 1) * h].iter_mut().zip(yrow) {
                        *o += g * v;
                    }
                }
                Ok(())
            })
            .map_err(Error::Experts)?;
        if let Some(s) = &self.shared {
            let y = s.mlp.forward(index, x);
            let g = linear(index, x, &s.gate, None);
            for (t, (orow, yrow)) in out.chunks_mut(h).zip(y.chunks(h)).enumerate() {
                let gate = 1.0 / (1.0 + (-g[t]).exp());
                for (o, v) in orow.iter_mut().zip(yrow) {
                    *o += gate * v;
                }
            }
        }
        Ok(out)
    }
}
