//! The two baselines every smarter predictor has to beat: per-layer popularity and per-layer
//! recency. Both learn online from what they observe and need no training.

use crate::{best_candidates, sort_best_first, Cursor, Prediction, RoutePredictor, RoutingShape};

/// Predicts, for each layer, the experts used most often there so far. Scores are the fraction
/// of observed tokens that used the expert at that layer.
pub struct FrequencyPredictor {
    shape: RoutingShape,
    /// `counts[layer][expert]`: tokens that used `expert` at `layer`.
    counts: Vec<Vec<u64>>,
    /// `tokens[layer]`: tokens observed at `layer`.
    tokens: Vec<u64>,
    cursor: Cursor,
}

impl FrequencyPredictor {
    pub fn new(shape: RoutingShape) -> Self {
        FrequencyPredictor {
            shape,
            counts: vec![vec![0; shape.num_experts]; shape.num_layers],
            tokens: vec![0; shape.num_layers],
            cursor: Cursor::TokenStart,
        }
    }
}

impl RoutePredictor for FrequencyPredictor {
    fn name(&self) -> &'static str {
        "frequency"
    }

    fn begin_token(&mut self, _token_id: Option<u32>) {
        self.cursor = Cursor::TokenStart;
    }

    fn observe(&mut self, layer: usize, experts: &[u32], _weights: &[f32]) {
        let Some(counts) = self.counts.get_mut(layer) else { return };
        for &e in experts {
            if let Some(c) = counts.get_mut(e as usize) {
                *c += 1;
            }
        }
        self.tokens[layer] += 1;
        self.cursor = Cursor::After(layer);
    }

    fn predict(&self, depth: usize) -> Vec<Prediction> {
        self.cursor
            .targets(self.shape.num_layers, depth)
            .map(|(distance, layer, next_token)| {
                let seen = self.tokens[layer].max(1) as f32;
                let scores: Vec<f32> = self.counts[layer].iter().map(|&c| c as f32 / seen).collect();
                let experts = best_candidates(&scores, self.shape.max_candidates());
                Prediction { distance, layer, next_token, experts }
            })
            .collect()
    }
}

/// Predicts, for each layer, the experts the most recent token routed through that layer used,
/// scored by their gate weights (1 when the weights are unknown). For the current token's later
/// layers that is the previous token; for the next token's layers it is the current one.
pub struct RecencyPredictor {
    shape: RoutingShape,
    /// `last[layer]`: the latest observation at `layer`, best gate weight first.
    last: Vec<Vec<(u32, f32)>>,
    cursor: Cursor,
}

impl RecencyPredictor {
    pub fn new(shape: RoutingShape) -> Self {
        RecencyPredictor { shape, last: vec![Vec::new(); shape.num_layers], cursor: Cursor::TokenStart }
    }
}

impl RoutePredictor for RecencyPredictor {
    fn name(&self) -> &'static str {
        "recency"
    }

    fn begin_token(&mut self, _token_id: Option<u32>) {
        self.cursor = Cursor::TokenStart;
    }

    fn observe(&mut self, layer: usize, experts: &[u32], weights: &[f32]) {
        let num_experts = self.shape.num_experts;
        let Some(last) = self.last.get_mut(layer) else { return };
        last.clear();
        for (i, &e) in experts.iter().enumerate() {
            if (e as usize) < num_experts && !last.iter().any(|&(x, _)| x == e) {
                let w = if weights.len() == experts.len() { weights[i].clamp(0.0, 1.0) } else { 1.0 };
                last.push((e, w));
            }
        }
        sort_best_first(last);
        self.cursor = Cursor::After(layer);
    }

    fn predict(&self, depth: usize) -> Vec<Prediction> {
        self.cursor
            .targets(self.shape.num_layers, depth)
            .map(|(distance, layer, next_token)| Prediction {
                distance,
                layer,
                next_token,
                experts: self.last[layer].clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: RoutingShape = RoutingShape { num_layers: 3, num_experts: 4, top_k: 1 };

    fn experts(p: &Prediction) -> Vec<u32> {
        p.experts.iter().map(|&(e, _)| e).collect()
    }

    #[test]
    fn frequency_ranks_by_count_and_wraps_to_next_token() {
        let mut p = FrequencyPredictor::new(SHAPE);
        // Layer 1 sees expert 2 twice and expert 0 once.
        for (l1, l2) in [(2, 3), (0, 3), (2, 1)] {
            p.begin_token(None);
            p.observe(0, &[1], &[]);
            p.observe(1, &[l1], &[]);
            p.observe(2, &[l2], &[]);
        }
        p.begin_token(None);
        p.observe(0, &[1], &[]);
        let preds = p.predict(3);
        assert_eq!(
            preds.iter().map(|p| (p.distance, p.layer, p.next_token)).collect::<Vec<_>>(),
            [(1, 1, false), (2, 2, false), (3, 0, true)]
        );
        assert_eq!(experts(&preds[0]), [2, 0]);
        assert_eq!(preds[0].experts[0].1, 2.0 / 3.0);
        assert_eq!(experts(&preds[1]), [3, 1]);
        assert_eq!(preds[2].experts, [(1, 1.0)]);
    }

    #[test]
    fn recency_returns_the_latest_routing_of_each_layer() {
        let mut p = RecencyPredictor::new(SHAPE);
        p.begin_token(Some(7));
        p.observe(0, &[1, 3], &[0.2, 0.8]);
        p.observe(1, &[2], &[]);
        p.observe(2, &[0], &[1.0]);
        p.begin_token(Some(8));
        // At the token start, distance 1 is this token's layer 0: the previous token's choice.
        let start = p.predict(1);
        assert_eq!((start[0].layer, start[0].next_token), (0, false));
        assert_eq!(start[0].experts, [(3, 0.8), (1, 0.2)]);
        p.observe(0, &[0], &[]);
        let preds = p.predict(2);
        assert_eq!(preds[0].experts, [(2, 1.0)]);
        assert_eq!(preds[1].experts, [(0, 1.0)]);
        // Wrapping to the next token's layer 0 returns this token's layer 0.
        assert_eq!(p.predict(3)[2].experts, [(0, 1.0)]);
    }

    #[test]
    fn out_of_range_inputs_are_ignored_and_depth_stops_at_next_token() {
        let mut p = FrequencyPredictor::new(SHAPE);
        p.begin_token(None);
        p.observe(9, &[0], &[]);
        p.observe(0, &[9, 1], &[]);
        assert_eq!(p.counts[0], [0, 1, 0, 0]);
        // After layer 0 of 3, the next token ends 5 layers ahead.
        assert_eq!(p.predict(100).len(), 5);
    }
}
