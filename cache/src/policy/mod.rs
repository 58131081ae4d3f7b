//! Replacement policies. A policy tracks the resident keys and names a victim when the cache
//! needs room; the [`crate::Cache`] owns the values and the byte accounting.
//!
//! Configs name a policy (`lru`, `lfu`, `predictive`); [`by_name`] builds it. Belady's optimal
//! policy needs the future, so only the simulator builds it, from the trace.

mod belady;
mod lfu;
mod lru;
mod predictive;

pub use belady::BeladyPolicy;
pub use lfu::LfuPolicy;
pub use lru::LruPolicy;
pub use predictive::{Candidate, Lookahead, LookaheadParams, PredictivePolicy};

use crate::ExpertKey;

pub trait Policy: Send {
    /// Name used in configs and reports (`lru`, `lfu`, ...).
    fn name(&self) -> &'static str;
    /// A key became resident.
    fn on_insert(&mut self, key: ExpertKey);
    /// A resident key was used.
    fn on_hit(&mut self, key: ExpertKey);
    /// A key left the cache (evicted or removed).
    fn on_remove(&mut self, key: ExpertKey);
    /// The resident key to evict next, skipping keys for which `skip` is true; `None` if every
    /// resident key is skipped.
    fn victim(&mut self, skip: &dyn Fn(&ExpertKey) -> bool) -> Option<ExpertKey>;
}

/// The policies a config can name (Belady needs the future and is not among them).
pub const POLICY_NAMES: [&str; 3] = ["lru", "lfu", "predictive"];

/// Builds the policy a config names, or `None` for a name not in [`POLICY_NAMES`].
pub fn by_name(name: &str) -> Option<Box<dyn Policy>> {
    match name {
        "lru" => Some(Box::new(LruPolicy::new())),
        "lfu" => Some(Box::new(LfuPolicy::new())),
        "predictive" => Some(Box::new(PredictivePolicy::new())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_config_name_builds_its_policy() {
        for name in POLICY_NAMES {
            assert_eq!(by_name(name).map(|p| p.name()), Some(name));
        }
        assert!(by_name("belady").is_none() && by_name("mru").is_none());
    }
}
