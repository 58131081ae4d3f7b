//! Stop sequences over streamed text: text that could still turn into a stop sequence is held
//! back until it cannot, and the output ends just before the first stop sequence (which is not
//! part of it), as OpenAI's `stop` does.

/// Watches a sequence's text for its stop sequences.
#[derive(Clone, Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received and not yet released: a suffix that is a prefix of some stop sequence.
    pending: String,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop sequences are ignored.
    pub fn new(stops: &[String]) -> Self {
        StopMatcher { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), ..Default::default() }
    }

    /// Whether a stop sequence was seen (nothing more is released after it).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Takes the next piece of text; returns what can be released now.
    pub fn push(&mut self, text: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.pending.push_str(text);
        // The earliest stop sequence wins.
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            self.stopped = true;
            let out = self.pending[..at].to_owned();
            self.pending.clear();
            return out;
        }
        let keep = self.held_back();
        let out = self.pending[..self.pending.len() - keep].to_owned();
        self.pending.drain(..self.pending.len() - keep);
        out
    }

    /// The end of the text: whatever was held back is released.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Bytes at the end of `pending` that begin some stop sequence (the longest such suffix).
    fn held_back(&self) -> usize {
        let p = &self.pending;
        let mut best = 0;
        for s in &self.stops {
            let most = s.len().saturating_sub(1).min(p.len());
            for n in (best + 1..=most).rev() {
                let start = p.len() - n;
                if p.is_char_boundary(start) && s.starts_with(&p[start..]) {
                    best = n;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let out: Vec<String> = pieces.iter().map(|p| m.push(p)).collect();
        let stopped = m.stopped();
        (out, stopped, m.finish())
    }

    #[test]
    fn holds_back_what_may_become_a_stop_and_cuts_before_it() {
        // "\n\n" split over pieces: the first newline waits, then both go.
        let (out, stopped, rest) = run(&["\n\n"], &["a", "b\n", "\nc"]);
        assert_eq!(out, ["a", "b", ""]);
        assert!(stopped);
        assert_eq!(rest, "");
        // A false start is released once it cannot match.
        let (out, stopped, _) = run(&["END"], &["xE", "N", "d", "y"]);
        assert_eq!(out, ["x", "", "ENd", "y"]);
        assert!(!stopped);
        // The earliest of several stops wins; nothing after it.
        let (out, stopped, _) = run(&["cd", "b"], &["abcd", "more"]);
        assert_eq!(out, ["a", ""]);
        assert!(stopped);
    }

    #[test]
    fn releases_the_held_tail_at_the_end_and_respects_characters() {
        let (out, stopped, rest) = run(&["éx"], &["aé"]);
        assert_eq!(out, ["a"]);
        assert!(!stopped);
        assert_eq!(rest, "é");
        // No stops: everything goes at once.
        let (out, _, rest) = run(&[], &["a", "b"]);
        assert_eq!((out, rest), (vec!["a".to_owned(), "b".to_owned()], String::new()));
    }
}
