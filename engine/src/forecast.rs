//! Routing forecasts for the predictive policy: turns each step's routing into the
//! [`Candidate`]s the expert tier protects and prefetches. One [`Forecaster`] serves a whole
//! batch: the routing predictor (and what it learns) is shared, and every sequence keeps its own
//! [`RouteCursor`]. The live engine and the simulator drive it the same way, step by step, which
//! is why they count the same hits and misses:
//!
//! - [`Forecaster::begin_step`] at the start of a forward pass, with its rows. A sequence with
//!   one row in the step (a decode token, or a one-token prompt chunk) begins its token on its
//!   cursor, and the cursors predict the token's first layers.
//! - [`Forecaster::observe`] at each MoE layer, with the router's choice for the step's rows.
//!   One-row sequences feed their cursor at once and predict the layers ahead. A sequence with
//!   several rows (a prompt chunk) cannot walk its cursor token by token layer by layer, so its
//!   routing is kept until the step's last MoE layer and fed then, token-major; it predicts from
//!   there (the next step's first layers).
//!
//! Predictions of several sequences for the same expert combine as the chance that at least one
//! of them routes there (`1 - prod(1 - p)`), at the nearest distance any of them gives.
//!
//! The predictor stays pure and the store stays "keys and byte ranges": this is the only place
//! where the two meet. Cost: per MoE layer and sequence, one `learn` and one `predict`
//! (microseconds; see [`ForecastStats::seconds`]), nothing per expert.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde::Serialize;
use stevedore_cache::{Candidate, ExpertKey};
use stevedore_predictor::{observe, Prediction, RouteCursor, RoutePredictor, RoutingShape};

/// What the forecaster did, for the stats JSON.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ForecastStats {
    pub predictor: &'static str,
    /// MoE layers looked ahead.
    pub depth: usize,
    /// Predictions made, one per sequence per step where it predicted.
    pub predictions: u64,
    /// Time spent feeding the predictor and building candidates, in all.
    pub seconds: f64,
    /// Next-layer predictions scored against the routing that followed (decode rows): experts
    /// predicted (the top-k of each), those the layer then used, and the experts it used.
    pub predicted: u64,
    pub correct: u64,
    pub routed: u64,
    /// The same per distance (1 = the next MoE layer, as the three counts above), nearest first.
    pub by_distance: Vec<DistanceScore>,
}

/// Predictions made `distance` MoE layers ahead, scored as [`ForecastStats`]'s are.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DistanceScore {
    pub distance: usize,
    pub predicted: u64,
    pub correct: u64,
    pub routed: u64,
    pub recall: f64,
    pub precision: f64,
}

impl ForecastStats {
    /// Of the experts predicted for the next layer, the share it used (0 before any).
    pub fn precision(&self) -> f64 {
        ratio(self.correct, self.predicted)
    }

    /// Of the experts the next layer used, the share predicted (0 before any).
    pub fn recall(&self) -> f64 {
        ratio(self.correct, self.routed)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// One row of a step as the forecaster needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepRow {
    pub seq: u64,
    pub token: Option<u32>,
}

/// One row's choice at one layer: experts best first and their gate weights.
type Choice = (Vec<u32>, Vec<f32>);

/// One row's next-gate estimates made at a layer: (MoE layer estimated, experts best first,
/// their router probabilities).
pub type RowAhead<'a> = Vec<(usize, &'a [u32], &'a [f32])>;

/// For rows whose sequences are contiguous (`seqs`, one per row): whether each row is its
/// sequence's only one in the step, the rows that begin a token on their cursor (and use
/// next-gate estimates).
pub fn alone_rows(seqs: &[u64]) -> Vec<bool> {
    (0..seqs.len())
        .map(|i| {
            let same = |j: Option<usize>| j.and_then(|j| seqs.get(j)) == Some(&seqs[i]);
            !same(i.checked_sub(1)) && !same(Some(i + 1))
        })
        .collect()
}

/// A prediction waiting for its layer's routing: (distance, MoE layer, its top-k experts).
type Pending = (usize, usize, Vec<u32>);

/// A prompt chunk's routing, kept until the step's last MoE layer.
struct Chunk {
    seq: u64,
    /// Its rows in the step.
    rows: Vec<usize>,
    /// `[moe layer]`: per row, the experts and weights (`None` where a layer was not routed).
    layers: Vec<Vec<Option<Choice>>>,
}

/// See the module docs.
pub struct Forecaster {
    predictor: Box<dyn RoutePredictor>,
    shape: RoutingShape,
    depth: usize,
    /// Decoder layer of each MoE layer, for the candidates' keys.
    layer_ids: Vec<usize>,
    cursors: HashMap<u64, RouteCursor>,
    /// This step's rows, and for each the index of its sequence's chunk (multi-row sequences).
    rows: Vec<StepRow>,
    chunk_of: Vec<Option<usize>>,
    chunks: Vec<Chunk>,
    /// Per sequence: its predictions not yet scored, each scored when its layer routes.
    pending: HashMap<u64, Vec<Pending>>,
    stats: ForecastStats,
}

impl Forecaster {
    /// A forecaster for a model whose MoE layers are the decoder layers `layer_ids`, looking
    /// `depth` MoE layers ahead.
    pub fn new(
        predictor: Box<dyn RoutePredictor>,
        shape: RoutingShape,
        layer_ids: Vec<usize>,
        depth: usize,
    ) -> Self {
        let stats = ForecastStats {
            predictor: predictor.name(),
            depth,
            predictions: 0,
            seconds: 0.0,
            predicted: 0,
            correct: 0,
            routed: 0,
            by_distance: (1..=depth)
                .map(|distance| DistanceScore { distance, ..Default::default() })
                .collect(),
        };
        Forecaster {
            predictor,
            shape,
            depth,
            layer_ids,
            cursors: HashMap::new(),
            rows: Vec::new(),
            chunk_of: Vec::new(),
            chunks: Vec::new(),
            pending: HashMap::new(),
            stats,
        }
    }

    pub fn stats(&self) -> ForecastStats {
        self.stats.clone()
    }

    /// A sequence ended: its cursor goes.
    pub fn end_sequence(&mut self, seq: u64) {
        self.cursors.remove(&seq);
        self.pending.remove(&seq);
    }

    fn cursor(&mut self, seq: u64) -> &mut RouteCursor {
        let shape = self.shape;
        self.cursors.entry(seq).or_insert_with(|| RouteCursor::new(shape))
    }

    /// The start of a step with `rows` (one per token, a sequence's rows contiguous), and the
    /// next-gate estimates made from each row's embedding (`ahead(r)`, used for one-row
    /// sequences). Returns the candidates for the step's first layers.
    pub fn begin_step<'a>(
        &mut self,
        rows: &[StepRow],
        ahead: impl Fn(usize) -> RowAhead<'a>,
    ) -> Vec<Candidate> {
        let t0 = Instant::now();
        self.rows.clear();
        self.rows.extend_from_slice(rows);
        self.chunks.clear();
        self.chunk_of.clear();
        let mut single = Vec::new();
        let mut i = 0;
        while i < rows.len() {
            let seq = rows[i].seq;
            let end = i + rows[i..].iter().take_while(|r| r.seq == seq).count();
            if end - i == 1 {
                self.chunk_of.push(None);
                let cursor = self.cursor(seq);
                cursor.begin_token(rows[i].token);
                for (layer, experts, probs) in ahead(i) {
                    cursor.foresee(None, layer, experts, probs);
                }
                single.push(seq);
            } else {
                let layers = vec![vec![None; end - i]; self.shape.moe_layers];
                self.chunks.push(Chunk { seq, rows: (i..end).collect(), layers });
                self.chunk_of.extend(std::iter::repeat_n(Some(self.chunks.len() - 1), end - i));
            }
            i = end;
        }
        self.finish(&single, t0)
    }

    /// MoE layer `moe` routed the step's rows: `choice(r)` is row `r`'s experts (best first)
    /// and gate weights, or `None` where the row was not routed; `ahead(r)` the next-gate
    /// estimates the layer made for the row (used for one-row sequences; a prompt chunk
    /// predicts only at the step's last layer, for the next step). Returns the candidates for
    /// the layers ahead.
    pub fn observe<'a>(
        &mut self,
        moe: usize,
        choice: impl Fn(usize) -> Option<(&'a [u32], &'a [f32])>,
        ahead: impl Fn(usize) -> RowAhead<'a>,
    ) -> Vec<Candidate> {
        let t0 = Instant::now();
        let mut single = Vec::new();
        for r in 0..self.rows.len() {
            let Some((experts, weights)) = choice(r) else { continue };
            match self.chunk_of[r] {
                None => {
                    let seq = self.rows[r].seq;
                    self.score(seq, moe, experts);
                    let cursor = self.cursors.get_mut(&seq).expect("begin_step made it");
                    observe(&mut *self.predictor, cursor, moe, experts, weights);
                    for (layer, experts, probs) in ahead(r) {
                        cursor.foresee(Some(moe), layer, experts, probs);
                    }
                    single.push(seq);
                }
                Some(c) => {
                    let chunk = &mut self.chunks[c];
                    let at = r - chunk.rows[0];
                    chunk.layers[moe][at] = Some((experts.to_vec(), weights.to_vec()));
                }
            }
        }
        if moe + 1 == self.shape.moe_layers {
            for chunk in std::mem::take(&mut self.chunks) {
                for (at, &r) in chunk.rows.iter().enumerate() {
                    let token = self.rows[r].token;
                    let shape = self.shape;
                    let cursor = self.cursors.entry(chunk.seq).or_insert_with(|| RouteCursor::new(shape));
                    cursor.begin_token(token);
                    for (l, layer) in chunk.layers.iter().enumerate() {
                        if let Some((experts, weights)) = &layer[at] {
                            observe(&mut *self.predictor, cursor, l, experts, weights);
                        }
                    }
                }
                single.push(chunk.seq);
            }
        }
        self.finish(&single, t0)
    }

    /// Scores `seq`'s pending predictions for MoE layer `moe`, which routed `experts`.
    fn score(&mut self, seq: u64, moe: usize, experts: &[u32]) {
        let Some(pending) = self.pending.get_mut(&seq) else { return };
        let stats = &mut self.stats;
        pending.retain(|(distance, layer, predicted)| {
            if *layer != moe {
                return true;
            }
            let correct = predicted.iter().filter(|e| experts.contains(e)).count() as u64;
            if let Some(d) = stats.by_distance.get_mut(distance - 1) {
                d.predicted += predicted.len() as u64;
                d.correct += correct;
                d.routed += experts.len() as u64;
                d.recall = ratio(d.correct, d.routed);
                d.precision = ratio(d.correct, d.predicted);
            }
            if *distance == 1 {
                stats.predicted += predicted.len() as u64;
                stats.correct += correct;
                stats.routed += experts.len() as u64;
            }
            false
        });
    }

    /// The sequences' predictions combined into candidates (nearest distance, then layer and
    /// expert, first).
    fn finish(&mut self, seqs: &[u64], t0: Instant) -> Vec<Candidate> {
        // (moe layer, expert) -> (distance, contributors, first score, prod(1 - p)).
        let mut combined: BTreeMap<(usize, u32), (usize, u32, f32, f32)> = BTreeMap::new();
        for seq in seqs {
            let Some(cursor) = self.cursors.get(seq) else { continue };
            let predictions: Vec<Prediction> = self.predictor.predict(cursor, self.depth);
            self.stats.predictions += 1;
            let pending = self.pending.entry(*seq).or_default();
            for p in &predictions {
                let mut best = p.experts.clone();
                best.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                let top: Vec<u32> = best.iter().take(self.shape.top_k).map(|&(e, _)| e).collect();
                pending.push((p.distance, p.layer, top));
            }
            for p in predictions {
                for &(e, score) in &p.experts {
                    let s = score.clamp(0.0, 1.0);
                    let entry = combined.entry((p.layer, e)).or_insert((p.distance, 0, s, 1.0));
                    entry.0 = entry.0.min(p.distance);
                    entry.1 += 1;
                    entry.3 *= 1.0 - s;
                }
            }
        }
        let mut out: Vec<Candidate> = combined
            .into_iter()
            .filter_map(|((moe, e), (distance, n, first, none))| {
                let layer = *self.layer_ids.get(moe)?;
                // One sequence's score is used as is (1 - (1 - p) would round it).
                let score = if n == 1 { first } else { 1.0 - none };
                Some(Candidate { key: ExpertKey::new(layer, e as usize), distance, score, bytes: 0 })
            })
            .collect();
        out.sort_by(|a, b| {
            a.distance.cmp(&b.distance).then(b.score.total_cmp(&a.score)).then(a.key.cmp(&b.key))
        });
        self.stats.seconds += t0.elapsed().as_secs_f64();
        out
    }
}

#[cfg(test)]
mod tests;
