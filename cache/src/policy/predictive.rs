//! The `predictive` policy: LRU order, steered by a routing predictor through [`Lookahead`].
//!
//! The replacement order itself is plain LRU ([`PredictivePolicy`]). What the prediction adds
//! happens around the cache, not inside the policy, so that any caller (the live engine, the
//! simulator) drives it the same way with the cache's own API:
//! - protection: experts predicted for the next `d` MoE layers are passed to
//!   [`Cache::insert`] through its `protect` predicate, so no insert evicts them;
//! - prefetch: the best predicted experts that are not resident are loaded ahead of need, within
//!   a byte budget per step, and only where room can be made without evicting a protected or
//!   pinned entry (a prefetch must never push out what the current layer or a likelier
//!   prediction needs).
//!
//! A step is one point where new routing becomes known: the start of a token (its id) and the
//! end of each MoE layer's routing. The caller asks the predictor, turns its predictions into
//! [`Candidate`]s and calls [`Lookahead::plan`] once per step.

use std::collections::HashSet;

use super::{LruPolicy, Policy};
use crate::{Cache, CacheError, ExpertKey};

/// The replacement order of the `predictive` policy: least recently used. Prefetched entries
/// enter at the most-recent end, like any insert. See the module docs for the prediction side.
#[derive(Default)]
pub struct PredictivePolicy {
    lru: LruPolicy,
}

impl PredictivePolicy {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Policy for PredictivePolicy {
    fn name(&self) -> &'static str {
        "predictive"
    }

    fn on_insert(&mut self, key: ExpertKey) {
        self.lru.on_insert(key);
    }

    fn on_hit(&mut self, key: ExpertKey) {
        self.lru.on_hit(key);
    }

    fn on_remove(&mut self, key: ExpertKey) {
        self.lru.on_remove(key);
    }

    fn victim(&mut self, skip: &dyn Fn(&ExpertKey) -> bool) -> Option<ExpertKey> {
        self.lru.victim(skip)
    }
}

/// One expert a predictor expects to be needed soon.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub key: ExpertKey,
    /// MoE layers ahead of the step that predicted it (1 = the next MoE layer).
    pub distance: usize,
    /// The predictor's confidence, in [0, 1].
    pub score: f32,
    /// Bytes the expert occupies in this cache.
    pub bytes: u64,
}

/// How much a [`Lookahead`] protects and prefetches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LookaheadParams {
    /// Candidates scoring below this are neither protected nor prefetched.
    pub protect_min_score: f32,
    /// Candidates scoring below this are protected (if resident) but not prefetched.
    pub prefetch_min_score: f32,
    /// Most bytes of the cache that protection may hold, as a fraction of its budget, so that
    /// demand misses always find unprotected room to evict.
    pub max_protected_fraction: f64,
}

/// Prediction-driven protection and prefetch for one [`Cache`]: the part of the `predictive`
/// policy that lives outside the replacement order.
pub struct Lookahead {
    params: LookaheadParams,
    protected: HashSet<ExpertKey>,
}

impl Lookahead {
    pub fn new(params: LookaheadParams) -> Self {
        Lookahead { params, protected: HashSet::new() }
    }

    pub fn params(&self) -> &LookaheadParams {
        &self.params
    }

    /// Whether `key` is protected from eviction now: pass `&|k| lookahead.protects(k)` as the
    /// `protect` argument of [`Cache::insert`].
    pub fn protects(&self, key: &ExpertKey) -> bool {
        self.protected.contains(key)
    }

    /// Takes a step's predictions: replaces the protected set with them and returns the
    /// candidates to prefetch now, in order, at most `prefetch_budget` bytes of them (the
    /// transfer one step can hide behind compute). The caller loads each and inserts it with
    /// [`Lookahead::insert`]; every planned insert finds room without evicting a protected or
    /// pinned entry.
    ///
    /// Candidates are taken nearest layer first, then by score; a key listed twice keeps its
    /// first (nearest) entry.
    pub fn plan<V>(
        &mut self,
        cache: &Cache<V>,
        candidates: &[Candidate],
        prefetch_budget: u64,
    ) -> Vec<Candidate> {
        let p = self.params;
        let mut ordered: Vec<&Candidate> =
            candidates.iter().filter(|c| c.score >= p.protect_min_score).collect();
        ordered.sort_by(|a, b| a.distance.cmp(&b.distance).then(b.score.total_cmp(&a.score)));

        self.protected.clear();
        let protect_cap = (cache.budget() as f64 * p.max_protected_fraction) as u64;
        let mut protected_bytes = 0u64;
        let mut planned = Vec::new();
        let mut planned_bytes = 0u64;
        for c in ordered {
            if self.protected.contains(&c.key) || protected_bytes + c.bytes > protect_cap {
                continue;
            }
            if cache.contains(&c.key) {
                self.protected.insert(c.key);
                protected_bytes += c.bytes;
                continue;
            }
            if c.score < p.prefetch_min_score || planned_bytes + c.bytes > prefetch_budget {
                continue;
            }
            // Room for everything planned so far plus this one, evicting neither protected nor
            // pinned entries (planned keys are protected once chosen, so they count as locked).
            let protected = &self.protected;
            if !cache.can_make_room(planned_bytes + c.bytes, &|k| protected.contains(k)) {
                continue;
            }
            self.protected.insert(c.key);
            protected_bytes += c.bytes;
            planned_bytes += c.bytes;
            planned.push(*c);
        }
        planned
    }

    /// Inserts `key` into `cache` without evicting protected entries when that is possible;
    /// when protected and pinned entries leave no room (a demand miss the predictions did not
    /// foresee), protection yields: the current layer needs the expert now.
    pub fn insert<V>(
        &self,
        cache: &mut Cache<V>,
        key: ExpertKey,
        value: V,
        bytes: u64,
    ) -> Result<Vec<(ExpertKey, V)>, CacheError> {
        if cache.can_make_room(bytes, &|k| self.protects(k) && *k != key) {
            cache.insert(key, value, bytes, &|k| self.protects(k))
        } else {
            cache.insert(key, value, bytes, &|_| false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(e: usize) -> ExpertKey {
        ExpertKey::new(0, e)
    }

    fn cand(e: usize, distance: usize, score: f32) -> Candidate {
        Candidate { key: k(e), distance, score, bytes: 10 }
    }

    fn params() -> LookaheadParams {
        LookaheadParams { protect_min_score: 0.1, prefetch_min_score: 0.5, max_protected_fraction: 1.0 }
    }

    /// A cache of four 10-byte slots holding experts 0..4, 0 least recent.
    fn full_cache() -> Cache<()> {
        let mut c = Cache::new(40, Box::new(PredictivePolicy::new()));
        for e in 0..4 {
            c.insert(k(e), (), 10, &|_| false).unwrap();
        }
        c
    }

    #[test]
    fn protected_experts_survive_where_lru_would_evict_them() {
        let mut c = full_cache();
        let mut la = Lookahead::new(params());
        // Expert 0 (the LRU victim) and 1 are predicted; nothing is prefetched (no budget).
        assert!(la.plan(&c, &[cand(0, 1, 0.9), cand(1, 2, 0.3), cand(2, 1, 0.05)], 0).is_empty());
        assert!(la.protects(&k(0)) && la.protects(&k(1)) && !la.protects(&k(2)));
        let evicted = la.insert(&mut c, k(9), (), 10).unwrap();
        assert_eq!(evicted.iter().map(|(k, _)| *k).collect::<Vec<_>>(), [k(2)]);
    }

    #[test]
    fn prefetch_is_ordered_budgeted_and_never_evicts_protected() {
        let c = full_cache();
        let mut la = Lookahead::new(params());
        // Nearest layer first, then score: 7 (d1) before 5 (d1, lower), 6 (d2) is over budget;
        // 8 scores too low to prefetch; 3 is resident and becomes protected. Only resident or
        // planned experts are protected: protecting an absent one would guard nothing.
        let plan = la.plan(
            &c,
            &[cand(6, 2, 0.9), cand(5, 1, 0.6), cand(7, 1, 0.8), cand(8, 1, 0.2), cand(3, 1, 0.9)],
            20,
        );
        assert_eq!(plan.iter().map(|c| c.key).collect::<Vec<_>>(), [k(7), k(5)]);
        assert!(la.protects(&k(3)) && la.protects(&k(7)) && !la.protects(&k(8)) && !la.protects(&k(6)));

        // With three of four slots protected, only one prefetch can be made room for.
        let mut la = Lookahead::new(params());
        let plan = la.plan(
            &c,
            &[cand(0, 1, 0.9), cand(1, 1, 0.9), cand(2, 1, 0.9), cand(5, 2, 0.9), cand(6, 2, 0.8)],
            100,
        );
        assert_eq!(plan.iter().map(|c| c.key).collect::<Vec<_>>(), [k(5)]);
        let mut c = c;
        for p in &plan {
            la.insert(&mut c, p.key, (), p.bytes).unwrap();
        }
        assert!((0..3).all(|e| c.contains(&k(e))) && c.contains(&k(5)) && !c.contains(&k(3)));
    }

    #[test]
    fn protection_is_capped_and_yields_to_demand() {
        let mut c = full_cache();
        let mut la = Lookahead::new(LookaheadParams { max_protected_fraction: 0.5, ..params() });
        la.plan(&c, &[cand(0, 1, 0.9), cand(1, 1, 0.8), cand(2, 1, 0.7)], 0);
        // Only two slots' worth (20 of 40 bytes) may be protected.
        assert!(la.protects(&k(0)) && la.protects(&k(1)) && !la.protects(&k(2)));

        // Everything protected or pinned: a demand insert still succeeds by evicting the LRU.
        let mut la = Lookahead::new(params());
        la.plan(&c, &[cand(0, 1, 0.9), cand(1, 1, 0.9), cand(2, 1, 0.9), cand(3, 1, 0.9)], 0);
        let evicted = la.insert(&mut c, k(9), (), 10).unwrap();
        assert_eq!(evicted.iter().map(|(k, _)| *k).collect::<Vec<_>>(), [k(0)]);
    }
}
