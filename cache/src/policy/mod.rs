//! Replacement policies. A policy tracks the resident keys and names a victim when the cache
//! needs room; the [`crate::Cache`] owns the values and the byte accounting.
//!
//! Configs name a policy (`lru`, `lfu`, `predictive`): [`PolicyKind`] is that list, and builds
//! the policy. Belady's optimal policy needs the future, so only the simulator builds it, from
//! the trace.

mod belady;
mod lfu;
mod lru;
mod predictive;

pub use belady::BeladyPolicy;
pub use lfu::LfuPolicy;
pub use lru::LruPolicy;
pub use predictive::{Anticipation, AnticipationParams, Candidate, PredictivePolicy};

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

/// The policies a config or a command line can name (Belady needs the future and is not among
/// them). The one list of policy names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    #[default]
    Lru,
    Lfu,
    /// LRU order plus prediction-driven protection and prefetch ([`Anticipation`]).
    Predictive,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 3] = [PolicyKind::Lru, PolicyKind::Lfu, PolicyKind::Predictive];

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::Lfu => "lfu",
            PolicyKind::Predictive => "predictive",
        }
    }

    /// Parses a name as [`PolicyKind::name`] writes it; the error lists the valid names.
    pub fn parse(name: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|p| p.name() == name).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|p| p.name()).collect();
            format!("`{name}` is not a policy (expected one of: {})", names.join(", "))
        })
    }

    /// A fresh policy of this kind.
    pub fn build(self) -> Box<dyn Policy> {
        match self {
            PolicyKind::Lru => Box::new(LruPolicy::new()),
            PolicyKind::Lfu => Box::new(LfuPolicy::new()),
            PolicyKind::Predictive => Box::new(PredictivePolicy::new()),
        }
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_builds_its_policy_and_parses_its_name() {
        for kind in PolicyKind::ALL {
            assert_eq!(kind.build().name(), kind.name());
            assert_eq!(PolicyKind::parse(kind.name()), Ok(kind));
        }
        let err = PolicyKind::parse("belady").unwrap_err();
        assert!(err.contains("belady") && err.contains("lru, lfu, predictive"), "{err}");
    }
}
