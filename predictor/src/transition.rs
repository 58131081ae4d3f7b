//! Inter-layer transition statistics, the affinity ExFlow reports: the experts a token uses at
//! layer `l` say a lot about those it uses at `l + 1`. Learned online by counting consecutive
//! layer pairs (feed it a trace with [`crate::replay`] to learn from traces), and chained as a
//! Markov process for distances beyond 1.

use crate::{best_candidates, Cursor, Prediction, RoutePredictor, RoutingShape};

/// Weight, in pseudo-observations, of the layer's overall popularity when a transition row has
/// few counts: a row seen once is mostly its own evidence, an unseen row falls back entirely.
const SMOOTHING: f32 = 1.0;

/// Predicts the next layers from `P(e' at l + 1 | e at l)` tables. Scores estimate the probability
/// that the expert is among those chosen at the target layer.
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
    /// The latest observation (layer, experts), possibly of the previous token.
    last: Option<(usize, Vec<u32>)>,
    cursor: Cursor,
}

impl TransitionPredictor {
    pub fn new(shape: RoutingShape) -> Self {
        let (l, e) = (shape.num_layers, shape.num_experts);
        TransitionPredictor {
            shape,
            pairs: vec![0; l * e * e],
            sources: vec![0; l * e],
            uses: vec![0; l * e],
            tokens: vec![0; l],
            last: None,
            cursor: Cursor::TokenStart,
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
        self.popularity((layer + 1) % self.shape.num_layers, prior);
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

    fn begin_token(&mut self, _token_id: Option<u32>) {
        self.cursor = Cursor::TokenStart;
    }

    fn observe(&mut self, layer: usize, experts: &[u32], _weights: &[f32]) {
        let (num_layers, e) = (self.shape.num_layers, self.shape.num_experts);
        if layer >= num_layers {
            return;
        }
        let chosen: Vec<u32> = experts.iter().copied().filter(|&x| (x as usize) < e).collect();
        // Learn the pair (previous layer -> this one) when they are adjacent on the path.
        if let Some((prev, prev_chosen)) = &self.last {
            let adjacent = match self.cursor {
                Cursor::After(l) => l == *prev && prev + 1 == layer,
                Cursor::TokenStart => *prev == num_layers - 1 && layer == 0,
            };
            if adjacent {
                for &a in prev_chosen {
                    self.sources[prev * e + a as usize] += 1;
                    for &b in &chosen {
                        self.pairs[(prev * e + a as usize) * e + b as usize] += 1;
                    }
                }
            }
        }
        for &x in &chosen {
            self.uses[layer * e + x as usize] += 1;
        }
        self.tokens[layer] += 1;
        self.last = Some((layer, chosen));
        self.cursor = Cursor::After(layer);
    }

    fn predict(&self, depth: usize) -> Vec<Prediction> {
        let (num_layers, e) = (self.shape.num_layers, self.shape.num_experts);
        // The chain starts from the last observation when the first target directly follows it;
        // otherwise (nothing observed yet, or a gap before this token) from layer popularity.
        // Later steps continue from the previous step's candidates only, which keeps a step at
        // `max_candidates * num_experts` operations.
        let mut from: Vec<(u32, f32)> = Vec::new();
        if let Some((prev, chosen)) = &self.last {
            let follows = match self.cursor {
                Cursor::After(_) => true,
                Cursor::TokenStart => *prev == num_layers - 1,
            };
            if follows {
                from = chosen.iter().map(|&x| (x, 1.0 / chosen.len() as f32)).collect();
            }
        }
        let (mut scores, mut prior) = (vec![0.0; e], vec![0.0; e]);
        let mut out = Vec::new();
        for (distance, layer, next_token) in self.cursor.targets(num_layers, depth) {
            if from.is_empty() {
                self.popularity(layer, &mut scores);
            } else {
                self.step((layer + num_layers - 1) % num_layers, &from, &mut prior, &mut scores);
            }
            let experts = best_candidates(&scores, self.shape.max_candidates());
            let total: f32 = experts.iter().map(|&(_, s)| s).sum();
            from = experts.iter().map(|&(x, s)| (x, s / total)).collect();
            out.push(Prediction { distance, layer, next_token, experts });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: RoutingShape = RoutingShape { num_layers: 3, num_experts: 4, top_k: 1 };

    fn run(p: &mut TransitionPredictor, paths: &[[u32; 3]]) {
        for path in paths {
            p.begin_token(None);
            for (l, &x) in path.iter().enumerate() {
                p.observe(l, &[x], &[]);
            }
        }
    }

    fn top(p: &Prediction) -> u32 {
        p.experts[0].0
    }

    #[test]
    fn learns_deterministic_paths_and_chains_them() {
        let mut p = TransitionPredictor::new(SHAPE);
        // Two paths: 0 -> 1 -> 2 and 3 -> 2 -> 0, alternating (so layer 2 -> next layer 0 also
        // alternates: 2 -> 3 and 0 -> 0).
        run(&mut p, &[[0, 1, 2], [3, 2, 0], [0, 1, 2], [3, 2, 0], [0, 1, 2], [3, 2, 0]]);
        p.begin_token(None);
        p.observe(0, &[3], &[]);
        let preds = p.predict(3);
        assert_eq!(preds.iter().take(2).map(top).collect::<Vec<_>>(), [2, 0]);
        // The next token's layer 0 followed 0 with 0 or 3 (both seen): those two lead.
        assert!(preds[2].next_token);
        let mut next: Vec<u32> = preds[2].experts.iter().take(2).map(|&(e, _)| e).collect();
        next.sort();
        assert_eq!(next, [0, 3]);
        // Three transitions 0 -> 1 seen, smoothed by one pseudo-count of layer 1's popularity (1/2).
        p.begin_token(None);
        p.observe(0, &[0], &[]);
        let next = &p.predict(1)[0];
        assert_eq!(top(next), 1);
        assert!((next.experts[0].1 - (3.0 + 0.5) / 4.0).abs() < 1e-6, "{next:?}");
    }

    #[test]
    fn token_start_follows_from_the_previous_tokens_last_layer() {
        let mut p = TransitionPredictor::new(SHAPE);
        run(&mut p, &[[0, 1, 2], [3, 2, 0], [0, 1, 2], [3, 2, 0]]);
        // The last token ended at expert 0, which was always followed by path 0 -> ...
        p.begin_token(None);
        let preds = p.predict(2);
        assert_eq!((preds[0].layer, preds[0].next_token), (0, false));
        assert_eq!(preds.iter().map(top).collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn gaps_are_not_learned_as_transitions() {
        let mut p = TransitionPredictor::new(SHAPE);
        p.begin_token(None);
        p.observe(0, &[0], &[]);
        p.observe(2, &[3], &[]);
        assert!(p.pairs.iter().all(|&c| c == 0));
        // With nothing learned, predictions fall back to popularity (layer 0 saw expert 0).
        p.begin_token(None);
        p.observe(1, &[1], &[]);
        let preds = p.predict(2);
        assert_eq!(preds[0].experts, [(3, 1.0)]);
        assert_eq!(preds[1].experts, [(0, 1.0)]);
    }
}
