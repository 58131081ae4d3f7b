//! Inter-layer transition statistics, the affinity ExFlow reports: the experts a token uses at
//! layer `l` say a lot about those it uses at `l + 1`. Learned online by counting consecutive
//! layer pairs (feed it a trace with [`crate::replay`] to learn from traces), and chained as a
//! Markov process for distances beyond 1.

use crate::{best_candidates, Prediction, RouteCursor, RoutePredictor, Routed, RoutingShape};

/// Weight, in pseudo-observations, of the layer's overall popularity when a transition row has
/// few counts: a row seen once is mostly its own evidence, an unseen row falls back entirely.
const SMOOTHING: f32 = 1.0;

/// Predicts the next layers from `P(e' at l + 1 | e at l)` tables, learned from every sequence
/// it is fed and chained from the predicted sequence's own routing. Scores estimate the
/// probability that the expert is among those chosen at the target layer.
pub struct TransitionPredictor {
    shape: RoutingShape,
    /// `pairs[(l * E + e) * E + e2]`: tokens that chose `e` at layer `l` and `e2` at the layer
    /// after it (layer `l + 1`, or the next token's layer 0 when `l` is the last layer).
    pairs: Vec<u32>,
    /// `sources[l * E + e]`: tokens that chose `e` at `l` and whose following layer was observed.
    sources: Vec<u32>,
    /// `uses[l * E + e]`: tokens that chose `e` at `l`; the fallback when a row is sparse.
    uses: Vec<u32>,
    /// `tokens[l]`: tokens observed at `l`.
    tokens: Vec<u32>,
}

impl TransitionPredictor {
    pub fn new(shape: RoutingShape) -> Self {
        let (l, e) = (shape.moe_layers, shape.num_experts);
        TransitionPredictor {
            shape,
            pairs: vec![0; l * e * e],
            sources: vec![0; l * e],
            uses: vec![0; l * e],
            tokens: vec![0; l],
        }
    }

    /// Fraction of tokens observed at `layer` that used each expert there.
    fn popularity(&self, layer: usize, out: &mut [f32]) {
        let e = self.shape.num_experts;
        let seen = self.tokens[layer].max(1) as f32;
        for (o, &u) in out.iter_mut().zip(&self.uses[layer * e..(layer + 1) * e]) {
            *o = u as f32 / seen;
        }
    }

    /// One Markov step: from a sparse distribution `from` over the experts of `layer` (summing
    /// to 1) to inclusion probabilities at the layer after it. `prior` is scratch space.
    fn step(&self, layer: usize, from: &[(u32, f32)], prior: &mut [f32], out: &mut [f32]) {
        let e = self.shape.num_experts;
        self.popularity((layer + 1) % self.shape.moe_layers, prior);
        out.fill(0.0);
        for &(src, p) in from {
            let src = src as usize;
            let row = &self.pairs[(layer * e + src) * e..(layer * e + src + 1) * e];
            let scale = p / (self.sources[layer * e + src] as f32 + SMOOTHING);
            for ((o, &c), &q) in out.iter_mut().zip(row).zip(prior.iter()) {
                *o += scale * (c as f32 + SMOOTHING * q);
            }
        }
    }
}

impl RoutePredictor for TransitionPredictor {
    fn name(&self) -> &'static str {
        "transition"
    }

    fn learn(&mut self, cursor: &RouteCursor, layer: usize) {
        debug_assert!(cursor.fits(self.shape), "a cursor of another shape");
        let e = self.shape.num_experts;
        let Some(chosen) = cursor.current(layer) else { return };
        // Learn the pair (predecessor on the path -> this layer) when the predecessor was observed.
        if let Some((prev, prev_chosen)) = predecessor(cursor, layer) {
            for &(a, _) in prev_chosen.in_router_order() {
                self.sources[prev * e + a as usize] += 1;
                for &(b, _) in chosen.in_router_order() {
                    self.pairs[(prev * e + a as usize) * e + b as usize] += 1;
                }
            }
        }
        for &(x, _) in chosen.in_router_order() {
            self.uses[layer * e + x as usize] += 1;
        }
        self.tokens[layer] += 1;
    }

    fn predict(&self, cursor: &RouteCursor, depth: usize) -> Vec<Prediction> {
        debug_assert!(cursor.fits(self.shape), "a cursor of another shape");
        let (layers, e) = (self.shape.moe_layers, self.shape.num_experts);
        // The chain starts from the cursor's last observation when the first target directly
        // follows it: the current token's last layer, or at the token start the previous
        // token's last layer if that is the last layer. Otherwise (nothing observed yet, or a
        // gap before this token) it starts from layer popularity. Later steps continue from the
        // previous step's candidates only, which keeps a step at `max_candidates * num_experts`
        // operations.
        let last = match cursor.last_layer() {
            Some(l) => cursor.current(l),
            None => predecessor(cursor, 0).map(|(_, r)| r),
        };
        let mut from: Vec<(u32, f32)> = match last {
            Some(r) => {
                let n = r.in_router_order().len() as f32;
                r.in_router_order().iter().map(|&(x, _)| (x, 1.0 / n)).collect()
            }
            None => Vec::new(),
        };
        let (mut scores, mut prior) = (vec![0.0; e], vec![0.0; e]);
        let mut out = Vec::new();
        for (distance, layer, next_token) in cursor.targets(depth) {
            if from.is_empty() {
                self.popularity(layer, &mut scores);
            } else {
                self.step((layer + layers - 1) % layers, &from, &mut prior, &mut scores);
            }
            let experts = best_candidates(&scores, self.shape.max_candidates());
            let total: f32 = experts.iter().map(|&(_, s)| s).sum();
            from = experts.iter().map(|&(x, s)| (x, s / total)).collect();
            out.push(Prediction { distance, layer, next_token, experts });
        }
        out
    }
}

/// The layer right before `layer` on `cursor`'s path, with its routing, if it was observed: the
/// current token's `layer - 1`, or for layer 0 the previous token's last layer when that is the
/// last MoE layer.
fn predecessor(cursor: &RouteCursor, layer: usize) -> Option<(usize, &Routed)> {
    match layer.checked_sub(1) {
        Some(prev) => Some((prev, cursor.current(prev)?)),
        None => {
            let last = cursor.shape().moe_layers.checked_sub(1)?;
            if cursor.previous_last_layer() != Some(last) {
                return None;
            }
            Some((last, cursor.previous(last)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe;

    const SHAPE: RoutingShape = RoutingShape { moe_layers: 3, num_experts: 4, top_k: 1 };

    fn run(p: &mut TransitionPredictor, c: &mut RouteCursor, paths: &[[u32; 3]]) {
        for path in paths {
            c.begin_token(None);
            for (l, &x) in path.iter().enumerate() {
                observe(p, c, l, &[x], &[]);
            }
        }
    }

    fn top(p: &Prediction) -> u32 {
        p.experts[0].0
    }

    #[test]
    fn learns_deterministic_paths_and_chains_them() {
        let (mut p, mut c) = (TransitionPredictor::new(SHAPE), RouteCursor::new(SHAPE));
        // Two paths: 0 -> 1 -> 2 and 3 -> 2 -> 0, alternating (so layer 2 -> next layer 0 also
        // alternates: 2 -> 3 and 0 -> 0).
        run(&mut p, &mut c, &[[0, 1, 2], [3, 2, 0], [0, 1, 2], [3, 2, 0], [0, 1, 2], [3, 2, 0]]);
        c.begin_token(None);
        observe(&mut p, &mut c, 0, &[3], &[]);
        let preds = p.predict(&c, 3);
        assert_eq!(preds.iter().take(2).map(top).collect::<Vec<_>>(), [2, 0]);
        // The next token's layer 0 followed 0 with 0 or 3 (both seen): those two lead.
        assert!(preds[2].next_token);
        let mut next: Vec<u32> = preds[2].experts.iter().take(2).map(|&(e, _)| e).collect();
        next.sort();
        assert_eq!(next, [0, 3]);
        // Three transitions 0 -> 1 seen, smoothed by one pseudo-count of layer 1's popularity (1/2).
        c.begin_token(None);
        observe(&mut p, &mut c, 0, &[0], &[]);
        let next = &p.predict(&c, 1)[0];
        assert_eq!(top(next), 1);
        assert!((next.experts[0].1 - (3.0 + 0.5) / 4.0).abs() < 1e-6, "{next:?}");
    }

    #[test]
    fn token_start_follows_from_the_previous_tokens_last_layer() {
        let (mut p, mut c) = (TransitionPredictor::new(SHAPE), RouteCursor::new(SHAPE));
        run(&mut p, &mut c, &[[0, 1, 2], [3, 2, 0], [0, 1, 2], [3, 2, 0]]);
        // The last token ended at expert 0, which was always followed by path 0 -> ...
        c.begin_token(None);
        let preds = p.predict(&c, 2);
        assert_eq!((preds[0].layer, preds[0].next_token), (0, false));
        assert_eq!(preds.iter().map(top).collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn gaps_are_not_learned_as_transitions() {
        let (mut p, mut c) = (TransitionPredictor::new(SHAPE), RouteCursor::new(SHAPE));
        c.begin_token(None);
        observe(&mut p, &mut c, 0, &[0], &[]);
        observe(&mut p, &mut c, 2, &[3], &[]);
        assert!(p.pairs.iter().all(|&c| c == 0));
        // With nothing learned, predictions fall back to popularity (layer 0 saw expert 0).
        c.begin_token(None);
        observe(&mut p, &mut c, 1, &[1], &[]);
        let preds = p.predict(&c, 2);
        assert_eq!(preds[0].experts, [(3, 1.0)]);
        assert_eq!(preds[1].experts, [(0, 1.0)]);
    }

    /// Two sequences interleaved token by token, one predictor: each predicts from its own
    /// history, and the shared table learns both paths (but no pair across sequences).
    #[test]
    fn interleaved_sequences_share_the_table_but_not_the_history() {
        let shape = RoutingShape { moe_layers: 2, num_experts: 4, top_k: 1 };
        let (mut table, mut recency) = (TransitionPredictor::new(shape), crate::RecencyPredictor);
        let (mut a, mut b) = (RouteCursor::new(shape), RouteCursor::new(shape));
        // A always routes 0 -> 1, B 2 -> 3: tokens A, B, A, B, A, B.
        for _ in 0..3 {
            for (c, path) in [(&mut a, [0, 1]), (&mut b, [2, 3])] {
                c.begin_token(None);
                for (l, &e) in path.iter().enumerate() {
                    c.observe(l, &[e], &[]);
                    table.learn(c, l);
                    recency.learn(c, l);
                }
            }
        }
        let pair = |from: (usize, usize), to: usize| table.pairs[(from.0 * 4 + from.1) * 4 + to];
        assert_eq!((pair((1, 1), 0), pair((1, 3), 2)), (2, 2), "each sequence's own token boundary");
        assert_eq!((pair((1, 3), 0), pair((1, 1), 2)), (0, 0), "nothing across sequences");
        // B was observed last, but A's next token is predicted from A's routing.
        a.begin_token(None);
        let rec = recency.predict(&a, 2);
        assert_eq!((rec[0].experts[0].0, rec[1].experts[0].0), (0, 1));
        assert_eq!(top(&table.predict(&a, 1)[0]), 0);
        b.begin_token(None);
        assert_eq!(top(&table.predict(&b, 1)[0]), 2);
        // Within a token, the table chains what either sequence taught it: A now takes B's
        // first expert and is predicted to continue on B's path.
        a.observe(0, &[2], &[]);
        table.learn(&a, 0);
        assert_eq!((top(&table.predict(&a, 1)[0]), top(&recency.predict(&a, 1)[0])), (3, 1));
    }
}
