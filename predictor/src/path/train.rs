//! Offline training of a [`PathModel`] by AdaGrad on the softmax cross-entropy of each target
//! layer's chosen experts, over every (origin, target) pair a live predictor would be asked for.

use std::collections::HashMap;

use super::{Evidence, ModelError, PathModel, Seen};
use crate::rng::SplitMix64;
use crate::trace::sequence_neighbours;
use crate::{RoutingShape, TokenRouting};

/// Training parameters. The defaults train on a few thousand tokens in about a second.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// Longest look-ahead, in layers, the model is trained for (and the number of the next
    /// token's layers it gets weights for).
    pub max_depth: usize,
    /// How many of the latest observed layers feed a prediction.
    pub context_layers: usize,
    /// Passes over the training tokens.
    pub epochs: usize,
    /// AdaGrad step size.
    pub learning_rate: f32,
    /// L2 penalty on the weights a step touches.
    pub l2: f32,
    /// Token ids seen fewer times than this get no row of their own: a row fitted to one
    /// occurrence memorises it rather than generalising.
    pub min_token_count: usize,
    /// Seeds the order tokens are visited in; the same seed and data give the same model.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            max_depth: 4,
            context_layers: 3,
            epochs: 6,
            learning_rate: 0.03,
            l2: 1e-3,
            min_token_count: 2,
            seed: 0,
        }
    }
}

impl TrainConfig {
    fn validate(&self, shape: RoutingShape) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::BadConfig(m));
        if shape.moe_layers == 0 || shape.num_experts == 0 || shape.top_k == 0 {
            return bad(format!("shape {shape:?} has a zero dimension"));
        }
        if self.max_depth == 0 || self.context_layers == 0 || self.epochs == 0 {
            return bad("max_depth, context_layers and epochs must be at least 1".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(format!("learning_rate must be positive, got {}", self.learning_rate));
        }
        if !(self.l2.is_finite() && self.l2 >= 0.0) {
            return bad(format!("l2 must be zero or positive, got {}", self.l2));
        }
        Ok(())
    }
}

/// One token as training sees it: its row and the experts chosen per layer (`None` where the
/// trace did not record the layer).
struct Example {
    row: Option<usize>,
    layers: Vec<Option<Vec<u32>>>,
}

/// Trains a path model on `tokens` (in trace order, sequences possibly interleaved: a token's
/// successor in its own sequence, `TokenRouting::seq`, is the "next token" the model learns to
/// predict the first layers of). Deterministic for a given `config.seed`.
pub fn train_path_model(
    shape: RoutingShape,
    tokens: &[TokenRouting],
    config: &TrainConfig,
) -> Result<PathModel, ModelError> {
    config.validate(shape)?;
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for t in tokens {
        if let Some(id) = t.token_id {
            *counts.entry(id).or_default() += 1;
        }
    }
    let mut token_ids: Vec<u32> =
        counts.into_iter().filter(|&(_, c)| c >= config.min_token_count.max(1)).map(|(id, _)| id).collect();
    token_ids.sort_unstable();
    let mut model = PathModel::zeros(shape, config.max_depth, config.context_layers, token_ids);

    let examples: Vec<Example> = tokens
        .iter()
        .map(|t| Example {
            row: model.token_row(t.token_id),
            layers: (0..shape.moe_layers)
                .map(|l| {
                    let c = t.layers.get(l)?.as_ref()?;
                    let mut v: Vec<u32> =
                        c.experts.iter().copied().filter(|&x| (x as usize) < shape.num_experts).collect();
                    v.sort_unstable();
                    v.dedup();
                    (!v.is_empty()).then_some(v)
                })
                .collect(),
        })
        .collect();
    if examples.iter().all(|x| x.layers.iter().all(Option::is_none)) {
        return Err(ModelError::NoTrainingData);
    }

    let neighbours = sequence_neighbours(tokens);
    let mut trainer = Trainer::new(&model, config);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    let mut rng = SplitMix64::new(config.seed);
    for _ in 0..config.epochs {
        rng.shuffle(&mut order);
        for &i in &order {
            let (prev, next) = neighbours[i];
            trainer.step(&mut model, prev.map(|p| &examples[p]), &examples[i], next.map(|n| &examples[n]));
        }
    }
    Ok(model)
}

/// AdaGrad state (sums of squared gradients, parallel to the model's arrays) and scratch space.
struct Trainer {
    lr: f32,
    l2: f32,
    g_bias: Vec<f32>,
    g_token: Vec<f32>,
    g_layer: Vec<f32>,
    g_recent: Vec<f32>,
    logits: Vec<f32>,
    /// Gradient summed over origins: for the bias, the token row, and each source layer.
    grad_bias: Vec<f32>,
    grad_token: Vec<f32>,
    grad_source: Vec<Vec<f32>>,
    grad_recent: Vec<f32>,
}

impl Trainer {
    fn new(model: &PathModel, config: &TrainConfig) -> Self {
        let e = model.shape.num_experts;
        Trainer {
            lr: config.learning_rate,
            l2: config.l2,
            g_bias: vec![0.0; model.bias.len()],
            g_token: vec![0.0; model.token_w.len()],
            g_layer: vec![0.0; model.layer_w.len()],
            g_recent: vec![0.0; model.recent_w.len()],
            logits: vec![0.0; e],
            grad_bias: vec![0.0; e],
            grad_token: vec![0.0; e],
            grad_source: vec![vec![0.0; e]; model.shape.moe_layers],
            grad_recent: vec![0.0; e],
        }
    }

    /// One mini-batch: every target position of `cur` (and of `next`, for the wrapped
    /// positions) from every origin within `max_depth` of it. `prev` is the token before in the
    /// same sequence.
    fn step(&mut self, model: &mut PathModel, prev: Option<&Example>, cur: &Example, next: Option<&Example>) {
        let l = model.shape.moe_layers;
        let seen: Vec<Vec<u32>> = cur.layers.iter().map(|x| x.clone().unwrap_or_default()).collect();
        let prev_seen: Vec<&[u32]> =
            (0..l).map(|j| prev.and_then(|p| p.layers[j].as_deref()).unwrap_or_default()).collect();
        for position in 0..model.positions() {
            let target = if position < l {
                cur.layers[position].as_ref()
            } else {
                next.and_then(|n| n.layers[position - l].as_ref())
            };
            let Some(target) = target else { continue };
            // Origins: token start (-1, current-token targets only), then observed layers.
            let first = position as isize - model.max_depth as isize;
            let first = if position < l { first.max(-1) } else { first.max(0) };
            let last = (position as isize - 1).min(l as isize - 1);
            self.grad_bias.fill(0.0);
            self.grad_token.fill(0.0);
            self.grad_recent.fill(0.0);
            for g in &mut self.grad_source {
                g.fill(0.0);
            }
            let mut recent_used: &[u32] = &[];
            let mut any = false;
            for o in first..=last {
                let origin = (o >= 0).then_some(o as usize);
                if origin.is_some_and(|o| cur.layers[o].is_none()) {
                    continue; // live predictors only predict right after an observed layer
                }
                let recent: &[u32] = match model.recent_layer(position, origin) {
                    Some(m) => &seen[m],
                    None => prev_seen.get(position).copied().unwrap_or_default(),
                };
                let row = if position < l { cur.row } else { None };
                let ev = Evidence { origin, row, seen: Seen::Layers(&seen), recent };
                model.logits(position, &ev, &mut self.logits);
                softmax_minus_target(&mut self.logits, target);
                let g = &self.logits;
                add_to(&mut self.grad_bias, g);
                if row.is_some() {
                    add_to(&mut self.grad_token, g);
                }
                if !recent.is_empty() {
                    add_to(&mut self.grad_recent, g);
                    recent_used = recent;
                }
                for j in model.window(origin) {
                    if !seen[j].is_empty() {
                        add_to(&mut self.grad_source[j], g);
                    }
                }
                any = true;
            }
            if !any {
                continue;
            }
            let (lr, l2) = (self.lr, self.l2);
            let r = model.bias_row(position);
            adagrad(&mut model.bias[r.clone()], &mut self.g_bias[r], &self.grad_bias, lr, 0.0);
            if let (Some(row), true) = (cur.row, position < l) {
                let r = model.token_slice(row, position);
                adagrad(&mut model.token_w[r.clone()], &mut self.g_token[r], &self.grad_token, lr, l2);
            }
            let r = model.bias_row(position);
            for &x in recent_used {
                let i = r.start + x as usize;
                let g = &self.grad_recent[x as usize..x as usize + 1];
                adagrad(&mut model.recent_w[i..i + 1], &mut self.g_recent[i..i + 1], g, lr, l2);
            }
            let backs = model.backs(position);
            for (j, chosen) in seen.iter().enumerate().take(position) {
                if !backs.contains(&(position - 1 - j)) || self.grad_source[j].iter().all(|&g| g == 0.0) {
                    continue;
                }
                for &x in chosen {
                    let r = model.layer_slice(position, position - 1 - j, x);
                    adagrad(
                        &mut model.layer_w[r.clone()],
                        &mut self.g_layer[r],
                        &self.grad_source[j],
                        lr,
                        l2,
                    );
                }
            }
        }
    }
}

/// Replaces logits by the gradient of the cross-entropy against a uniform distribution over
/// `target`: softmax(z) - y.
fn softmax_minus_target(z: &mut [f32], target: &[u32]) {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in z.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in z.iter_mut() {
        *v /= sum;
    }
    let y = 1.0 / target.len() as f32;
    for &x in target {
        z[x as usize] -= y;
    }
}

fn add_to(acc: &mut [f32], g: &[f32]) {
    for (a, &x) in acc.iter_mut().zip(g) {
        *a += x;
    }
}

fn adagrad(w: &mut [f32], acc: &mut [f32], grad: &[f32], lr: f32, l2: f32) {
    for ((w, a), &g) in w.iter_mut().zip(acc).zip(grad) {
        let g = g + l2 * *w;
        *a += g * g;
        *w -= lr * g / (a.sqrt() + 1e-8);
    }
}
