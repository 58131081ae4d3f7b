//! Per-sequence routing state: where a sequence stands on its routing path and what it routed.
//! Predictors read it; they keep only what they learn across sequences, so one predictor serves
//! every sequence of a batch while the engine keeps one [`RouteCursor`] per sequence.

use std::collections::HashMap;

use crate::{sort_best_first, RoutingShape};

/// One MoE layer's routing of one token as a cursor keeps it: the experts in range, each once,
/// with their gate weights (clamped to [0, 1]; 1 where the weights were not given), in three
/// orders so that no predictor sorts on its hot path.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routed {
    in_router_order: Vec<(u32, f32)>,
    best_first: Vec<(u32, f32)>,
    ascending: Vec<u32>,
}

impl Routed {
    /// Experts with weights in the order the router listed them (best first, as routers rank).
    pub fn in_router_order(&self) -> &[(u32, f32)] {
        &self.in_router_order
    }

    /// Experts with weights, best weight first (ties to the lower expert index).
    pub fn best_first(&self) -> &[(u32, f32)] {
        &self.best_first
    }

    /// Expert ids, ascending.
    pub fn ascending(&self) -> &[u32] {
        &self.ascending
    }

    /// Replaces the contents with `experts` (router order) and their `weights` (parallel, or
    /// anything else when unknown), keeping the allocations.
    fn set(&mut self, experts: &[u32], weights: &[f32], num_experts: usize) {
        self.in_router_order.clear();
        for (i, &e) in experts.iter().enumerate() {
            if (e as usize) < num_experts && !self.in_router_order.iter().any(|&(x, _)| x == e) {
                let w = if weights.len() == experts.len() { weights[i].clamp(0.0, 1.0) } else { 1.0 };
                self.in_router_order.push((e, w));
            }
        }
        self.best_first.clear();
        self.best_first.extend_from_slice(&self.in_router_order);
        sort_best_first(&mut self.best_first);
        self.ascending.clear();
        self.ascending.extend(self.in_router_order.iter().map(|&(e, _)| e));
        self.ascending.sort_unstable();
    }
}

/// Where the cursor stands within the current token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Position {
    /// `begin_token` was called and no layer of the token observed yet.
    TokenStart,
    /// Layer `l` of the current token was observed last.
    After(usize),
}

/// One layer's routing by one token of the sequence.
#[derive(Clone, Debug, Default)]
struct Slot {
    /// The token (index in the sequence, see [`RouteCursor::token`]) that routed `routed`;
    /// `None` while the slot is empty.
    token: Option<u64>,
    routed: Routed,
}

/// A layer's two latest routings, by different tokens: enough for the current token's, the
/// previous token's and the latest one before the current token, whichever layers were skipped.
#[derive(Clone, Debug, Default)]
struct LayerHistory {
    newest: Slot,
    /// The latest routing by a token before `newest`'s.
    older: Slot,
}

/// A next-gate estimate of one layer of the current token (see [`RouteCursor::foresee`]).
#[derive(Clone, Debug, Default)]
struct ForeseenSlot {
    /// The token it was made for; `None` while empty.
    token: Option<u64>,
    /// MoE layers between the layer it was made at and the estimated one.
    distance: usize,
    /// Best first.
    experts: Vec<(u32, f32)>,
}

/// Where one sequence stands on its routing path and what it has routed: the per-sequence
/// state every predictor reads. The engine keeps one per sequence, the simulator and
/// [`crate::evaluate`] one per traced `seq`; predictors keep only what they learn across
/// sequences.
#[derive(Clone, Debug)]
pub struct RouteCursor {
    shape: RoutingShape,
    token_id: Option<u32>,
    /// Index of the current token in the sequence: the number of `begin_token` calls (routing
    /// observed before the first call belongs to token 0).
    token: u64,
    position: Position,
    /// The previous token's last observed layer.
    previous_last: Option<usize>,
    /// Indexed by MoE layer.
    layers: Vec<LayerHistory>,
    /// Indexed by MoE layer: the latest next-gate estimate for the current token.
    foreseen: Vec<ForeseenSlot>,
}

impl RouteCursor {
    pub fn new(shape: RoutingShape) -> Self {
        RouteCursor {
            shape,
            token_id: None,
            token: 0,
            position: Position::TokenStart,
            previous_last: None,
            layers: vec![LayerHistory::default(); shape.moe_layers],
            foreseen: vec![ForeseenSlot::default(); shape.moe_layers],
        }
    }

    pub fn shape(&self) -> RoutingShape {
        self.shape
    }

    /// Whether a predictor built for `shape` can read this cursor: the same MoE layers and
    /// experts (`top_k` may differ; the cursor does not use it).
    pub(crate) fn fits(&self, shape: RoutingShape) -> bool {
        (self.shape.moe_layers, self.shape.num_experts) == (shape.moe_layers, shape.num_experts)
    }

    /// A new token starts (its id when known): the current token's routing becomes the
    /// previous one's. O(1): nothing is copied or cleared.
    pub fn begin_token(&mut self, token_id: Option<u32>) {
        self.previous_last = self.last_layer();
        self.token += 1;
        self.token_id = token_id;
        self.position = Position::TokenStart;
    }

    /// Records MoE layer `layer`'s routing of the current token: `experts` in router order
    /// (best first), `weights` parallel to it or empty when unknown. Out-of-range layers and
    /// experts are ignored (no error channel on this hot path), duplicate experts counted once.
    /// A layer whose experts are all out of range is still observed, with no experts.
    pub fn observe(&mut self, layer: usize, experts: &[u32], weights: &[f32]) {
        let Some(h) = self.layers.get_mut(layer) else { return };
        if h.newest.token != Some(self.token) {
            // The newest routing becomes the older one; the oldest one's buffers are reused.
            std::mem::swap(&mut h.newest, &mut h.older);
            h.newest.token = Some(self.token);
        }
        h.newest.routed.set(experts, weights, self.shape.num_experts);
        self.position = Position::After(layer);
    }

    /// Records a next-gate estimate for the current token, made at MoE layer `at` (`None`: at
    /// the token's start) for the later MoE layer `layer`: `experts` best first with their
    /// router `probs` (parallel). Replaces any earlier estimate of that layer (a later one is
    /// made from a nearer hidden state). Out-of-range layers and experts are ignored, like
    /// [`RouteCursor::observe`]'s.
    pub fn foresee(&mut self, at: Option<usize>, layer: usize, experts: &[u32], probs: &[f32]) {
        // Distances count as `targets` does: from the token start, layer 0 is 1 ahead.
        let distance = match at {
            Some(at) if layer <= at => return,
            Some(at) => layer - at,
            None => layer + 1,
        };
        let (token, num_experts) = (self.token, self.shape.num_experts);
        let Some(slot) = self.foreseen.get_mut(layer) else { return };
        slot.token = Some(token);
        slot.distance = distance;
        slot.experts.clear();
        for (i, &e) in experts.iter().enumerate() {
            if (e as usize) < num_experts && !slot.experts.iter().any(|&(x, _)| x == e) {
                let p = probs.get(i).copied().filter(|p| p.is_finite()).unwrap_or(0.0);
                slot.experts.push((e, p.clamp(0.0, 1.0)));
            }
        }
    }

    /// The current token's latest next-gate estimate of `layer`: how many MoE layers ahead it
    /// was made, and its experts best first with their router probabilities.
    pub fn foreseen(&self, layer: usize) -> Option<(usize, &[(u32, f32)])> {
        let slot = self.foreseen.get(layer)?;
        (slot.token == Some(self.token)).then_some((slot.distance, &slot.experts[..]))
    }

    pub fn token_id(&self) -> Option<u32> {
        self.token_id
    }

    /// The current token's last observed MoE layer; `None` right after `begin_token`.
    pub fn last_layer(&self) -> Option<usize> {
        match self.position {
            Position::TokenStart => None,
            Position::After(l) => Some(l),
        }
    }

    /// The previous token's last observed MoE layer (`None` for the first token, or when the
    /// previous token observed none).
    pub fn previous_last_layer(&self) -> Option<usize> {
        self.previous_last
    }

    /// The current token's routing of `layer`, if observed.
    pub fn current(&self, layer: usize) -> Option<&Routed> {
        let h = self.layers.get(layer)?;
        (h.newest.token == Some(self.token)).then_some(&h.newest.routed)
    }

    /// The previous token's routing of `layer`, if it observed that layer.
    pub fn previous(&self, layer: usize) -> Option<&Routed> {
        let (h, previous) = (self.layers.get(layer)?, self.token.checked_sub(1)?);
        [&h.newest, &h.older].into_iter().find(|s| s.token == Some(previous)).map(|s| &s.routed)
    }

    /// The sequence's latest routing of `layer`: the current token's once observed, otherwise
    /// the latest earlier token's that observed it (the previous token's unless it skipped it).
    pub fn latest(&self, layer: usize) -> Option<&Routed> {
        let h = self.layers.get(layer)?;
        h.newest.token.map(|_| &h.newest.routed)
    }

    /// The `(distance, layer, next_token)` targets at distances `1..=depth`, nearest first,
    /// stopping at the next token's last layer (no predictor looks two tokens ahead).
    pub(crate) fn targets(&self, depth: usize) -> impl Iterator<Item = (usize, usize, bool)> {
        let layers = self.shape.moe_layers;
        // Position of the first target, counted in layers from the current token's layer 0.
        let first = match self.position {
            Position::TokenStart => 0,
            Position::After(l) => l + 1,
        };
        let depth = depth.min((2 * layers).saturating_sub(first));
        (1..=depth).map(move |d| {
            let pos = first + d - 1;
            (d, pos % layers, pos >= layers)
        })
    }
}

/// One [`RouteCursor`] per sequence of a trace (`TokenRouting::seq`), each created at its
/// sequence's first token: how [`crate::replay`], [`crate::evaluate`] and the simulator walk a
/// trace of interleaved sequences with one shared predictor.
#[derive(Clone, Debug)]
pub struct SequenceCursors {
    shape: RoutingShape,
    by_seq: HashMap<u64, RouteCursor>,
}

impl SequenceCursors {
    pub fn new(shape: RoutingShape) -> Self {
        SequenceCursors { shape, by_seq: HashMap::new() }
    }

    /// Sequence `seq`'s cursor, new (nothing routed yet) on its first use.
    pub fn of(&mut self, seq: u64) -> &mut RouteCursor {
        let shape = self.shape;
        self.by_seq.entry(seq).or_insert_with(|| RouteCursor::new(shape))
    }

    /// Sequences seen so far.
    pub fn sequences(&self) -> usize {
        self.by_seq.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: RoutingShape = RoutingShape { moe_layers: 3, num_experts: 4, top_k: 2 };

    fn ids(r: Option<&Routed>) -> Option<Vec<u32>> {
        r.map(|r| r.in_router_order().iter().map(|&(e, _)| e).collect())
    }

    #[test]
    fn begin_token_moves_the_current_routing_to_the_previous() {
        let mut c = RouteCursor::new(SHAPE);
        assert_eq!((c.last_layer(), c.previous_last_layer(), c.token_id()), (None, None, None));
        c.begin_token(Some(7));
        c.observe(0, &[1, 3], &[0.25, 0.75]);
        c.observe(1, &[2], &[]);
        assert_eq!((c.token_id(), c.last_layer()), (Some(7), Some(1)));
        assert_eq!(ids(c.current(0)), Some(vec![1, 3]));
        assert_eq!(c.current(0).unwrap().best_first(), [(3, 0.75), (1, 0.25)]);
        assert_eq!(c.current(0).unwrap().ascending(), [1, 3]);
        assert_eq!(c.current(1).unwrap().best_first(), [(2, 1.0)], "unknown weights count as 1");
        assert_eq!((c.current(2), c.previous(0)), (None, None));

        c.begin_token(None);
        assert_eq!((c.token_id(), c.last_layer(), c.previous_last_layer()), (None, None, Some(1)));
        assert_eq!((c.current(0), ids(c.previous(0))), (None, Some(vec![1, 3])));
        c.observe(0, &[0], &[]);
        assert_eq!((ids(c.current(0)), ids(c.previous(0))), (Some(vec![0]), Some(vec![1, 3])));
        // The latest routing of a layer is the current token's once observed, else the last
        // token's that observed it.
        assert_eq!((ids(c.latest(0)), ids(c.latest(1)), c.latest(2)), (Some(vec![0]), Some(vec![2]), None));

        // Two tokens later, layer 1 (skipped since) is neither current nor previous, but latest.
        c.begin_token(None);
        assert_eq!(
            (c.previous(1), ids(c.previous(0)), c.previous_last_layer()),
            (None, Some(vec![0]), Some(0))
        );
        assert_eq!(ids(c.latest(1)), Some(vec![2]));
        c.begin_token(None);
        assert_eq!((c.previous(0), c.previous_last_layer()), (None, None), "an empty token breaks the chain");
    }

    #[test]
    fn out_of_range_inputs_are_ignored_and_duplicates_counted_once() {
        let mut c = RouteCursor::new(SHAPE);
        c.begin_token(None);
        c.observe(3, &[0], &[]);
        assert_eq!(c.last_layer(), None, "a layer beyond the shape is not observed");
        c.observe(0, &[9, 2, 2, 1], &[0.5, 0.3, 0.1, 0.1]);
        assert_eq!(c.current(0).unwrap().in_router_order(), [(2, 0.3), (1, 0.1)]);
        assert_eq!(c.current(0).unwrap().ascending(), [1, 2]);
        // Weights not parallel to the experts are unknown; all experts out of range still
        // observe the layer, with nothing chosen.
        c.observe(1, &[0, 1], &[0.5]);
        assert_eq!(c.current(1).unwrap().best_first(), [(0, 1.0), (1, 1.0)]);
        c.observe(2, &[4, 5], &[]);
        assert_eq!((c.last_layer(), c.current(2).unwrap().ascending()), (Some(2), &[][..]));
        // Observing a layer again within the token replaces its routing.
        c.observe(0, &[3], &[2.0]);
        assert_eq!(c.current(0).unwrap().best_first(), [(3, 1.0)]);
        c.begin_token(None);
        assert_eq!(ids(c.previous(0)), Some(vec![3]));
    }

    #[test]
    fn targets_wrap_into_the_next_token_and_stop_at_its_last_layer() {
        let mut c = RouteCursor::new(SHAPE);
        let targets = |c: &RouteCursor, depth| c.targets(depth).collect::<Vec<_>>();
        assert_eq!(targets(&c, 2), [(1, 0, false), (2, 1, false)]);
        assert_eq!(targets(&c, 100).len(), 6);
        c.observe(1, &[0], &[]);
        assert_eq!(targets(&c, 3), [(1, 2, false), (2, 0, true), (3, 1, true)]);
        assert_eq!(targets(&c, 100).len(), 4);
    }

    #[test]
    fn estimates_belong_to_their_token_and_the_latest_wins() {
        let mut c = RouteCursor::new(SHAPE);
        c.begin_token(None);
        c.observe(0, &[1], &[]);
        c.foresee(Some(0), 2, &[3, 9, 3, 1], &[0.5, 0.4, 0.3, f32::NAN]);
        assert_eq!(c.foreseen(2), Some((2, &[(3, 0.5), (1, 0.0)][..])), "out of range and repeats dropped");
        c.foresee(Some(1), 2, &[2], &[0.9]);
        assert_eq!(c.foreseen(2), Some((1, &[(2, 0.9)][..])));
        c.foresee(Some(2), 1, &[2], &[0.9]);
        assert_eq!(c.foreseen(1), None, "an estimate is of a layer ahead");
        c.begin_token(None);
        assert_eq!(c.foreseen(2), None, "estimates are the token's own");
        c.foresee(None, 0, &[1], &[0.5]);
        assert_eq!(c.foreseen(0), Some((1, &[(1, 0.5)][..])), "from the token start, layer 0 is 1 ahead");
    }

    #[test]
    fn sequence_cursors_are_created_once_per_sequence() {
        let mut cursors = SequenceCursors::new(SHAPE);
        cursors.of(5).begin_token(Some(1));
        cursors.of(9).begin_token(Some(2));
        assert_eq!((cursors.of(5).token_id(), cursors.sequences()), (Some(1), 2));
    }
}
