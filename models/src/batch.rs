//! What one forward pass runs: token rows of one or more sequences, each row knowing its
//! sequence and position. Prefill chunks of some sequences and decode tokens of others share a
//! batch (continuous batching); everything but attention is row-wise, and attention runs per
//! sequence over its own KV blocks.

use std::ops::Range;

/// Identifies a sequence (a request) for its whole life in the engine.
pub type SeqId = u64;

/// One token of the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub seq: SeqId,
    pub token: u32,
    /// Position of the token in its sequence (0 = the first prompt token).
    pub pos: usize,
}

/// The rows of one sequence in a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub seq: SeqId,
    /// Its rows in [`Batch::rows`]: contiguous, at consecutive positions.
    pub rows: Range<usize>,
}

/// Which rows of a pushed span the forward pass returns logits for: each row's logits are the
/// distribution of the token after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// None (a prompt chunk that is not the prompt's last).
    None,
    /// The last row's only: the next token's distribution, to sample from.
    Last,
    /// Every row's: what the model predicted after each token (prompt log-probabilities).
    All,
}

/// Token rows for one forward pass. Invariants (kept by [`Batch::push`]): each sequence appears
/// in one span, its rows contiguous and at consecutive positions; `logits` lists row indices in
/// increasing order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    rows: Vec<Row>,
    spans: Vec<Span>,
    logits: Vec<usize>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `tokens` of `seq` at positions `first_pos..`; the forward pass returns the logits
    /// after the rows `logits` names, in row order. Empty `tokens` add nothing. The forward pass
    /// checks that `first_pos` is where the sequence's KV cache ends.
    pub fn push(&mut self, seq: SeqId, first_pos: usize, tokens: &[u32], logits: Logits) {
        if tokens.is_empty() {
            return;
        }
        let start = self.rows.len();
        self.rows.extend(tokens.iter().enumerate().map(|(i, &token)| Row { seq, token, pos: first_pos + i }));
        self.spans.push(Span { seq, rows: start..self.rows.len() });
        match logits {
            Logits::None => {}
            Logits::Last => self.logits.push(self.rows.len() - 1),
            Logits::All => self.logits.extend(start..self.rows.len()),
        }
    }

    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// One span per sequence, in the order they were pushed.
    pub fn spans(&self) -> &[Span] {
        &self.spans
    }

    /// Rows whose logits the forward pass returns, in this order.
    pub fn logit_rows(&self) -> &[usize] {
        &self.logits
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_spans_and_logit_rows() {
        let mut b = Batch::new();
        b.push(7, 0, &[1, 2, 3], Logits::Last);
        b.push(9, 12, &[4], Logits::Last);
        b.push(3, 4, &[], Logits::All);
        b.push(5, 2, &[6, 6], Logits::None);
        b.push(2, 0, &[8, 9, 10], Logits::All);
        assert_eq!(b.len(), 9);
        assert_eq!(b.rows()[4], Row { seq: 5, token: 6, pos: 2 });
        assert_eq!(b.rows()[3], Row { seq: 9, token: 4, pos: 12 });
        assert_eq!(
            b.spans().iter().map(|s| (s.seq, s.rows.clone())).collect::<Vec<_>>(),
            [(7, 0..3), (9, 3..4), (5, 4..6), (2, 6..9)]
        );
        assert_eq!(b.logit_rows(), [2, 3, 6, 7, 8]);
    }
}
