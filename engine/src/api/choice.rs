//! One choice of an OpenAI request as its engine events arrive: the text it releases (through
//! its stop sequences), its token count, and how it ends. The server and batch jobs both drive
//! their choices with it; it does no I/O.

use super::stop::StopMatcher;
use crate::engine::{Event, FinishReason};

/// What one event did to a choice.
#[derive(Debug, Default, PartialEq)]
pub struct Update {
    /// Text released (possibly empty).
    pub text: String,
    /// Set when the choice ended: its finish reason (`stop` or `length`) or why it failed.
    pub end: Option<Result<&'static str, String>>,
    /// A token arrived (for latency metrics).
    pub token: bool,
    /// A stop sequence matched: the caller should cancel the sequence (its later tokens are
    /// not wanted).
    pub cancel: bool,
}

/// See the module docs.
#[derive(Debug)]
pub struct ChoiceState {
    stop: StopMatcher,
    /// Tokens received (generated for this choice and not cut by a stop sequence).
    pub tokens: usize,
    ended: bool,
}

impl ChoiceState {
    pub fn new(stops: &[String]) -> Self {
        ChoiceState { stop: StopMatcher::new(stops), tokens: 0, ended: false }
    }

    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Applies the next event (`None`: the engine went away).
    pub fn apply(&mut self, event: Option<Event>) -> Update {
        let mut u = Update::default();
        if self.ended {
            return u;
        }
        match event {
            Some(Event::Token { text, .. }) => {
                self.tokens += 1;
                u.token = true;
                u.text = self.stop.push(&text);
                if self.stop.stopped() {
                    u.cancel = true;
                    u.end = Some(Ok("stop"));
                }
            }
            Some(Event::Finished(c)) => {
                u.text = self.stop.push(&c.tail);
                u.text.push_str(&self.stop.finish());
                let stop = self.stop.stopped() || c.finish_reason == FinishReason::Stop;
                u.end = Some(Ok(if stop { "stop" } else { "length" }));
            }
            Some(Event::Failed(msg)) => u.end = Some(Err(msg)),
            None => u.end = Some(Err("the engine stopped before finishing the request".into())),
        }
        self.ended = u.end.is_some();
        u
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(t: &str) -> Option<Event> {
        Some(Event::Token { id: 0, text: t.into() })
    }

    #[test]
    fn stop_sequences_end_and_cancel_and_nothing_follows() {
        let mut c = ChoiceState::new(&["\n".to_owned()]);
        assert_eq!(c.apply(token("ab")).text, "ab");
        let u = c.apply(token("c\nd"));
        assert_eq!((u.text.as_str(), u.end.clone(), u.cancel), ("c", Some(Ok("stop")), true));
        assert!(c.ended());
        assert_eq!(c.apply(Some(Event::Failed("cancelled".into()))), Update::default());
        assert_eq!(c.tokens, 2);
    }

    #[test]
    fn failures_and_a_vanished_engine_end_the_choice() {
        let mut c = ChoiceState::new(&[]);
        assert_eq!(c.apply(Some(Event::Failed("read".into()))).end, Some(Err("read".into())));
        let mut c = ChoiceState::new(&[]);
        assert!(matches!(c.apply(None).end, Some(Err(m)) if m.contains("engine stopped")));
    }
}
