//! Feed-forward blocks: the dense SwiGLU MLP and the sparse mixture-of-experts block (the
//! router's choice -> weighted sum of experts, plus a shared expert: Qwen2-MoE's sigmoid-gated
//! one, GLM's plain one). Routers: softmax -> top-k -> optional renormalisation (Mixtral, Qwen,
//! OLMoE), or DeepSeek-V3's sigmoid with correction bias and group-limited top-k (GLM-4.5).
//! Expert weights come from an [`ExpertSource`].

use std::sync::Arc;

use rayon::prelude::*;
use stevedore_kernels::{softmax, Backend, SwiGlu};

use crate::experts::{
    ExpertFailure, ExpertPlan, ExpertSource, ExpertUse, ExpertsError, GateEstimate, Served,
};
use crate::profile::{self, Op};
use crate::tensor::{linear, load_vec, Mat};
use crate::{Error, LayerId, ModelConfig, MoeIndex, RouterKind, Row, WeightIndex};

/// `down(silu(gate(x)) * up(x))`.
pub struct Mlp {
    gate_proj: Mat,
    up_proj: Mat,
    down_proj: Mat,
}

impl Mlp {
    pub fn load(index: &WeightIndex, prefix: &str, hidden: usize, inter: usize) -> Result<Self, Error> {
        Ok(Mlp {
            gate_proj: Mat::load(index, &format!("{prefix}.gate_proj.weight"), inter, hidden)?,
            up_proj: Mat::load(index, &format!("{prefix}.up_proj.weight"), inter, hidden)?,
            down_proj: Mat::load(index, &format!("{prefix}.down_proj.weight"), hidden, inter)?,
        })
    }

    pub fn forward(&self, index: &WeightIndex, backend: &dyn Backend, x: &[f32]) -> Vec<f32> {
        let w = SwiGlu {
            gate: self.gate_proj.weight(index),
            up: self.up_proj.weight(index),
            down: self.down_proj.weight(index),
        };
        let mut out = vec![0.0; x.len() / w.gate.cols * w.down.rows];
        backend.swiglu(x, &w, &mut out);
        out
    }
}

/// A shared expert every token uses: Qwen2-MoE's `sigmoid(shared_expert_gate(x)) *
/// shared_expert(x)`, or GLM's ungated `shared_experts(x)`.
pub struct SharedExpert {
    mlp: Mlp,
    gate: Option<Mat>,
}

/// The router's choice rule (see [`crate::RouterKind`]), with what it loaded.
enum Router {
    Softmax,
    SigmoidGrouped { correction: Vec<f32>, n_group: usize, topk_group: usize, scaling: f32 },
    SparseMixer { jitter_eps: f32 },
    SoftmaxGroupLimited { n_group: usize, topk_group: usize, scaling: f32 },
}

pub struct SparseMoe {
    layer: LayerId,
    moe: MoeIndex,
    router: Mat,
    kind: Router,
    top_k: usize,
    norm_topk_prob: bool,
    shared: Option<SharedExpert>,
}

/// The router's choice for a batch of rows: `n * top_k` expert ids, row-major, best first, and
/// their gate weights.
struct Routing {
    ids: Vec<u32>,
    weights: Vec<f32>,
}

/// The experts of a routing and the rows routed to each, grouped once per layer (a counting
/// sort over the routed rows' choices: O(n * top_k + experts)).
struct Assignment {
    experts: Vec<ExpertUse>,
    rows: Vec<u32>,
    weights: Vec<f32>,
}

impl Assignment {
    fn new(routing: &Routing, top_k: usize, num_experts: usize, routed: &[bool]) -> Self {
        let mut counts = vec![0usize; num_experts];
        let choices =
            |r: usize| routing.ids[r * top_k..(r + 1) * top_k].iter().zip(&routing.weights[r * top_k..]);
        for r in (0..routed.len()).filter(|&r| routed[r]) {
            for (&e, _) in choices(r) {
                counts[e as usize] += 1;
            }
        }
        let mut experts = Vec::new();
        let mut start = vec![0usize; num_experts];
        let mut total = 0;
        for (e, &c) in counts.iter().enumerate() {
            start[e] = total;
            if c > 0 {
                experts.push(ExpertUse { expert: e as u32, assigned: total..total + c });
            }
            total += c;
        }
        let (mut rows, mut weights) = (vec![0u32; total], vec![0.0f32; total]);
        for r in (0..routed.len()).filter(|&r| routed[r]) {
            for (&e, &w) in choices(r) {
                let at = &mut start[e as usize];
                rows[*at] = r as u32;
                weights[*at] = w;
                *at += 1;
            }
        }
        Assignment { experts, rows, weights }
    }
}

/// At most this many rows per expert in a layer (a decode step) and the layer's ready experts
/// run side by side rather than one after another on all cores: one matmul tile's tokens.
const FEW_ROWS: usize = 4;

/// Rows of a batch whose expert could not be delivered, with the error.
pub(crate) type FailedRows = Vec<(usize, ExpertsError)>;

impl SparseMoe {
    /// `router` is the gate tensor's name; `shared` the shared expert's name, if the layer has
    /// one (its gate, for a gated one, is `{shared}_gate.weight`).
    pub fn load(
        index: &WeightIndex,
        cfg: &ModelConfig,
        (layer, moe): (LayerId, MoeIndex),
        router: &str,
        shared: Option<&str>,
    ) -> Result<Self, Error> {
        let h = cfg.hidden_size;
        let shared = match shared {
            Some(p) => Some(SharedExpert {
                mlp: Mlp::load(index, p, h, cfg.shared_expert_intermediate_size)?,
                gate: match cfg.shared_expert_gated {
                    true => Some(Mat::load(index, &format!("{p}_gate.weight"), 1, h)?),
                    false => None,
                },
            }),
            None => None,
        };
        let kind = match cfg.router {
            RouterKind::Softmax => Router::Softmax,
            RouterKind::SparseMixer { jitter_eps } => Router::SparseMixer { jitter_eps },
            RouterKind::SoftmaxGroupLimited { n_group, topk_group, routed_scaling_factor } => {
                Router::SoftmaxGroupLimited { n_group, topk_group, scaling: routed_scaling_factor }
            }
            RouterKind::SigmoidGrouped { n_group, topk_group, routed_scaling_factor } => {
                let bias =
                    router.strip_suffix("weight").unwrap_or(router).to_owned() + "e_score_correction_bias";
                Router::SigmoidGrouped {
                    correction: load_vec(index, &bias, cfg.num_experts)?,
                    n_group,
                    topk_group,
                    scaling: routed_scaling_factor,
                }
            }
        };
        Ok(SparseMoe {
            layer,
            moe,
            kind,
            router: Mat::load(index, router, cfg.num_experts, h)?,
            top_k: cfg.num_experts_per_tok,
            norm_topk_prob: cfg.norm_topk_prob,
            shared,
        })
    }

    /// This layer's router applied to `x` (rows of the residual stream, normalised here with
    /// `norm`, this layer's pre-FFN norm) from `distance` MoE layers before it: per row the
    /// best `keep` experts and their softmax probabilities.
    pub(crate) fn estimate(
        &self,
        index: &WeightIndex,
        backend: &dyn Backend,
        (x, norm): (&[f32], &crate::tensor::Norm),
        distance: usize,
        keep: usize,
    ) -> GateEstimate {
        let mut hs = x.to_vec();
        norm.apply(&mut hs);
        let keep = keep.clamp(1, self.router.rows);
        let (mut experts, mut probs) = (Vec::new(), Vec::new());
        let mut chosen = Vec::with_capacity(keep);
        self.ranked(index, backend, &hs, None, |row, _, order| {
            // What the router would choose from this state first (a grouped router's choice
            // is not simply its best scores), then the best of the rest.
            chosen.clear();
            self.grouped_top_k(row, order, &mut chosen);
            let rest: Vec<u32> = order
                .iter()
                .copied()
                .filter(|e| !chosen.contains(e))
                .take(keep.saturating_sub(chosen.len()))
                .collect();
            chosen.extend(rest);
            chosen.truncate(keep);
            experts.extend_from_slice(&chosen);
            probs.extend(chosen.iter().map(|&i| row[i as usize]));
        });
        GateEstimate { moe: self.moe, distance, per_row: keep, experts, probs }
    }

    /// The router's scores for each row of `x` (softmax over all experts, or the sigmoids),
    /// handed to `each` with the scores it chooses by and the experts ranked best first by
    /// those (the scores, or the sigmoids plus the correction bias; ties to the lower index).
    /// With `bias` (added to the logits: cache-conditional routing), the scores chosen by are
    /// the biased logits' and the first ones stay the router's own.
    fn ranked(
        &self,
        index: &WeightIndex,
        backend: &dyn Backend,
        x: &[f32],
        bias: Option<&[f32]>,
        mut each: impl FnMut(&[f32], &[f32], &[u32]),
    ) {
        let mut logits = linear(index, backend, x, &self.router, None);
        let e = self.router.rows;
        let mut order: Vec<u32> = Vec::with_capacity(e);
        let mut choice = vec![0.0f32; e];
        let mut biased = vec![0.0f32; if bias.is_some() { e } else { 0 }];
        let score = |v: &mut [f32]| match &self.kind {
            Router::Softmax | Router::SparseMixer { .. } | Router::SoftmaxGroupLimited { .. } => softmax(v),
            Router::SigmoidGrouped { .. } => v.iter_mut().for_each(|p| *p = 1.0 / (1.0 + (-*p).exp())),
        };
        for probs in logits.chunks_mut(e) {
            if let Some(b) = bias {
                for ((o, l), b) in biased.iter_mut().zip(probs.iter()).zip(b) {
                    *o = l + b;
                }
                score(&mut biased);
            }
            score(probs);
            let chosen_by: &[f32] = if bias.is_some() { &biased } else { probs };
            match &self.kind {
                Router::SigmoidGrouped { correction, .. } => {
                    for ((c, p), b) in choice.iter_mut().zip(chosen_by).zip(correction) {
                        *c = p + b;
                    }
                }
                _ => choice.copy_from_slice(chosen_by),
            }
            order.clear();
            order.extend(0..e as u32);
            order.sort_by(|&a, &b| choice[b as usize].total_cmp(&choice[a as usize]).then(a.cmp(&b)));
            each(probs, chosen_by, &order);
        }
    }

    /// DeepSeek-V3's group-limited choice, as transformers computes it: each group scores the
    /// sum of its best two biased scores; the `topk_group` best groups stay and the others'
    /// biased scores become 0; the top-k of what is left. `ranked` is every expert, best
    /// biased score first; a softmax router takes its top-k.
    fn grouped_top_k(&self, probs: &[f32], ranked: &[u32], out: &mut Vec<u32>) {
        // Each group's score over what the router chooses by, and the groups to keep.
        let (choose, n_group, topk_group): (&dyn Fn(usize) -> f32, usize, usize) = match &self.kind {
            Router::SigmoidGrouped { correction, n_group, topk_group, .. } => {
                (&|e: usize| probs[e] + correction[e], *n_group, *topk_group)
            }
            Router::SoftmaxGroupLimited { n_group, topk_group, .. } if *topk_group < *n_group => {
                (&|e: usize| probs[e], *n_group, *topk_group)
            }
            _ => {
                out.extend_from_slice(&ranked[..self.top_k]);
                return;
            }
        };
        let per = probs.len() / n_group;
        let two_best = matches!(self.kind, Router::SigmoidGrouped { .. });
        let mut group_score: Vec<(f32, usize)> = (0..n_group)
            .map(|g| {
                let mut best = [f32::NEG_INFINITY; 2];
                for e in g * per..(g + 1) * per {
                    let s = choose(e);
                    if s > best[0] {
                        best = [s, best[0]];
                    } else if s > best[1] {
                        best[1] = s;
                    }
                }
                // DeepSeek-V3 scores a group by its best two, V2 by its best.
                (if two_best { best[0] + best[1] } else { best[0] }, g)
            })
            .collect();
        group_score.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let kept: Vec<usize> = group_score[..topk_group].iter().map(|&(_, g)| g).collect();
        let masked = |e: usize| if kept.contains(&(e / per)) { choose(e) } else { 0.0 };
        let mut order: Vec<u32> = (0..probs.len() as u32).collect();
        order.sort_by(|&a, &b| masked(b as usize).total_cmp(&masked(a as usize)).then(a.cmp(&b)));
        out.extend_from_slice(&order[..self.top_k]);
    }

    /// Phi-3.5-MoE's sparsemixer at inference, as transformers computes it: the best expert;
    /// its weight is its softmax among the experts whose logit is within `2 * jitter_eps` of the
    /// best, relative to `max(|logit|, best)`; then the same over the others for the second.
    /// With `bias`, the logits are biased before both the choice and the weights (the
    /// sparsemixer's weights are defined by its choice).
    fn sparse_mixer(
        &self,
        index: &WeightIndex,
        backend: &dyn Backend,
        (x, bias): (&[f32], Option<&[f32]>),
        jitter_eps: f32,
    ) -> Routing {
        let mut logits = linear(index, backend, x, &self.router, None);
        if let Some(b) = bias {
            for row in logits.chunks_mut(self.router.rows) {
                row.iter_mut().zip(b).for_each(|(l, b)| *l += b);
            }
        }
        let e = self.router.rows;
        let (mut ids, mut weights) = (Vec::new(), Vec::new());
        for scores in logits.chunks(e) {
            let mut taken: Option<usize> = None;
            for _ in 0..2 {
                let live = |i: usize| taken != Some(i);
                let (best, max) = (0..e)
                    .filter(|&i| live(i))
                    .map(|i| (i, scores[i]))
                    .fold((0, f32::NEG_INFINITY), |a, b| if b.1 > a.1 { b } else { a });
                let kept =
                    |i: usize| live(i) && (max - scores[i]) / scores[i].abs().max(max) <= 2.0 * jitter_eps;
                let denom: f32 = (0..e).filter(|&i| kept(i)).map(|i| (scores[i] - max).exp()).sum();
                ids.push(best as u32);
                weights.push(1.0 / denom);
                taken = Some(best);
            }
        }
        Routing { ids, weights }
    }

    /// Softmax over all experts, then the top-k per row (ties to the lower index). With
    /// `bias`, the choice is made on biased logits and the gate weights are the unbiased
    /// router's for the experts chosen.
    fn route(&self, index: &WeightIndex, backend: &dyn Backend, x: &[f32], bias: Option<&[f32]>) -> Routing {
        let (mut ids, mut weights) = (Vec::new(), Vec::new());
        if let Router::SparseMixer { jitter_eps } = self.kind {
            return self.sparse_mixer(index, backend, (x, bias), jitter_eps);
        }
        let (scaling, eps) = match self.kind {
            Router::Softmax | Router::SparseMixer { .. } => (1.0, 0.0),
            Router::SoftmaxGroupLimited { scaling, .. } => (scaling, 0.0),
            // transformers adds 1e-20 to the sum before renormalising sigmoid weights.
            Router::SigmoidGrouped { scaling, .. } => (scaling, 1e-20),
        };
        let mut top = Vec::with_capacity(self.top_k);
        self.ranked(index, backend, x, bias, |probs, chosen_by, order| {
            top.clear();
            self.grouped_top_k(chosen_by, order, &mut top);
            let sum: f32 = top.iter().map(|&i| probs[i as usize]).sum::<f32>() + eps;
            for &i in &top {
                ids.push(i);
                let w = if self.norm_topk_prob { probs[i as usize] / sum } else { probs[i as usize] };
                weights.push(w * scaling);
            }
        });
        Routing { ids, weights }
    }

    /// The block's output for every row of `x`. Rows with `routed[r] == false` get no routed
    /// experts (their sequence already failed). Experts come from `source` in whatever order it
    /// delivers them; their outputs are added in ascending expert order, so the sum is the same
    /// whatever arrives first. Rows routed to an expert the source could not deliver are
    /// returned with the error; their output is incomplete.
    pub fn forward(
        &self,
        index: &WeightIndex,
        backend: &dyn Backend,
        x: &[f32],
        rows: &[Row],
        routed: &[bool],
        (source, ahead): (&dyn ExpertSource, &[GateEstimate]),
    ) -> (Vec<f32>, FailedRows) {
        let h = self.router.cols;
        let n = rows.len();
        let t = profile::time(Op::Router);
        let bias = source.routing_bias(self.layer);
        if let Some(b) = &bias {
            assert_eq!(b.len(), self.router.rows, "{}: routing bias for {} experts", self.layer, b.len());
        }
        let routing = self.route(index, backend, x, bias.as_deref());
        let a = Assignment::new(&routing, self.top_k, self.router.rows, routed);
        drop(t);
        let plan = ExpertPlan {
            layer: self.layer,
            moe: self.moe,
            top_k: self.top_k,
            rows,
            topk_ids: &routing.ids,
            topk_weights: &routing.weights,
            routed,
            experts: &a.experts,
            assigned_rows: &a.rows,
            assigned_weights: &a.weights,
            ahead,
        };
        // ys[j] is the output of assignment j (expert of plan entry i, row rows_of(i)[..]).
        let mut ys = vec![0.0f32; a.rows.len() * h];
        let mut delivered = vec![false; a.experts.len()];
        let mut failures: Vec<(usize, ExpertsError)> = Vec::new();
        // A decode's experts have a row or a few each: too little to split one expert's matrix
        // products across the cores without the fork-join costing more than it gains, so
        // experts that are ready together run side by side, one per core. Experts with many
        // rows (prefill) each use every core. The results are the same either way.
        let threads = rayon::current_num_threads();
        let few_rows = a.experts.iter().all(|e| e.assigned.len() <= FEW_ROWS);
        let max = if few_rows { threads.max(a.experts.len()) } else { 1 };
        let run = |i: usize, w: &SwiGlu, out: &mut [f32]| {
            let mut gathered = Vec::with_capacity(plan.rows_of(i).len() * h);
            for &r in plan.rows_of(i) {
                gathered.extend_from_slice(&x[r as usize * h..(r as usize + 1) * h]);
            }
            backend.swiglu(&gathered, w, out);
        };
        // No routed rows (every sequence of the batch already failed): nothing to ask for.
        let stream = if a.experts.is_empty() { None } else { Some(source.stream(&plan)) };
        match stream {
            None => {}
            Some(Err(error)) => failures.extend((0..a.experts.len()).map(|i| (i, error.clone()))),
            Some(Ok(mut stream)) => loop {
                let wait = profile::time(Op::ExpertWait);
                let Some(item) = stream.next_ready(max) else { break };
                drop(wait);
                let _t = profile::time(Op::Experts);
                let ready = match item {
                    Ok(ready) => ready,
                    Err(ExpertFailure { expert: Some(i), error }) if i < a.experts.len() => {
                        failures.push((i, error));
                        continue;
                    }
                    Err(ExpertFailure { error, .. }) => {
                        failures.extend((0..a.experts.len()).map(|i| (i, error.clone())));
                        break;
                    }
                };
                // A source delivering an entry twice breaks its contract; the first delivery
                // stands.
                // A skipped expert adds nothing: its rows' outputs stay zero.
                let mut fresh: Vec<(usize, SwiGlu)> = Vec::with_capacity(ready.len());
                for (i, served) in ready {
                    let new = i < a.experts.len() && !delivered[i] && !fresh.iter().any(|(j, _)| *j == i);
                    debug_assert!(new, "expert source delivered plan entry {i} twice");
                    match served {
                        Served::Weights(w) if new => fresh.push((i, w)),
                        Served::Skipped if new => delivered[i] = true,
                        _ => {}
                    }
                }
                if let [(i, w)] = fresh[..] {
                    let range = a.experts[i].assigned.clone();
                    run(i, &w, &mut ys[range.start * h..range.end * h]);
                } else {
                    let outs: Vec<Vec<f32>> = fresh
                        .par_iter()
                        .map(|(i, w)| {
                            let mut out = vec![0.0f32; a.experts[*i].assigned.len() * h];
                            run(*i, w, &mut out);
                            out
                        })
                        .collect();
                    for ((i, _), out) in fresh.iter().zip(outs) {
                        let range = a.experts[*i].assigned.clone();
                        ys[range.start * h..range.end * h].copy_from_slice(&out);
                    }
                }
                for (i, _) in &fresh {
                    delivered[*i] = true;
                }
            },
        }
        // Every expert neither delivered nor failed (a stream that ended early) fails too.
        let mut settled = delivered.clone();
        for &(i, _) in &failures {
            settled[i] = true;
        }
        if let Some(first) = settled.iter().position(|s| !s) {
            let msg =
                format!("the expert source ended without delivering expert {}", a.experts[first].expert);
            let error: ExpertsError = Arc::new(Error::Input(msg));
            failures.extend((0..settled.len()).filter(|&i| !settled[i]).map(|i| (i, error.clone())));
        }
        let failed_rows: FailedRows = failures
            .into_iter()
            .filter(|&(i, _)| i < a.experts.len())
            .flat_map(|(i, error)| {
                plan.rows_of(i).iter().map(move |&r| (r as usize, error.clone())).collect::<Vec<_>>()
            })
            .collect();

        // Sum in ascending expert order: out[r] += gate * y, expert by expert.
        let t = profile::time(Op::Combine);
        let mut out = vec![0.0f32; n * h];
        for (i, e) in a.experts.iter().enumerate().filter(|&(i, _)| delivered[i]) {
            for (j, (&r, &g)) in plan.rows_of(i).iter().zip(plan.weights_of(i)).enumerate() {
                let y = &ys[(e.assigned.start + j) * h..][..h];
                for (o, v) in out[r as usize * h..(r as usize + 1) * h].iter_mut().zip(y) {
                    *o += g * v;
                }
            }
        }
        drop(t);
        if let Some(s) = &self.shared {
            let _t = profile::time(Op::DenseFfn);
            let y = s.mlp.forward(index, backend, x);
            let g = s.gate.as_ref().map(|gate| linear(index, backend, x, gate, None));
            for (t, (orow, yrow)) in out.chunks_mut(h).zip(y.chunks(h)).enumerate() {
                let gate = g.as_ref().map_or(1.0, |g| 1.0 / (1.0 + (-g[t]).exp()));
                for (o, v) in orow.iter_mut().zip(yrow) {
                    *o += gate * v;
                }
            }
        }
        (out, failed_rows)
    }
}
