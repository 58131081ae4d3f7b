//! An ExpertFlow-style routing-path predictor: a small learned model that scores, for every
//! later layer of the token (and the next token's first layers), which experts it will use,
//! from what is known early: the token id and the routing of the layers observed so far.
//!
//! The model is, per target position, a softmax over experts whose logits add up
//! - a bias (the layer's overall popularity),
//! - a row for the token id (ids seen often enough in training),
//! - one row per expert chosen at each of the last `context` observed layers, specific to the
//!   (source layer, target) pair: the multi-layer generalisation of the ExFlow transition table;
//! - a per-expert boost for the experts in the latest routing of the target layer itself (the
//!   previous token's, for the current token's layers): the recency signal, weighted by what
//!   training found it worth (much on Mixtral, where consecutive tokens share experts; little
//!   on FLAME). Only the diagonal: a full expert-to-expert table overfits small traces.
//!
//! Targets are positions on an extended path: `0..L` are the current token's layers and
//! `L..L + W` the next token's first `W` layers (predicted from the current token's routing
//! only: its id is not known yet). Weights are shared by every origin that predicts a target,
//! so one model serves any look-ahead up to the `max_depth` it was trained for.

mod codec;
mod train;

use std::sync::Arc;

pub use train::{train_path_model, TrainConfig};

use crate::{best_candidates, Prediction, RouteCursor, RoutePredictor, Routed, RoutingShape};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelError {
    #[error("path model: {0}")]
    BadConfig(String),
    #[error("path model: no training token has any recorded routing")]
    NoTrainingData,
    #[error("path model bytes: not a stevedore path model (bad magic)")]
    BadMagic,
    #[error("path model bytes: format version {0} is not supported (expected 1)")]
    UnsupportedVersion(u32),
    #[error("path model bytes: field `{field}` = {value} is out of range")]
    BadDimension { field: &'static str, value: u64 },
    #[error("path model bytes: truncated: {needed} bytes needed, {have} present")]
    Truncated { needed: u64, have: u64 },
    #[error("path model bytes: {0} bytes left over after the model")]
    TrailingBytes(u64),
    #[error("path model bytes: token ids are not strictly increasing at entry {0}")]
    UnsortedTokenIds(usize),
    #[error("path model bytes: a weight in `{0}` is not finite")]
    NonFinite(&'static str),
}

/// A trained routing-path model. Immutable; share it between predictors with an [`Arc`].
#[derive(Clone, Debug, PartialEq)]
pub struct PathModel {
    shape: RoutingShape,
    /// Longest distance (in layers) the model was trained to predict.
    max_depth: usize,
    /// How many of the latest observed layers feed a prediction.
    context: usize,
    /// Token ids with a learned row, strictly increasing; row `i` belongs to `token_ids[i]`.
    token_ids: Vec<u32>,
    /// `[position][expert]`.
    bias: Vec<f32>,
    /// `[token row][layer][expert]` (current-token positions only).
    token_w: Vec<f32>,
    /// `[position][back][source expert][expert]`, for the source layer `position - 1 - back`;
    /// only the `back`s in [`PathModel::backs`] are stored.
    layer_w: Vec<f32>,
    /// Where each position's blocks start in `layer_w`, in `num_experts^2` blocks (derived from
    /// the dimensions, one entry per position plus the end).
    layer_offsets: Vec<usize>,
    /// `[position][expert]`: added for the experts in the latest routing of the target's layer.
    recent_w: Vec<f32>,
}

/// Where a prediction reads the experts (ascending) a token chose at each of its layers.
#[derive(Clone, Copy)]
enum Seen<'a> {
    Nothing,
    /// Indexed by layer, empty where not observed (training).
    Layers(&'a [Vec<u32>]),
    /// The cursor's current token.
    Current(&'a RouteCursor),
    /// The cursor's previous token.
    Previous(&'a RouteCursor),
}

impl<'a> Seen<'a> {
    /// The experts chosen at `layer`; empty where not observed.
    fn layer(self, layer: usize) -> &'a [u32] {
        match self {
            Seen::Nothing => &[],
            Seen::Layers(v) => v.get(layer).map_or(&[], Vec::as_slice),
            Seen::Current(c) => c.current(layer).map_or(&[], Routed::ascending),
            Seen::Previous(c) => c.previous(layer).map_or(&[], Routed::ascending),
        }
    }
}

/// What a prediction is made from.
struct Evidence<'a> {
    /// The last observed layer; `None` at the token start.
    origin: Option<usize>,
    row: Option<usize>,
    /// The routing of the token `origin` belongs to (normally the current one).
    seen: Seen<'a>,
    /// The latest routing of the target's layer: the previous token's for a current-token
    /// target, the current token's for a next-token target.
    recent: &'a [u32],
}

impl PathModel {
    /// A model with every weight zero (it predicts uniform scores until trained).
    fn zeros(shape: RoutingShape, max_depth: usize, context: usize, token_ids: Vec<u32>) -> Self {
        let (l, e) = (shape.moe_layers, shape.num_experts);
        let layer_offsets = layer_offsets(l, max_depth, context);
        PathModel {
            shape,
            max_depth,
            context,
            bias: vec![0.0; (l + max_depth.min(l)) * e],
            token_w: vec![0.0; token_ids.len() * l * e],
            layer_w: vec![0.0; layer_offsets[layer_offsets.len() - 1] * e * e],
            recent_w: vec![0.0; (l + max_depth.min(l)) * e],
            token_ids,
            layer_offsets,
        }
    }

    pub fn shape(&self) -> RoutingShape {
        self.shape
    }

    pub fn max_depth(&self) -> usize {
        self.max_depth
    }

    pub fn context_layers(&self) -> usize {
        self.context
    }

    /// Number of token ids with a learned row.
    pub fn num_token_rows(&self) -> usize {
        self.token_ids.len()
    }

    /// Path positions with their own weights: the token's layers, then the next token's first
    /// `min(max_depth, L)` layers.
    fn positions(&self) -> usize {
        self.shape.moe_layers + self.max_depth.min(self.shape.moe_layers)
    }

    /// The `back`s (source layer = `position - 1 - back`) with weights for `position`.
    fn backs(&self, position: usize) -> std::ops::Range<usize> {
        backs(self.shape.moe_layers, self.max_depth + self.context - 1, position)
    }

    fn token_row(&self, token_id: Option<u32>) -> Option<usize> {
        self.token_ids.binary_search(&token_id?).ok()
    }

    fn bias_row(&self, position: usize) -> std::ops::Range<usize> {
        let e = self.shape.num_experts;
        position * e..(position + 1) * e
    }

    fn token_slice(&self, row: usize, layer: usize) -> std::ops::Range<usize> {
        let e = self.shape.num_experts;
        let start = (row * self.shape.moe_layers + layer) * e;
        start..start + e
    }

    /// The weights from `source_expert` at `back` layers before `position` (`back` must be in
    /// [`PathModel::backs`]).
    fn layer_slice(&self, position: usize, back: usize, source_expert: u32) -> std::ops::Range<usize> {
        let e = self.shape.num_experts;
        let block = self.layer_offsets[position] + back - self.backs(position).start;
        let start = (block * e + source_expert as usize) * e;
        start..start + e
    }

    /// The source layers that feed a prediction made after observing layer `origin`: the last
    /// `context` layers up to it (none at the token start).
    fn window(&self, origin: Option<usize>) -> std::ops::Range<usize> {
        match origin {
            Some(o) => (o + 1).saturating_sub(self.context)..o + 1,
            None => 0..0,
        }
    }

    /// The layers of the current token that `position`'s latest routing comes from, if any:
    /// a next-token position reads the current token's same layer once it is observed.
    fn recent_layer(&self, position: usize, origin: Option<usize>) -> Option<usize> {
        let m = position.checked_sub(self.shape.moe_layers)?;
        origin.filter(|&o| m <= o).map(|_| m)
    }

    /// Logits of target `position` given `ev`.
    fn logits(&self, position: usize, ev: &Evidence, out: &mut [f32]) {
        out.copy_from_slice(&self.bias[self.bias_row(position)]);
        if let (Some(r), true) = (ev.row, position < self.shape.moe_layers) {
            add(out, &self.token_w[self.token_slice(r, position)]);
        }
        let backs = self.backs(position);
        for j in self.window(ev.origin) {
            let back = position - 1 - j;
            if !backs.contains(&back) {
                continue;
            }
            for &x in ev.seen.layer(j) {
                add(out, &self.layer_w[self.layer_slice(position, back, x)]);
            }
        }
        let boost = &self.recent_w[self.bias_row(position)];
        for &x in ev.recent {
            out[x as usize] += boost[x as usize];
        }
    }
}

/// Source layers that can feed `position` are within `span` layers before it (a prediction
/// looks at most `max_depth` ahead from a window of `context` layers) and belong to the current
/// token (`position - 1 - back < moe_layers`).
fn backs(moe_layers: usize, span: usize, position: usize) -> std::ops::Range<usize> {
    let lo = position.saturating_sub(moe_layers);
    lo..span.min(position).max(lo)
}

/// Prefix sums of `backs(..).len()` over positions.
fn layer_offsets(moe_layers: usize, max_depth: usize, context: usize) -> Vec<usize> {
    let positions = moe_layers + max_depth.min(moe_layers);
    let mut out = vec![0];
    for p in 0..positions {
        out.push(out[p] + backs(moe_layers, max_depth + context - 1, p).len());
    }
    out
}

fn add(acc: &mut [f32], row: &[f32]) {
    for (a, &w) in acc.iter_mut().zip(row) {
        *a += w;
    }
}

/// Turns logits into inclusion scores: softmax probability times `top_k` (capped at 1 by
/// [`best_candidates`]).
fn scores_from_logits(logits: &mut [f32], shape: RoutingShape) -> Vec<(u32, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for z in logits.iter_mut() {
        *z = (*z - max).exp();
        sum += *z;
    }
    let scale = shape.top_k as f32 / sum;
    for z in logits.iter_mut() {
        *z *= scale;
    }
    best_candidates(logits, shape.max_candidates())
}

/// Runs a [`PathModel`] live: scores targets on demand from the token id and the current and
/// previous token's routing that the cursor holds. It learns nothing online (the model is
/// trained offline); `predict` costs, per predicted layer, `context * top_k` row additions of
/// `num_experts` floats and a softmax.
pub struct PathPredictor {
    model: Arc<PathModel>,
}

impl PathPredictor {
    pub fn new(model: Arc<PathModel>) -> Self {
        PathPredictor { model }
    }

    pub fn model(&self) -> &Arc<PathModel> {
        &self.model
    }

    fn target_logits(
        &self,
        cursor: &RouteCursor,
        row: Option<usize>,
        (distance, layer, next_token): (usize, usize, bool),
        out: &mut [f32],
    ) {
        let m = &*self.model;
        let l = m.shape.moe_layers;
        let none = Evidence { origin: None, row: None, seen: Seen::Nothing, recent: &[] };
        let (current, previous) = (Seen::Current(cursor), Seen::Previous(cursor));
        match cursor.last_layer() {
            Some(o) => {
                let position = if next_token { l + layer } else { layer };
                if position < m.positions() && position - o <= m.max_depth {
                    let recent = if next_token { current.layer(layer) } else { previous.layer(layer) };
                    let ev = Evidence { origin: Some(o), row, seen: current, recent };
                    m.logits(position, &ev, out);
                } else {
                    // Beyond what the model was trained for: the layer's popularity.
                    m.logits(layer, &none, out);
                }
            }
            None if next_token => m.logits(layer, &none, out),
            None => {
                let recent = if distance <= m.max_depth { previous.layer(layer) } else { &[] };
                let previous_complete = cursor.previous_last_layer() == Some(l - 1);
                if row.is_none() && previous_complete && l + layer < m.positions() {
                    // Unknown token id: predict it as the previous token's next token.
                    let ev = Evidence { origin: Some(l - 1), row: None, seen: previous, recent };
                    m.logits(l + layer, &ev, out);
                } else {
                    m.logits(layer, &Evidence { row, recent, ..none }, out);
                }
            }
        }
    }
}

impl RoutePredictor for PathPredictor {
    fn name(&self) -> &'static str {
        "path"
    }

    fn learn(&mut self, _cursor: &RouteCursor, _layer: usize) {}

    fn predict(&self, cursor: &RouteCursor, depth: usize) -> Vec<Prediction> {
        debug_assert!(cursor.fits(self.model.shape), "a cursor of another shape");
        let m = &*self.model;
        let row = m.token_row(cursor.token_id());
        let mut logits = vec![0.0; m.shape.num_experts];
        cursor
            .targets(depth)
            .map(|target| {
                self.target_logits(cursor, row, target, &mut logits);
                let (distance, layer, next_token) = target;
                Prediction { distance, layer, next_token, experts: scores_from_logits(&mut logits, m.shape) }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
