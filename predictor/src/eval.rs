//! Measuring predictors on recorded routing: recall and precision of the top-k predicted experts
//! per layer distance, on tokens the predictor did not train on.

use std::collections::HashMap;
use std::fmt;

use crate::trace::sequence_neighbours;
use crate::{observe, Prediction, RoutePredictor, SequenceCursors, TokenRouting};

/// Counts behind recall and precision for one kind of prediction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hits {
    /// Predictions scored (one per origin and target layer whose routing is known).
    pub events: u64,
    /// Predicted experts (at most k per event) that the target layer did use.
    pub hits: u64,
    /// Experts the target layers used.
    pub actual: u64,
    /// Experts predicted (at most k per event).
    pub predicted: u64,
}

impl Hits {
    /// Fraction of the experts actually used that were predicted (recall@k).
    pub fn recall(&self) -> f64 {
        ratio(self.hits, self.actual)
    }

    /// Fraction of the predicted experts that were used.
    pub fn precision(&self) -> f64 {
        ratio(self.hits, self.predicted)
    }

    fn add(&mut self, other: Hits) {
        self.events += other.events;
        self.hits += other.hits;
        self.actual += other.actual;
        self.predicted += other.predicted;
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Results at one distance, split by where the prediction was made from and what it targets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DistanceStats {
    pub distance: usize,
    /// Made after observing a layer, for a later layer of the same token.
    pub within: Hits,
    /// Made at `begin_token` (token id known, no layer observed), for the token's first layers.
    pub token_start: Hits,
    /// Made after observing a layer, for a layer of the next token.
    pub next_token: Hits,
}

impl DistanceStats {
    /// All three kinds together.
    pub fn all(&self) -> Hits {
        let mut h = self.within;
        h.add(self.token_start);
        h.add(self.next_token);
        h
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub predictor: String,
    /// Experts taken from the top of each prediction.
    pub k: usize,
    /// Tokens evaluated.
    pub tokens: usize,
    /// One entry per distance, 1 first.
    pub distances: Vec<DistanceStats>,
}

impl fmt::Display for Report {
    /// One line per distance: recall@k and precision within the token, at token start, into the
    /// next token, and overall.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} (k={}, {} tokens)", self.predictor, self.k, self.tokens)?;
        writeln!(f, "  d  within rec/prec  start rec/prec  next-token rec/prec  all rec/prec")?;
        for d in &self.distances {
            let cell = |h: Hits| format!("{:.3}/{:.3}", h.recall(), h.precision());
            writeln!(
                f,
                "  {}  {:>15}  {:>14}  {:>19}  {:>12}",
                d.distance,
                cell(d.within),
                cell(d.token_start),
                cell(d.next_token),
                cell(d.all())
            )?;
        }
        Ok(())
    }
}

/// Hands `cursor` the next-gate estimates `token` recorded at MoE layer `at` (`None`: at its
/// start): what the engine does right after observing that layer (or beginning the token).
pub fn foresee_at(cursor: &mut crate::RouteCursor, token: &TokenRouting, at: Option<usize>) {
    for f in token.ahead_at(at) {
        cursor.foresee(at, f.layer, &f.experts, &f.probs);
    }
}

/// Feeds `tokens` to `predictor` in order, as the engine would, without scoring: how online
/// predictors learn from a trace before being evaluated on the rest. Each sequence moves its own
/// cursor in `cursors`, so a later [`evaluate`] continues where its sequences stopped.
pub fn replay(predictor: &mut dyn RoutePredictor, cursors: &mut SequenceCursors, tokens: &[TokenRouting]) {
    for token in tokens {
        let cursor = cursors.of(token.seq);
        cursor.begin_token(token.token_id);
        foresee_at(cursor, token, None);
        for (layer, choice) in token.layers.iter().enumerate() {
            if let Some(c) = choice {
                observe(predictor, cursor, layer, &c.experts, &c.weights);
                foresee_at(cursor, token, Some(layer));
            }
        }
    }
}

/// Runs `predictor` over `tokens` in order and scores every prediction for distances
/// `1..=depth`: at each token start and after each observed layer, the top `k` predicted experts
/// are compared with those the target layer used (the next token being the next one of the same
/// sequence). Targets whose routing is not recorded are skipped. Each sequence moves its own
/// cursor in `cursors`; online predictors keep learning as they go, as they would live.
pub fn evaluate(
    predictor: &mut dyn RoutePredictor,
    cursors: &mut SequenceCursors,
    tokens: &[TokenRouting],
    depth: usize,
    k: usize,
) -> Report {
    let mut distances: Vec<DistanceStats> =
        (1..=depth).map(|distance| DistanceStats { distance, ..Default::default() }).collect();
    let neighbours = sequence_neighbours(tokens);
    for (token, &(_, next)) in tokens.iter().zip(&neighbours) {
        let next = next.map(|n| &tokens[n]);
        let cursor = cursors.of(token.seq);
        cursor.begin_token(token.token_id);
        foresee_at(cursor, token, None);
        score(&predictor.predict(cursor, depth), true, token, next, k, &mut distances);
        for (layer, choice) in token.layers.iter().enumerate() {
            if let Some(c) = choice {
                observe(predictor, cursor, layer, &c.experts, &c.weights);
                foresee_at(cursor, token, Some(layer));
                score(&predictor.predict(cursor, depth), false, token, next, k, &mut distances);
            }
        }
    }
    Report { predictor: predictor.name().to_string(), k, tokens: tokens.len(), distances }
}

fn score(
    predictions: &[Prediction],
    at_start: bool,
    token: &TokenRouting,
    next: Option<&TokenRouting>,
    k: usize,
    out: &mut [DistanceStats],
) {
    for p in predictions {
        let target = if p.next_token { next } else { Some(token) };
        let Some(Some(actual)) = target.and_then(|t| t.layers.get(p.layer)) else { continue };
        let Some(stats) = out.get_mut(p.distance.wrapping_sub(1)) else { continue };
        let top = &p.experts[..k.min(p.experts.len())];
        let hits = top.iter().filter(|(e, _)| actual.experts.contains(e)).count();
        let h = Hits {
            events: 1,
            hits: hits as u64,
            actual: actual.experts.len() as u64,
            predicted: top.len() as u64,
        };
        match (p.next_token, at_start) {
            (true, _) => stats.next_token.add(h),
            (false, true) => stats.token_start.add(h),
            (false, false) => stats.within.add(h),
        }
    }
}

/// Training and held-out tokens, each in trace order.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    pub train: Vec<TokenRouting>,
    pub test: Vec<TokenRouting>,
}

/// Holds out about `holdout` (a fraction in [0, 1]) of the tokens. A trace of one sequence is
/// split by token order (train on the first part, test on the rest). A trace of several is split
/// by whole sequences, taking the last-started ones until the held-out share is reached, so no
/// sequence is seen in part. Both sides keep at least one token or sequence when there are two.
pub fn split_holdout(tokens: &[TokenRouting], holdout: f64) -> Split {
    let holdout = if holdout.is_finite() { holdout.clamp(0.0, 1.0) } else { 0.0 };
    let want = (holdout * tokens.len() as f64).round() as usize;
    // Sequences in order of first appearance, with their token counts.
    let mut order: Vec<u64> = Vec::new();
    let mut count: HashMap<u64, usize> = HashMap::new();
    for t in tokens {
        *count.entry(t.seq).or_insert_with(|| {
            order.push(t.seq);
            0
        }) += 1;
    }
    if order.len() <= 1 {
        let keep = if tokens.len() >= 2 { want.clamp(1, tokens.len() - 1) } else { want.min(tokens.len()) };
        let cut = tokens.len() - keep;
        return Split { train: tokens[..cut].to_vec(), test: tokens[cut..].to_vec() };
    }
    let mut held = Vec::new();
    let mut held_tokens = 0;
    for &seq in order.iter().rev().take(order.len() - 1) {
        if held_tokens >= want && !held.is_empty() {
            break;
        }
        held.push(seq);
        held_tokens += count[&seq];
    }
    let (test, train): (Vec<TokenRouting>, Vec<TokenRouting>) =
        tokens.iter().cloned().partition(|t| held.contains(&t.seq));
    Split { train, test }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LayerChoice, Phase, RecencyPredictor, RoutingShape};

    fn token(seq: u64, pos: u32, layers: &[Option<&[u32]>]) -> TokenRouting {
        TokenRouting {
            horizon: None,
            ahead: Vec::new(),
            seq,
            pos,
            step: None,
            token_id: Some(pos),
            phase: Phase::Prefill,
            layers: layers
                .iter()
                .map(|l| l.map(|e| LayerChoice { experts: e.to_vec(), weights: vec![] }))
                .collect(),
        }
    }

    #[test]
    fn recency_scores_match_a_hand_count() {
        // Two layers, top-2. Token 1 repeats token 0 at layer 0 and half of it at layer 1.
        let tokens =
            [token(0, 0, &[Some(&[0, 1]), Some(&[2, 3])]), token(0, 1, &[Some(&[0, 1]), Some(&[2, 4])])];
        let shape = RoutingShape { moe_layers: 2, num_experts: 5, top_k: 2 };
        let r = evaluate(&mut RecencyPredictor, &mut SequenceCursors::new(shape), &tokens, 2, 2);
        let (d1, d2) = (r.distances[0], r.distances[1]);
        // Distance 1 within a token: after layer 0, layer 1 predicted from the previous token's:
        // token 0 has no history (predicts nothing), token 1 gets {2,3} vs {2,4}.
        assert_eq!(d1.within, Hits { events: 2, hits: 1, actual: 4, predicted: 2 });
        // Token start, distance 1 = layer 0: token 1 predicted {0,1} exactly.
        assert_eq!(d1.token_start, Hits { events: 2, hits: 2, actual: 4, predicted: 2 });
        // After layer 1, distance 1 = the next token's layer 0 (only token 0 has a next token).
        assert_eq!(d1.next_token, Hits { events: 1, hits: 2, actual: 2, predicted: 2 });
        assert_eq!(d1.all().recall(), 5.0 / 10.0);
        assert_eq!(d1.all().precision(), 5.0 / 6.0);
        // Distance 2: token start -> layer 1 (token 1: 1 hit); after layer 0 -> next layer 0
        // (token 0 -> token 1: 2 hits); after layer 1 -> next layer 1 (token 0 -> 1: 1 hit).
        assert_eq!(d2.token_start.hits, 1);
        assert_eq!(d2.next_token, Hits { events: 2, hits: 3, actual: 4, predicted: 4 });
        assert_eq!(r.tokens, 2);
    }

    #[test]
    fn missing_layers_are_neither_observed_nor_scored() {
        let tokens = [token(0, 0, &[Some(&[0]), None]), token(0, 1, &[Some(&[0]), None])];
        let shape = RoutingShape { moe_layers: 2, num_experts: 2, top_k: 1 };
        let r = evaluate(&mut RecencyPredictor, &mut SequenceCursors::new(shape), &tokens, 1, 1);
        assert_eq!(r.distances[0].within.events, 0);
        // Token 0 starts with no history (nothing predicted), token 1 gets layer 0 right.
        assert_eq!(r.distances[0].token_start, Hits { events: 2, hits: 1, actual: 2, predicted: 1 });
    }

    #[test]
    fn interleaved_sequences_are_scored_against_their_own_tokens() {
        // Sequence 0 always routes [0], sequence 1 [1]; one layer, tokens 0, 1, 0, 1.
        let tokens = [
            token(0, 0, &[Some(&[0])]),
            token(1, 0, &[Some(&[1])]),
            token(0, 1, &[Some(&[0])]),
            token(1, 1, &[Some(&[1])]),
        ];
        let shape = RoutingShape { moe_layers: 1, num_experts: 2, top_k: 1 };
        let mut cursors = SequenceCursors::new(shape);
        let r = evaluate(&mut RecencyPredictor, &mut cursors, &tokens, 1, 1);
        // Each sequence's second token start is predicted from its own first token, and each
        // first token's next-token prediction is scored against its own sequence's next token.
        let d1 = r.distances[0];
        assert_eq!(d1.token_start, Hits { events: 4, hits: 2, actual: 4, predicted: 2 });
        assert_eq!(d1.next_token, Hits { events: 2, hits: 2, actual: 2, predicted: 2 });
        assert_eq!(cursors.sequences(), 2);
    }

    #[test]
    fn single_sequence_splits_by_token_order() {
        let tokens: Vec<_> = (0..10).map(|p| token(0, p, &[])).collect();
        let s = split_holdout(&tokens, 0.2);
        assert_eq!(s.train.iter().map(|t| t.pos).collect::<Vec<_>>(), (0..8).collect::<Vec<_>>());
        assert_eq!(s.test.iter().map(|t| t.pos).collect::<Vec<_>>(), [8, 9]);
        assert_eq!(split_holdout(&tokens, 0.0).test.len(), 1, "both sides keep a token");
        assert_eq!(split_holdout(&tokens, 1.0).train.len(), 1);
    }

    #[test]
    fn multi_sequence_splits_by_whole_sequences() {
        // Interleaved sequences 0, 1, 2 with 4, 3, 3 tokens: 20% of 10 tokens = 2, so the last
        // sequence to start (2) is held out whole.
        let seqs = [0, 0, 1, 0, 1, 2, 1, 2, 0, 2];
        let tokens: Vec<_> = seqs.iter().enumerate().map(|(i, &s)| token(s, i as u32, &[])).collect();
        let s = split_holdout(&tokens, 0.2);
        assert!(s.test.iter().all(|t| t.seq == 2) && s.test.len() == 3);
        assert_eq!(s.train.len(), 7);
        // 50% needs sequences 2 and 1.
        let s = split_holdout(&tokens, 0.5);
        assert_eq!(s.train.iter().map(|t| t.seq).collect::<Vec<_>>(), [0, 0, 0, 0]);
    }
}
