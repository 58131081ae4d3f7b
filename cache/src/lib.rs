//! The expert cache: which experts are resident in a tier, under a byte budget, and which to
//! evict. It knows expert keys and byte sizes, nothing about models or where bytes come from;
//! the engine moves the bytes and stores whatever value it likes (`V`) against each key.
//!
//! One implementation of each replacement [`Policy`] serves the live engine and the simulator,
//! and so does the schedule that drives it ([`Tier`]).

mod cache;
pub mod policy;
mod tier;

pub use cache::{Cache, CacheError, CacheStats};
pub use policy::{
    Anticipation, AnticipationParams, BeladyPolicy, Candidate, LfuPolicy, LruPolicy, Policy, PolicyKind,
    PredictivePolicy,
};
pub use tier::{Demand, Fill, Tier, TierStats};

/// Precision an expert is held in. `Full` is the checkpoint's own dtype; `Low` its low-bit
/// copy (one format per run, chosen by the engine's config: q8_0 or q4_0). A layer may use
/// either copy of an expert, so the two are separate entries with their own sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Precision {
    Full,
    Low,
}

impl Precision {
    pub const ALL: [Precision; 2] = [Precision::Full, Precision::Low];

    pub fn name(self) -> &'static str {
        match self {
            Precision::Full => "full",
            Precision::Low => "low",
        }
    }
}

/// Identifies one expert's weights in one precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertKey {
    /// Index of the decoder layer (not of the MoE layer).
    pub layer: u32,
    pub expert: u32,
    pub precision: Precision,
}

impl ExpertKey {
    pub fn new(layer: usize, expert: usize) -> Self {
        ExpertKey { layer: layer as u32, expert: expert as u32, precision: Precision::Full }
    }

    /// The same expert in `precision`.
    pub fn at(self, precision: Precision) -> Self {
        ExpertKey { precision, ..self }
    }
}

impl std::fmt::Display for ExpertKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "layer {} expert {}", self.layer, self.expert)?;
        match self.precision {
            Precision::Full => Ok(()),
            Precision::Low => write!(f, " (low-bit copy)"),
        }
    }
}
