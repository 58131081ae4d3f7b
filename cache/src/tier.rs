//! One tier of the expert store as a schedule of steps: the bookkeeping that the live store and
//! the simulator share, call for call, so that the same routing and predictions give the same
//! demand hits and misses in both. The live store adds reads and waits around these calls; the
//! simulator adds nothing.
//!
//! A forward pass is a sequence of steps, each of which first hands the tier the routing
//! predictor's latest [`Candidate`]s (moving the predictive policy's protection onto them):
//! - the step's start ([`Tier::begin_step`]): the token ids are known, no layer's routing is;
//!   the predictive policy prefetches what it expects of the first layers;
//! - each MoE layer ([`Tier::steer`], [`Tier::begin`], [`Tier::advance`], [`Tier::release`]): the router has
//!   chosen the layer's experts. Those resident are demand hits and are pinned at once, before
//!   any miss takes room; the misses are admitted in order, each evicting by the policy (never a
//!   pinned entry; a protected one only when nothing else can go), as far as room allows. The
//!   layer computes its experts in the demand's order, hits first, releasing each when done, and
//!   a miss that found no room is admitted when a release makes some. Once every miss is in,
//!   the predictive policy prefetches for the layers ahead.
//!
//! What a miss or a prefetch is given to hold (a buffer being read, or nothing in the
//! simulator) is the caller's: [`Tier::advance`] asks for it through a `make` callback, which
//! also receives the entries evicted to make room (so that their buffers can be reused).
//! Reads in flight do not pin: whether an entry may be evicted never depends on how fast the
//! disk is, only on the calls made here.

use std::collections::HashSet;

use crate::{Anticipation, AnticipationParams, Cache, CacheError, CacheStats, Candidate, ExpertKey, Policy};

/// Counts of the tier's demand accesses and prefetches: the one set of hit and miss counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierStats {
    /// Experts that layer steps needed (one per expert per step).
    pub accesses: u64,
    /// Accesses that found the expert resident, whether cached or prefetched (read or not).
    pub hits: u64,
    pub misses: u64,
    /// Bytes admitted for misses.
    pub demand_bytes: u64,
    pub prefetches: u64,
    pub prefetch_bytes: u64,
    /// Prefetched experts a demand access later found (each counted once).
    pub prefetch_hits: u64,
    /// Protected entries a miss evicted because nothing else could make room.
    pub protected_evictions: u64,
    /// Entries admitted by a warm start ([`Tier::warm`]) before any step.
    pub warm_fills: u64,
    pub warm_bytes: u64,
}

/// An entry the tier admitted and the caller must give a value: a demand miss or a prefetch.
pub struct Fill<V> {
    pub key: ExpertKey,
    pub bytes: u64,
    pub prefetch: bool,
    /// What was evicted to make room, values and all.
    pub evicted: Vec<(ExpertKey, V)>,
}

/// One layer step's demand: its experts in compute order (hits first, then misses, each in the
/// order asked), and how far admission and computation have got.
#[derive(Debug)]
pub struct Demand {
    order: Vec<(ExpertKey, u64)>,
    /// `order[..admitted]` are resident and pinned by this demand (until released).
    admitted: usize,
    /// `order[..released]` are computed and unpinned; `released <= admitted`.
    released: usize,
    /// The step's prefetches are still to be planned (once every miss is admitted).
    prefetch_due: bool,
}

impl Demand {
    /// The expert to compute next, once it is admitted; `None` when every expert is done or the
    /// next one is waiting for room.
    pub fn front(&self) -> Option<ExpertKey> {
        (self.released < self.admitted).then(|| self.order[self.released].0)
    }

    /// Every expert computed and released.
    pub fn is_done(&self) -> bool {
        self.released == self.order.len()
    }

    /// Admitted and not yet released: what this demand pins.
    pub fn pinned(&self) -> impl Iterator<Item = ExpertKey> + '_ {
        self.order[self.released..self.admitted].iter().map(|&(k, _)| k)
    }

    /// Experts still waiting for room.
    pub fn waiting(&self) -> usize {
        self.order.len() - self.admitted
    }
}

/// A cache under a byte budget with its policy and, for the predictive policy, the
/// anticipation that protects and prefetches. See the module docs for the schedule.
pub struct Tier<V> {
    cache: Cache<V>,
    anticipation: Option<Anticipation>,
    /// Most bytes prefetched per step.
    prefetch_budget: u64,
    /// Prefetched entries no demand has found yet.
    unused_prefetch: HashSet<ExpertKey>,
    stats: TierStats,
}

impl<V> Tier<V> {
    pub fn new(budget: u64, policy: Box<dyn Policy>) -> Self {
        Tier {
            cache: Cache::new(budget, policy),
            anticipation: None,
            prefetch_budget: 0,
            unused_prefetch: HashSet::new(),
            stats: TierStats::default(),
        }
    }

    /// Turns on prediction-driven protection and prefetch (at most `prefetch_budget` bytes per
    /// step). Without it, candidates are ignored.
    pub fn with_anticipation(mut self, params: AnticipationParams, prefetch_budget: u64) -> Self {
        self.anticipation = Some(Anticipation::new(params));
        self.prefetch_budget = prefetch_budget;
        self
    }

    /// Changes how far the predictive policy prefetches: candidates at most `layers` MoE
    /// layers ahead, at most `bytes` per step (nothing changes without anticipation).
    pub fn set_prefetch(&mut self, layers: usize, bytes: u64) {
        if let Some(a) = &mut self.anticipation {
            a.set_prefetch_depth(layers);
            self.prefetch_budget = bytes;
        }
    }

    pub fn cache(&self) -> &Cache<V> {
        &self.cache
    }

    pub fn stats(&self) -> TierStats {
        self.stats
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Forgets the counts so far (the simulator's warm-up), keeping the cache as it is.
    pub fn reset_stats(&mut self) {
        self.stats = TierStats::default();
        self.unused_prefetch.clear();
    }

    pub fn contains(&self, key: &ExpertKey) -> bool {
        self.cache.contains(key)
    }

    pub fn peek(&self, key: &ExpertKey) -> Option<&V> {
        self.cache.peek(key)
    }

    /// Moves the protection onto `candidates` (predictions for layers whose routing is not known
    /// yet; `bytes` must be the tier's sizes), replacing the previous step's. Every step starts
    /// with this: [`Tier::begin_step`] does it, and a layer step calls it before [`Tier::begin`].
    pub fn steer(&mut self, candidates: &[Candidate]) {
        if let Some(a) = &mut self.anticipation {
            a.update(&self.cache, candidates);
        }
    }

    /// The start of a step: protection moves onto `candidates`, and the predictive policy
    /// prefetches.
    pub fn begin_step(&mut self, candidates: &[Candidate], make: &mut dyn FnMut(Fill<V>) -> V) {
        self.steer(candidates);
        self.prefetch(make);
    }

    /// A layer step, after [`Tier::steer`]: `keys` (the layer's experts with their sizes) are
    /// looked up. Hits are counted, touched and pinned; misses are counted and wait for
    /// [`Tier::advance`].
    pub fn begin(&mut self, keys: &[(ExpertKey, u64)]) -> Demand {
        let mut order = Vec::with_capacity(keys.len());
        let mut misses = Vec::new();
        for &(key, bytes) in keys {
            self.stats.accesses += 1;
            if self.cache.touch(&key) {
                self.stats.hits += 1;
                if self.unused_prefetch.remove(&key) {
                    self.stats.prefetch_hits += 1;
                }
                self.cache.pin(&key);
                order.push((key, bytes));
            } else {
                self.stats.misses += 1;
                misses.push((key, bytes));
            }
        }
        let admitted = order.len();
        order.extend(misses);
        Demand { order, admitted, released: 0, prefetch_due: self.anticipation.is_some() }
    }

    /// Admits `demand`'s waiting misses in order while room can be made, giving each the value
    /// `make` returns and pinning it; once all are in, plans and admits the step's prefetches.
    /// A miss that finds no room (everything else pinned) stops admission until a release.
    pub fn advance(
        &mut self,
        demand: &mut Demand,
        make: &mut dyn FnMut(Fill<V>) -> V,
    ) -> Result<(), CacheError> {
        while let Some(&(key, bytes)) = demand.order.get(demand.admitted) {
            if !self.cache.contains(&key) {
                // Protection yields to a demand only when nothing else can go.
                let made = match &self.anticipation {
                    Some(a) => a.make_room(&mut self.cache, key, bytes),
                    None => self.cache.evict_for(key, bytes, &|_| false).map(|e| (e, false)),
                };
                let (evicted, yielded) = match made {
                    Ok(made) => made,
                    Err(CacheError::NoRoom { .. }) => break,
                    Err(e) => return Err(e),
                };
                if yielded {
                    let a = self.anticipation.as_ref().expect("only anticipation yields");
                    self.stats.protected_evictions +=
                        evicted.iter().filter(|(k, _)| a.protects(k)).count() as u64;
                }
                for (k, _) in &evicted {
                    self.unused_prefetch.remove(k);
                }
                let value = make(Fill { key, bytes, prefetch: false, evicted });
                // Room was made and the key is absent: an insert cannot fail here, and failing
                // would lose the value `make` created.
                self.cache.insert(key, value, bytes).expect("room was made for an absent key");
                self.stats.demand_bytes += bytes;
            }
            // Resident since `begin` only if another demand admitted it meanwhile.
            self.cache.pin(&key);
            demand.admitted += 1;
        }
        if demand.admitted == demand.order.len() && demand.prefetch_due {
            demand.prefetch_due = false;
            self.prefetch(make);
        }
        Ok(())
    }

    /// The demand's front expert is computed: unpins it.
    pub fn release(&mut self, demand: &mut Demand) {
        if let Some(key) = demand.front() {
            self.cache.unpin(&key);
            demand.released += 1;
        }
    }

    /// Drops whatever `demand` still pins (the layer stopped early, on an error).
    pub fn abandon(&mut self, demand: &mut Demand) {
        while demand.front().is_some() {
            self.release(demand);
        }
        demand.order.truncate(demand.released);
        demand.admitted = demand.released;
    }

    /// Plans this step's prefetches and admits them, unpinned. Planned prefetches take only room
    /// that no pinned or protected entry holds.
    fn prefetch(&mut self, make: &mut dyn FnMut(Fill<V>) -> V) {
        let Some(a) = &mut self.anticipation else { return };
        for c in a.plan_prefetch(&self.cache, self.prefetch_budget) {
            // The plan only takes room no pinned or protected entry holds; a prefetch never
            // breaks protection, so one that would is skipped (nothing is evicted for it).
            let Ok(evicted) = self.cache.evict_for(c.key, c.bytes, &|k| a.protects(k) && *k != c.key) else {
                continue;
            };
            for (k, _) in &evicted {
                self.unused_prefetch.remove(k);
            }
            let value = make(Fill { key: c.key, bytes: c.bytes, prefetch: true, evicted });
            self.cache.insert(c.key, value, c.bytes).expect("evict_for made room and the key was absent");
            self.unused_prefetch.insert(c.key);
            self.stats.prefetches += 1;
            self.stats.prefetch_bytes += c.bytes;
        }
    }

    /// A warm start, before any step: admits `keys` (with the tier's sizes) in the order given
    /// while each fits in the room left, evicting nothing, as prefetch fills (the caller reads
    /// them behind every demand). Stops at the first key that does not fit, so the entries
    /// admitted are a prefix of `keys`: the same in the simulator as live. Returns how many.
    pub fn warm(&mut self, keys: &[(ExpertKey, u64)], make: &mut dyn FnMut(Fill<V>) -> V) -> usize {
        let mut admitted = 0;
        for &(key, bytes) in keys {
            if self.cache.contains(&key) {
                continue;
            }
            if self.cache.stats().bytes + bytes > self.cache.budget() {
                break;
            }
            let value = make(Fill { key, bytes, prefetch: true, evicted: Vec::new() });
            self.cache.insert(key, value, bytes).expect("the key is absent and fits");
            self.stats.warm_fills += 1;
            self.stats.warm_bytes += bytes;
            admitted += 1;
        }
        admitted
    }

    /// Removes `key` (its read failed: the next demand reads it again).
    pub fn remove(&mut self, key: &ExpertKey) -> Option<V> {
        self.unused_prefetch.remove(key);
        self.cache.remove(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LruPolicy, PredictivePolicy};

    fn k(e: usize) -> ExpertKey {
        ExpertKey::new(0, e)
    }

    /// Runs one layer step over `experts` (10 bytes each) to the end, as the simulator does;
    /// returns the order computed and every fill made.
    fn layer(
        tier: &mut Tier<u32>,
        experts: &[usize],
        candidates: &[Candidate],
    ) -> (Vec<usize>, Vec<(usize, bool)>) {
        let keys: Vec<_> = experts.iter().map(|&e| (k(e), 10)).collect();
        let mut fills = Vec::new();
        let mut make = |f: Fill<u32>| {
            fills.push((f.key.expert as usize, f.prefetch));
            f.key.expert
        };
        tier.steer(candidates);
        let mut d = tier.begin(&keys);
        tier.advance(&mut d, &mut make).unwrap();
        let mut order = Vec::new();
        while let Some(key) = d.front() {
            order.push(key.expert as usize);
            tier.release(&mut d);
            tier.advance(&mut d, &mut make).unwrap();
        }
        assert!(d.is_done());
        (order, fills)
    }

    /// A warm start admits a prefix of its keys while they fit, evicting nothing, and the
    /// entries it admitted are demand hits afterwards.
    #[test]
    fn warm_start_admits_what_fits_in_order_then_hits() {
        let mut t: Tier<u32> = Tier::new(30, Box::new(LruPolicy::new()));
        let mut fills = Vec::new();
        let keys: Vec<_> = (0..5).map(|e| (k(e), 10)).collect();
        let n = t.warm(&keys, &mut |f| {
            assert!(f.prefetch && f.evicted.is_empty());
            fills.push(f.key.expert);
            f.key.expert
        });
        assert_eq!((n, fills), (3, vec![0, 1, 2]));
        let s = t.stats();
        assert_eq!((s.warm_fills, s.warm_bytes, s.prefetches), (3, 30, 0));
        assert_eq!(layer(&mut t, &[0, 2], &[]), (vec![0, 2], vec![]));
        assert_eq!((t.stats().hits, t.stats().misses), (2, 0));
        // Nothing more fits: a second warm start admits nothing and evicts nothing.
        assert_eq!(t.warm(&keys, &mut |f| f.key.expert), 0);
        assert_eq!(t.cache().len(), 3);
    }

    #[test]
    fn hits_first_then_misses_and_one_set_of_counts() {
        let mut t: Tier<u32> = Tier::new(40, Box::new(LruPolicy::new()));
        assert_eq!(layer(&mut t, &[1, 2], &[]), (vec![1, 2], vec![(1, false), (2, false)]));
        let (order, fills) = layer(&mut t, &[0, 2, 3], &[]);
        assert_eq!(order, [2, 0, 3]);
        assert_eq!(fills, [(0, false), (3, false)]);
        let s = t.stats();
        assert_eq!((s.accesses, s.hits, s.misses, s.demand_bytes), (5, 1, 4, 40));
        assert_eq!(t.cache().pinned_bytes(), 0);
    }

    /// At a budget of two entries, a layer of four experts admits two, then one more per
    /// release; its own earlier experts are the victims, never a pinned one.
    #[test]
    fn a_layer_larger_than_the_budget_admits_as_releases_make_room() {
        let mut t: Tier<u32> = Tier::new(20, Box::new(LruPolicy::new()));
        let keys: Vec<_> = [4, 5, 6, 7].iter().map(|&e| (k(e), 10)).collect();
        let mut d = t.begin(&keys);
        let mut made = Vec::new();
        let mut make = |f: Fill<u32>| {
            made.push(f.key.expert);
            0
        };
        t.advance(&mut d, &mut make).unwrap();
        assert_eq!(d.waiting(), 2);
        assert_eq!(d.pinned().count(), 2);
        t.release(&mut d);
        t.advance(&mut d, &mut make).unwrap();
        assert_eq!(d.waiting(), 1);
        assert!(!t.contains(&k(4)) && t.contains(&k(6)));
        t.abandon(&mut d);
        assert_eq!(t.cache().pinned_bytes(), 0);
        assert_eq!(made, [4, 5, 6]);
    }

    #[test]
    fn prefetch_after_the_misses_and_its_hits_counted_once() {
        let params = AnticipationParams {
            protect_min_score: 0.0,
            prefetch_min_score: 0.5,
            prefetch_depth: 2,
            prefetch_top: 4,
            max_protected_fraction: 1.0,
        };
        let mut t: Tier<u32> = Tier::new(60, Box::new(PredictivePolicy::new())).with_anticipation(params, 20);
        let cand = |e: usize| Candidate { key: k(e), distance: 1, score: 0.9, bytes: 10 };
        let (_, fills) = layer(&mut t, &[0, 1], &[cand(2), cand(3), cand(4)]);
        // Misses first, then at most 20 bytes of prefetch.
        assert_eq!(fills, [(0, false), (1, false), (2, true), (3, true)]);
        layer(&mut t, &[2], &[]);
        layer(&mut t, &[2, 3], &[]);
        let s = t.stats();
        assert_eq!((s.prefetches, s.prefetch_bytes, s.prefetch_hits, s.hits, s.misses), (2, 20, 2, 3, 2));
        // The step start prefetches too.
        let mut fills = Vec::new();
        t.begin_step(&[cand(5)], &mut |f| {
            fills.push(f.key.expert);
            0
        });
        assert_eq!(fills, [5]);
    }
}
