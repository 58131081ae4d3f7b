//! Which copy of an expert a layer uses: the precision policy (HOBBIT's mixed-precision
//! replacement) and its counters.
//!
//! HOBBIT's token-level rule: rank a row's chosen experts by gate weight; with `s` the share
//! of the row's gate mass held by the experts ranked above one, that expert needs full
//! precision while `s <= full_until` (0.6), its low-bit copy while `s <= skip_above` (0.9), and
//! nothing beyond. An expert of a layer needs what its most demanding row needs. A copy already
//! resident is used whatever the need (full before low; an expert whose rows could skip it
//! still uses a resident copy); only a miss reads the copy the need names, so low-bit copies and
//! skips replace reads, never a resident full-precision expert. With `upgrade`, an expert that
//! needs full precision while only its low-bit copy is resident is read in full.

use serde::Serialize;
use stevedore_cache::Precision;
use stevedore_models::ExpertPlan;

/// How a layer's experts choose their precision.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PrecisionPolicy {
    /// Every expert in the checkpoint's precision (the reference's tokens).
    Full,
    Hobbit(HobbitRule),
    /// Every expert from its low-bit copy (a fully quantized MoE, like a Q4_0 GGUF's experts):
    /// the quality floor HOBBIT is measured against.
    Low,
}

/// HOBBIT's thresholds (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HobbitRule {
    pub full_until: f32,
    pub skip_above: f32,
    pub upgrade: bool,
}

/// What a layer's rows need of one expert, least first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Need {
    Nothing,
    Low,
    Full,
}

impl HobbitRule {
    /// What the rows routed to `plan.experts[i]` need of it.
    pub(crate) fn need(&self, plan: &ExpertPlan, i: usize) -> Need {
        let expert = plan.experts[i].expert;
        let mut need = Need::Nothing;
        for &r in plan.rows_of(i) {
            let (ids, weights) = plan.choice(r as usize);
            let total: f32 = weights.iter().sum();
            let rank = ids.iter().position(|&e| e == expert).expect("the expert's rows chose it");
            let above: f32 = weights[..rank].iter().sum();
            let s = if total > 0.0 { above / total } else { 0.0 };
            let row = if s <= self.full_until {
                Need::Full
            } else if s <= self.skip_above {
                Need::Low
            } else {
                Need::Nothing
            };
            need = need.max(row);
            if need == Need::Full {
                break;
            }
        }
        need
    }

    /// The copy to use given the need and which copies are resident (or being read); `None`:
    /// skip the expert.
    pub(crate) fn choose(&self, need: Need, full_resident: bool, low_resident: bool) -> Option<Precision> {
        match need {
            _ if full_resident => Some(Precision::Full),
            Need::Full if low_resident && !self.upgrade => Some(Precision::Low),
            Need::Full => Some(Precision::Full),
            Need::Low => Some(Precision::Low),
            Need::Nothing if low_resident => Some(Precision::Low),
            Need::Nothing => None,
        }
    }
}

/// Layer accesses and reads by precision.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PrecisionStats {
    /// `full` or `hobbit`.
    pub policy: &'static str,
    /// The low-bit copies' format, when the policy uses them.
    pub low_format: Option<&'static str>,
    pub full_hits: u64,
    pub full_misses: u64,
    pub low_hits: u64,
    pub low_misses: u64,
    /// Experts a layer skipped (no copy resident, negligible gate weight for every row).
    pub skipped: u64,
    pub full_bytes_read: u64,
    pub low_bytes_read: u64,
}

impl PrecisionStats {
    pub(crate) fn access(&mut self, precision: Precision, hit: bool) {
        let counter = match (precision, hit) {
            (Precision::Full, true) => &mut self.full_hits,
            (Precision::Full, false) => &mut self.full_misses,
            (Precision::Low, true) => &mut self.low_hits,
            (Precision::Low, false) => &mut self.low_misses,
        };
        *counter += 1;
    }

    pub(crate) fn read(&mut self, precision: Precision, bytes: u64) {
        match precision {
            Precision::Full => self.full_bytes_read += bytes,
            Precision::Low => self.low_bytes_read += bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: HobbitRule = HobbitRule { full_until: 0.6, skip_above: 0.9, upgrade: true };

    #[test]
    fn resident_copies_are_used_whatever_the_need() {
        for need in [Need::Nothing, Need::Low, Need::Full] {
            assert_eq!(RULE.choose(need, true, true), Some(Precision::Full));
            assert_eq!(RULE.choose(need, true, false), Some(Precision::Full));
        }
        assert_eq!(RULE.choose(Need::Nothing, false, true), Some(Precision::Low));
        assert_eq!(RULE.choose(Need::Low, false, true), Some(Precision::Low));
    }

    #[test]
    fn misses_read_what_the_need_names() {
        assert_eq!(RULE.choose(Need::Full, false, false), Some(Precision::Full));
        assert_eq!(RULE.choose(Need::Low, false, false), Some(Precision::Low));
        assert_eq!(RULE.choose(Need::Nothing, false, false), None);
        // Upgrade: a resident low-bit copy does not serve a row that needs full precision...
        assert_eq!(RULE.choose(Need::Full, false, true), Some(Precision::Full));
        // ... unless upgrades are off.
        let keep = HobbitRule { upgrade: false, ..RULE };
        assert_eq!(keep.choose(Need::Full, false, true), Some(Precision::Low));
    }
}
