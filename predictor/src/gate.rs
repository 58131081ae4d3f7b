//! Next-gate prediction (mixtral-offloading's speculative loading, Fate): the router of a layer
//! ahead applied to the hidden state available now ranks that layer's experts long before its
//! own routing is known. The engine computes those estimates in the forward pass and hands them
//! to each sequence's cursor ([`RouteCursor::foresee`]); [`NextGatePredictor`] turns them into
//! predictions with calibrated scores, and [`Ensemble`] blends it with the trace-based
//! predictors, which alone reach the layers no estimate covers (the next token's).

use crate::{best_candidates, sort_best_first, Prediction, RouteCursor, RoutePredictor, RoutingShape};

/// Distances told apart by the calibration; estimates made further ahead share the last.
const CALIBRATED_DISTANCES: usize = 8;
/// Weight, in observations, of the calibration's prior.
const PRIOR_WEIGHT: f64 = 8.0;

/// Predicts each layer of the current token that a next-gate estimate covers: the estimate's
/// best `top_k + margin` experts. The score of the expert at rank `r` of an estimate made `d`
/// layers ahead is the share of such experts that the layer then routed to, learned online, so
/// that scores are probabilities of being routed (like the other predictors', comparable with
/// the `top_k / num_experts` of chance), not router probabilities, which are flat when a model
/// has many experts. Before any observation the prior is 0.75 within the top-k, 0.25 beyond.
pub struct NextGatePredictor {
    shape: RoutingShape,
    /// Candidates per estimate: `top_k + margin`, at most the experts there are.
    take: usize,
    /// `[distance - 1][rank]`: (routed, observed).
    calibration: Vec<Vec<(u64, u64)>>,
}

impl NextGatePredictor {
    /// `margin`: experts taken from each estimate beyond the top-k.
    pub fn new(shape: RoutingShape, margin: usize) -> Self {
        let take = (shape.top_k + margin).clamp(1, shape.num_experts.max(1));
        NextGatePredictor { shape, take, calibration: vec![vec![(0, 0); take]; CALIBRATED_DISTANCES] }
    }

    /// The calibrated score of rank `rank` of an estimate made `distance` layers ahead.
    fn score(&self, distance: usize, rank: usize) -> f32 {
        let (routed, seen) = self.calibration[distance.clamp(1, CALIBRATED_DISTANCES) - 1][rank];
        let prior = if rank < self.shape.top_k { 0.75 } else { 0.25 };
        ((routed as f64 + prior * PRIOR_WEIGHT) / (seen as f64 + PRIOR_WEIGHT)) as f32
    }
}

impl RoutePredictor for NextGatePredictor {
    fn name(&self) -> &'static str {
        "gate"
    }

    fn learn(&mut self, cursor: &RouteCursor, layer: usize) {
        debug_assert!(cursor.fits(self.shape), "a cursor of another shape");
        let (Some((distance, experts)), Some(routed)) = (cursor.foreseen(layer), cursor.current(layer))
        else {
            return;
        };
        let row = &mut self.calibration[distance.clamp(1, CALIBRATED_DISTANCES) - 1];
        for (rank, &(e, _)) in experts.iter().take(self.take).enumerate() {
            row[rank].0 += u64::from(routed.ascending().binary_search(&e).is_ok());
            row[rank].1 += 1;
        }
    }

    fn predict(&self, cursor: &RouteCursor, depth: usize) -> Vec<Prediction> {
        debug_assert!(cursor.fits(self.shape), "a cursor of another shape");
        cursor
            .targets(depth)
            .filter(|&(_, _, next_token)| !next_token)
            .filter_map(|(distance, layer, _)| {
                let (made, experts) = cursor.foreseen(layer)?;
                let mut experts: Vec<(u32, f32)> = (experts.iter().take(self.take).enumerate())
                    .map(|(rank, &(e, _))| (e, self.score(made, rank)))
                    .collect();
                sort_best_first(&mut experts);
                Some(Prediction { distance, layer, next_token: false, experts })
            })
            .collect()
    }
}

/// Several predictors as one: every member learns from every observation; a layer's prediction
/// scores each expert by the weighted mean of the scores of the members that predicted that
/// layer (a member with nothing to say about a layer does not dilute the others there).
pub struct Ensemble {
    shape: RoutingShape,
    members: Vec<(Box<dyn RoutePredictor>, f32)>,
}

impl Ensemble {
    /// `members` with their weights (positive).
    pub fn new(shape: RoutingShape, members: Vec<(Box<dyn RoutePredictor>, f32)>) -> Self {
        Ensemble { shape, members }
    }
}

/// One distance's blend: (layer, next_token, weighted score sums per expert, the weights of
/// the members that predicted it).
type Blend = (usize, bool, Vec<f32>, f32);

impl RoutePredictor for Ensemble {
    fn name(&self) -> &'static str {
        "ensemble"
    }

    fn learn(&mut self, cursor: &RouteCursor, layer: usize) {
        for (m, _) in &mut self.members {
            m.learn(cursor, layer);
        }
    }

    fn predict(&self, cursor: &RouteCursor, depth: usize) -> Vec<Prediction> {
        let mut by_distance: Vec<Option<Blend>> = vec![None; depth];
        for (m, w) in &self.members {
            for p in m.predict(cursor, depth) {
                let Some(slot) = by_distance.get_mut(p.distance.wrapping_sub(1)) else { continue };
                let entry = slot
                    .get_or_insert_with(|| (p.layer, p.next_token, vec![0.0; self.shape.num_experts], 0.0));
                for &(e, s) in &p.experts {
                    if let Some(sum) = entry.2.get_mut(e as usize) {
                        *sum += w * s;
                    }
                }
                entry.3 += w;
            }
        }
        (by_distance.into_iter().enumerate())
            .filter_map(|(i, slot)| {
                let (layer, next_token, mut sums, weight) = slot?;
                sums.iter_mut().for_each(|s| *s /= weight.max(f32::MIN_POSITIVE));
                let experts = best_candidates(&sums, self.shape.max_candidates());
                Some(Prediction { distance: i + 1, layer, next_token, experts })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{observe, RecencyPredictor};

    const SHAPE: RoutingShape = RoutingShape { moe_layers: 3, num_experts: 8, top_k: 2 };

    #[test]
    fn predicts_the_estimated_layers_with_calibrated_scores() {
        let mut p = NextGatePredictor::new(SHAPE, 1);
        let mut c = RouteCursor::new(SHAPE);
        c.begin_token(None);
        observe(&mut p, &mut c, 0, &[0, 1], &[]);
        c.foresee(Some(0), 1, &[4, 5, 6, 7], &[0.4, 0.3, 0.2, 0.1]);
        let got = p.predict(&c, 3);
        // Layer 1 only: layer 2 has no estimate, and the next token's layers are not the gate's.
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].distance, got[0].layer), (1, 1));
        assert_eq!(got[0].experts, [(4, 0.75), (5, 0.75), (6, 0.25)], "the prior: top-k, then the margin");
        // The estimate's first expert is routed, its second is not, many times: scores follow.
        for _ in 0..100 {
            observe(&mut p, &mut c, 1, &[4, 6], &[]);
        }
        let got = p.predict(
            &{
                let mut c = c.clone();
                c.begin_token(None);
                c.observe(0, &[0, 1], &[]);
                c.foresee(Some(0), 1, &[4, 5, 6], &[0.4, 0.3, 0.2]);
                c
            },
            1,
        );
        let s: Vec<u32> = got[0].experts.iter().map(|&(e, _)| e).collect();
        assert_eq!(s, [4, 6, 5]);
        assert!(got[0].experts[0].1 > 0.95 && got[0].experts[2].1 < 0.1);
    }

    #[test]
    fn the_ensemble_averages_the_members_that_speak() {
        let gate: Box<dyn RoutePredictor> = Box::new(NextGatePredictor::new(SHAPE, 0));
        let e = Ensemble::new(SHAPE, vec![(gate, 3.0), (Box::new(RecencyPredictor), 1.0)]);
        let mut c = RouteCursor::new(SHAPE);
        c.begin_token(None);
        c.observe(0, &[0, 1], &[]);
        c.observe(1, &[2, 3], &[0.5, 0.5]);
        c.observe(2, &[4, 5], &[1.0, 1.0]);
        c.begin_token(None);
        c.observe(0, &[0, 1], &[]);
        c.foresee(Some(0), 1, &[2, 6], &[0.9, 0.1]);
        let got = e.predict(&c, 2);
        // Layer 1: gate (2: 0.75, 6: 0.75) x 3 and recency (2, 3: 0.5) x 1, over weight 4.
        assert_eq!(got[0].experts, [(2, 0.6875), (6, 0.5625), (3, 0.125)]);
        // Layer 2: recency alone, undiluted.
        assert_eq!(got[1].experts, [(4, 1.0), (5, 1.0)]);
    }
}
