//! The two baselines every smarter predictor has to beat: per-layer popularity and per-layer
//! recency. Neither needs training: frequency counts online, recency reads the cursor.

use crate::{best_candidates, Prediction, RouteCursor, RoutePredictor, RoutingShape};

/// Predicts, for each layer, the experts used most often there so far (by all sequences).
/// Scores are the fraction of observed tokens that used the expert at that layer.
pub struct FrequencyPredictor {
    shape: RoutingShape,
    /// `counts[layer][expert]`: tokens that used `expert` at `layer`.
    counts: Vec<Vec<u64>>,
    /// `tokens[layer]`: tokens observed at `layer`.
    tokens: Vec<u64>,
}

impl FrequencyPredictor {
    pub fn new(shape: RoutingShape) -> Self {
        FrequencyPredictor {
            shape,
            counts: vec![vec![0; shape.num_experts]; shape.moe_layers],
            tokens: vec![0; shape.moe_layers],
        }
    }
}

impl RoutePredictor for FrequencyPredictor {
    fn name(&self) -> &'static str {
        "frequency"
    }

    fn learn(&mut self, cursor: &RouteCursor, layer: usize) {
        debug_assert!(cursor.fits(self.shape), "a cursor of another shape");
        let (Some(routed), Some(counts)) = (cursor.current(layer), self.counts.get_mut(layer)) else {
            return;
        };
        for &(e, _) in routed.in_router_order() {
            counts[e as usize] += 1;
        }
        self.tokens[layer] += 1;
    }

    fn predict(&self, cursor: &RouteCursor, depth: usize) -> Vec<Prediction> {
        debug_assert!(cursor.fits(self.shape), "a cursor of another shape");
        cursor
            .targets(depth)
            .map(|(distance, layer, next_token)| {
                let seen = self.tokens[layer].max(1) as f32;
                let scores: Vec<f32> = self.counts[layer].iter().map(|&c| c as f32 / seen).collect();
                let experts = best_candidates(&scores, self.shape.max_candidates());
                Prediction { distance, layer, next_token, experts }
            })
            .collect()
    }
}

/// Predicts, for each layer, the experts the sequence's most recent token routed through that
/// layer used, scored by their gate weights (1 when the weights are unknown). For the current
/// token's later layers that is the previous token (or an earlier one, if it skipped the layer);
/// for the next token's layers it is the current one. Everything it needs is in the cursor, so
/// it learns nothing.
pub struct RecencyPredictor;

impl RoutePredictor for RecencyPredictor {
    fn name(&self) -> &'static str {
        "recency"
    }

    fn learn(&mut self, _cursor: &RouteCursor, _layer: usize) {}

    fn predict(&self, cursor: &RouteCursor, depth: usize) -> Vec<Prediction> {
        cursor
            .targets(depth)
            .map(|(distance, layer, next_token)| Prediction {
                distance,
                layer,
                next_token,
                experts: cursor.latest(layer).map_or_else(Vec::new, |r| r.best_first().to_vec()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe;

    const SHAPE: RoutingShape = RoutingShape { moe_layers: 3, num_experts: 4, top_k: 1 };

    fn experts(p: &Prediction) -> Vec<u32> {
        p.experts.iter().map(|&(e, _)| e).collect()
    }

    #[test]
    fn frequency_ranks_by_count_and_wraps_to_next_token() {
        let (mut p, mut c) = (FrequencyPredictor::new(SHAPE), RouteCursor::new(SHAPE));
        // Layer 1 sees expert 2 twice and expert 0 once.
        for (l1, l2) in [(2, 3), (0, 3), (2, 1)] {
            c.begin_token(None);
            observe(&mut p, &mut c, 0, &[1], &[]);
            observe(&mut p, &mut c, 1, &[l1], &[]);
            observe(&mut p, &mut c, 2, &[l2], &[]);
        }
        c.begin_token(None);
        observe(&mut p, &mut c, 0, &[1], &[]);
        let preds = p.predict(&c, 3);
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
        let (mut p, mut c) = (RecencyPredictor, RouteCursor::new(SHAPE));
        c.begin_token(Some(7));
        observe(&mut p, &mut c, 0, &[1, 3], &[0.2, 0.8]);
        observe(&mut p, &mut c, 1, &[2], &[]);
        observe(&mut p, &mut c, 2, &[0], &[1.0]);
        c.begin_token(Some(8));
        // At the token start, distance 1 is this token's layer 0: the previous token's choice.
        let start = p.predict(&c, 1);
        assert_eq!((start[0].layer, start[0].next_token), (0, false));
        assert_eq!(start[0].experts, [(3, 0.8), (1, 0.2)]);
        observe(&mut p, &mut c, 0, &[0], &[]);
        let preds = p.predict(&c, 2);
        assert_eq!(preds[0].experts, [(2, 1.0)]);
        assert_eq!(preds[1].experts, [(0, 1.0)]);
        // Wrapping to the next token's layer 0 returns this token's layer 0.
        assert_eq!(p.predict(&c, 3)[2].experts, [(0, 1.0)]);
    }

    #[test]
    fn out_of_range_inputs_are_ignored_and_depth_stops_at_next_token() {
        let (mut p, mut c) = (FrequencyPredictor::new(SHAPE), RouteCursor::new(SHAPE));
        c.begin_token(None);
        observe(&mut p, &mut c, 9, &[0], &[]);
        observe(&mut p, &mut c, 0, &[9, 1], &[]);
        assert_eq!(p.counts[0], [0, 1, 0, 0]);
        // After layer 0 of 3, the next token ends 5 layers ahead.
        assert_eq!(p.predict(&c, 100).len(), 5);
    }
}
