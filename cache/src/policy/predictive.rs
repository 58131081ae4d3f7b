//! The `predictive` policy: LRU order, steered by a routing predictor through [`Anticipation`].
//!
//! The replacement order itself is plain LRU ([`PredictivePolicy`]). What the prediction adds
//! happens around the cache, not inside the policy, so that any caller (the live engine, the
//! simulator) drives it the same way with the cache's own API:
//! - protection: experts predicted for the next `d` MoE layers are passed to
//!   [`Cache::evict_for`] through its `protect` predicate, so no insert evicts them;
//! - prefetch: the best predicted experts of the nearest layers that are not resident are
//!   loaded ahead of need, within a byte budget per step, and only where room can be made
//!   without evicting a protected or pinned entry (a prefetch must never push out what the
//!   current layer or a likelier prediction needs).
//!
//! Why protection matters: a layer's experts are used only when that layer runs, so expert
//! accesses loop over the layers, token after token. When the cache holds about one token's
//! worth of experts, LRU's victim is exactly what the next layers are about to reuse, and every
//! extra insert (a prefetch) sets off a chain of such misses. Protecting what is predicted for
//! a deep window of coming layers moves the victim to experts whose layer has just run, the
//! ones needed furthest in the future, as Belady's policy would choose.
//!
//! A step is one point where new routing becomes known: the start of a token (its id) and each
//! MoE layer's routing. At each step the caller asks the predictor, turns its predictions into
//! [`Candidate`]s and calls [`Anticipation::update`] and then [`Anticipation::plan_prefetch`].
//! [`crate::Tier`] does this in the one order the live store and the simulator share.

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

/// How much an [`Anticipation`] protects and prefetches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AnticipationParams {
    /// Candidates scoring below this are neither protected nor prefetched.
    pub protect_min_score: f32,
    /// Candidates scoring below this are protected (if resident) but not prefetched.
    pub prefetch_min_score: f32,
    /// Only candidates at most this many MoE layers ahead are prefetched; farther ones are
    /// protected when resident. Near predictions are the accurate ones.
    pub prefetch_depth: usize,
    /// Only a predicted layer's `prefetch_top` best candidates (resident or not) are
    /// prefetched: about the router's top-k, beyond which precision falls off.
    pub prefetch_top: usize,
    /// Most bytes of the cache that protection may hold, as a fraction of its budget, so that
    /// demand misses always find unprotected room to evict.
    pub max_protected_fraction: f64,
}

/// Prediction-driven protection and prefetch for one [`Cache`]: the part of the `predictive`
/// policy that lives outside the replacement order. (Not to be confused with the store's
/// read-ahead, which reads a layer's own misses ahead of the expert being computed.)
///
/// Per step: [`Anticipation::update`] with the predictions as soon as the new routing is known
/// (before loading the layer's misses, so that they evict around the protected experts), then
/// [`Anticipation::plan_prefetch`] once the misses are in.
pub struct Anticipation {
    params: AnticipationParams,
    /// This step's candidates above `protect_min_score`: nearest layer first, then best score,
    /// each key once.
    candidates: Vec<Candidate>,
    protected: HashSet<ExpertKey>,
    protected_bytes: u64,
    /// Scratch for `update`, kept to reuse its allocation.
    seen: HashSet<ExpertKey>,
}

impl Anticipation {
    pub fn new(params: AnticipationParams) -> Self {
        Anticipation {
            params,
            candidates: Vec::new(),
            protected: HashSet::new(),
            protected_bytes: 0,
            seen: HashSet::new(),
        }
    }

    pub fn params(&self) -> &AnticipationParams {
        &self.params
    }

    /// Prefetch candidates at most `layers` MoE layers ahead from now on.
    pub fn set_prefetch_depth(&mut self, layers: usize) {
        self.params.prefetch_depth = layers;
    }

    /// Whether `key` is protected from eviction now: pass `&|k| anticipation.protects(k)` as the
    /// `protect` argument of [`Cache::evict_for`], or make room through
    /// [`Anticipation::make_room`].
    pub fn protects(&self, key: &ExpertKey) -> bool {
        self.protected.contains(key)
    }

    /// Takes a step's predictions and protects the resident ones, replacing the previous
    /// step's protection. Predictions for a layer whose routing is now known are stale: the
    /// caller passes only those for layers still ahead.
    pub fn update<V>(&mut self, cache: &Cache<V>, candidates: &[Candidate]) {
        let p = self.params;
        self.candidates.clear();
        self.candidates.extend(candidates.iter().filter(|c| c.score >= p.protect_min_score));
        self.candidates.sort_by(|a, b| a.distance.cmp(&b.distance).then(b.score.total_cmp(&a.score)));
        // A key can repeat only when the look-ahead wraps past a whole token; keep the nearest.
        self.seen.clear();
        let seen = &mut self.seen;
        self.candidates.retain(|c| seen.insert(c.key));

        self.protected.clear();
        self.protected_bytes = 0;
        let cap = self.protect_cap(cache);
        for c in &self.candidates {
            if cache.contains(&c.key) && self.protected_bytes + c.bytes <= cap {
                self.protected.insert(c.key);
                self.protected_bytes += c.bytes;
            }
        }
    }

    /// The candidates of the last [`Anticipation::update`] to prefetch now, best expected
    /// benefit first (score over distance): not resident, scoring at least
    /// `prefetch_min_score`, at most `budget` bytes of them (the transfer one step can hide
    /// behind compute), and only as many as fit without evicting a protected or pinned entry. Planned keys become protected. The caller loads each, making
    /// room with [`Anticipation::make_room`], which then never needs to break protection.
    pub fn plan_prefetch<V>(&mut self, cache: &Cache<V>, budget: u64) -> Vec<Candidate> {
        let cap = self.protect_cap(cache);
        // Bytes no prefetch may evict. Planned keys are protected once in, so each one planned
        // adds its bytes; nothing else changes while planning.
        let mut locked = self.locked_bytes(cache);
        // Eligible: among its layer's `prefetch_top` best (resident or not), within the
        // horizon, likely enough, absent. Then ranked across layers by expected benefit: the
        // chance of being needed over the layers left to hide the read behind (a nearer layer
        // first at equal odds: a farther one can still be prefetched at the next step).
        let mut eligible: Vec<&Candidate> = Vec::new();
        let (mut rank, mut last_distance) = (0, 0);
        for c in &self.candidates {
            rank = if c.distance == last_distance { rank + 1 } else { 0 };
            last_distance = c.distance;
            if rank < self.params.prefetch_top
                && c.distance <= self.params.prefetch_depth
                && c.score >= self.params.prefetch_min_score
                && !cache.contains(&c.key)
            {
                eligible.push(c);
            }
        }
        let benefit = |c: &Candidate| c.score / c.distance.max(1) as f32;
        eligible.sort_by(|a, b| benefit(b).total_cmp(&benefit(a)).then(a.distance.cmp(&b.distance)));
        let mut planned = Vec::new();
        let mut planned_bytes = 0u64;
        for c in eligible.into_iter().copied() {
            if planned_bytes + c.bytes > budget
                || self.protected_bytes + c.bytes > cap
                || locked + c.bytes > cache.budget()
            {
                continue;
            }
            self.protected.insert(c.key);
            self.protected_bytes += c.bytes;
            locked += c.bytes;
            planned_bytes += c.bytes;
            planned.push(c);
        }
        planned
    }

    fn protect_cap<V>(&self, cache: &Cache<V>) -> u64 {
        (cache.budget() as f64 * self.params.max_protected_fraction) as u64
    }

    /// Bytes no prefetch may evict: pinned entries and protected resident ones.
    fn locked_bytes<V>(&self, cache: &Cache<V>) -> u64 {
        let protected_unpinned: u64 =
            (self.protected.iter()).filter(|k| !cache.is_pinned(k)).filter_map(|k| cache.bytes_of(k)).sum();
        cache.pinned_bytes() + protected_unpinned
    }

    /// Evicts for `key` (`bytes`) without touching protected entries when that is possible;
    /// when protected and pinned entries leave no room (a demand miss the predictions did not
    /// foresee), protection yields: the current layer needs the expert now. Returns the evicted
    /// entries and whether protection had to yield.
    pub fn make_room<V>(
        &self,
        cache: &mut Cache<V>,
        key: ExpertKey,
        bytes: u64,
    ) -> Result<(Vec<(ExpertKey, V)>, bool), CacheError> {
        match cache.evict_for(key, bytes, &|k| self.protects(k) && *k != key) {
            Ok(evicted) => Ok((evicted, false)),
            Err(CacheError::NoRoom { .. }) => Ok((cache.evict_for(key, bytes, &|_| false)?, true)),
            Err(e) => Err(e),
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

    fn params() -> AnticipationParams {
        AnticipationParams {
            protect_min_score: 0.1,
            prefetch_min_score: 0.5,
            prefetch_depth: 2,
            prefetch_top: 8,
            max_protected_fraction: 1.0,
        }
    }

    /// A cache of four 10-byte slots holding experts 0..4, 0 least recent.
    fn full_cache() -> Cache<()> {
        let mut c = Cache::new(40, Box::new(PredictivePolicy::new()));
        for e in 0..4 {
            c.insert(k(e), (), 10).unwrap();
        }
        c
    }

    #[test]
    fn protected_experts_survive_where_lru_would_evict_them() {
        let mut c = full_cache();
        let mut la = Anticipation::new(params());
        // Expert 0 (the LRU victim) and 1 are predicted; nothing is prefetched (no budget).
        la.update(&c, &[cand(0, 1, 0.9), cand(1, 2, 0.3), cand(2, 1, 0.05)]);
        assert!(la.plan_prefetch(&c, 0).is_empty());
        assert!(la.protects(&k(0)) && la.protects(&k(1)) && !la.protects(&k(2)));
        let (evicted, yielded) = la.make_room(&mut c, k(9), 10).unwrap();
        assert_eq!(evicted.iter().map(|(k, _)| *k).collect::<Vec<_>>(), [k(2)]);
        assert!(!yielded);
    }

    /// `update` then `plan_prefetch`, as a caller does at each step.
    fn step(la: &mut Anticipation, c: &Cache<()>, cands: &[Candidate], budget: u64) -> Vec<ExpertKey> {
        la.update(c, cands);
        la.plan_prefetch(c, budget).iter().map(|c| c.key).collect()
    }

    #[test]
    fn prefetch_is_ordered_budgeted_and_never_evicts_protected() {
        let c = full_cache();
        let mut la = Anticipation::new(params());
        // Nearest layer first, then score: 7 (d1) before 5 (d1, lower), 6 (d2) is over budget;
        // 8 scores too low to prefetch; 3 is resident and becomes protected. Only resident or
        // planned experts are protected: protecting an absent one would guard nothing.
        let cands = [cand(6, 2, 0.9), cand(5, 1, 0.6), cand(7, 1, 0.8), cand(8, 1, 0.2), cand(3, 1, 0.9)];
        assert_eq!(step(&mut la, &c, &cands, 20), [k(7), k(5)]);
        assert!(la.protects(&k(3)) && la.protects(&k(7)) && !la.protects(&k(8)) && !la.protects(&k(6)));

        // With three of four slots protected, only one prefetch can be made room for.
        let cands = [cand(0, 1, 0.9), cand(1, 1, 0.9), cand(2, 1, 0.9), cand(5, 2, 0.9), cand(6, 2, 0.8)];
        assert_eq!(step(&mut la, &c, &cands, 100), [k(5)]);
        let mut c = c;
        la.make_room(&mut c, k(5), 10).unwrap();
        c.insert(k(5), (), 10).unwrap();
        assert!((0..3).all(|e| c.contains(&k(e))) && c.contains(&k(5)) && !c.contains(&k(3)));

        // A new step replaces the protection: 3 and 7 are no longer predicted.
        step(&mut la, &c, &[cand(1, 1, 0.9)], 0);
        assert!(la.protects(&k(1)) && !la.protects(&k(0)) && !la.protects(&k(5)));
    }

    /// Across layers, the likelier-per-layer-of-lead prefetch goes first: a near layer at
    /// equal odds, a far one when it is much likelier; the horizon can be moved.
    #[test]
    fn prefetches_go_by_expected_benefit_within_the_horizon() {
        let c = full_cache();
        let mut la = Anticipation::new(AnticipationParams { prefetch_min_score: 0.1, ..params() });
        assert_eq!(step(&mut la, &c, &[cand(6, 2, 0.9), cand(5, 1, 0.5)], 10), [k(5)]);
        assert_eq!(step(&mut la, &c, &[cand(6, 2, 0.9), cand(5, 1, 0.3)], 10), [k(6)]);
        assert_eq!(step(&mut la, &c, &[cand(6, 2, 0.9), cand(5, 1, 0.3)], 20), [k(6), k(5)]);
        la.set_prefetch_depth(1);
        assert_eq!(step(&mut la, &c, &[cand(6, 2, 0.9), cand(5, 1, 0.3)], 20), [k(5)]);
    }

    #[test]
    fn protection_is_capped_and_yields_to_demand() {
        let mut c = full_cache();
        let mut la = Anticipation::new(AnticipationParams { max_protected_fraction: 0.5, ..params() });
        // Only two slots' worth (20 of 40 bytes) may be protected, by prefetch neither.
        assert!(step(
            &mut la,
            &c,
            &[cand(0, 1, 0.9), cand(1, 1, 0.8), cand(2, 1, 0.7), cand(7, 1, 0.9)],
            100
        )
        .is_empty());
        assert!(la.protects(&k(0)) && la.protects(&k(1)) && !la.protects(&k(2)));

        // Everything protected or pinned: a demand insert still succeeds by evicting the LRU.
        let mut la = Anticipation::new(params());
        step(&mut la, &c, &[cand(0, 1, 0.9), cand(1, 1, 0.9), cand(2, 1, 0.9), cand(3, 1, 0.9)], 0);
        let (evicted, yielded) = la.make_room(&mut c, k(9), 10).unwrap();
        assert_eq!(evicted.iter().map(|(k, _)| *k).collect::<Vec<_>>(), [k(0)]);
        assert!(yielded);
    }
}
