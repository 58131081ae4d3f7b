//! Replays a trace through one tier of expert caches under one policy, counting what a live
//! engine would see: demand hits and misses, bytes loaded, prefetches issued and used.
//!
//! Timing model (`docs/traces.md`, "Simulating a trace"): tokens are replayed one at a time, as
//! decode runs them. A token is a sequence of steps: its start (its id becomes known), then each
//! recorded MoE layer in order. At a layer step the router's choice is known: the predictor
//! observes it and the protection moves on to the layers ahead; then the layer's experts are
//! needed (a hit if resident, else loaded and counted as moved bytes) and stay pinned until the
//! step ends. Last, the predictive policy prefetches: what it loads at a step is resident from
//! the next step on, so a prefetch is in time for a layer only if it was issued at an earlier
//! step. Each step prefetches at most the prefetch budget, the transfer one step of compute can
//! hide.

use std::collections::HashSet;

use stevedore_cache::{
    BeladyPolicy, Cache, Candidate, ExpertKey, LfuPolicy, Lookahead, LookaheadParams, LruPolicy, Policy,
    PredictivePolicy,
};
use stevedore_predictor::RoutePredictor;

use super::{ExpertSizes, SimError};
use crate::config::Split;
use crate::trace::Trace;

/// The policies the simulator compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    Lru,
    Lfu,
    Predictive,
    /// Optimal replacement with knowledge of the future: the upper bound for demand caching.
    Belady,
}

impl Contender {
    pub const ALL: [Contender; 4] =
        [Contender::Lru, Contender::Lfu, Contender::Predictive, Contender::Belady];

    pub fn name(self) -> &'static str {
        match self {
            Contender::Lru => "lru",
            Contender::Lfu => "lfu",
            Contender::Predictive => "predictive",
            Contender::Belady => "belady",
        }
    }
}

/// What steers the predictive policy in one replay.
pub struct Steering {
    pub predictor: Box<dyn RoutePredictor>,
    pub params: LookaheadParams,
    /// MoE layers looked ahead.
    pub depth: usize,
    /// Most bytes prefetched per step, over all caches of the tier.
    pub prefetch_budget: u64,
}

/// Counts from one replay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    pub tokens: u64,
    /// Expert uses: one per (token, recorded layer, chosen expert).
    pub accesses: u64,
    /// Uses that found the expert resident (cached or prefetched in time).
    pub hits: u64,
    /// Bytes loaded on demand misses.
    pub demand_bytes: u64,
    /// Bytes loaded by prefetches.
    pub prefetch_bytes: u64,
    pub prefetches_issued: u64,
    /// Prefetched experts used by a demand access before being evicted.
    pub prefetches_useful: u64,
}

impl RunStats {
    pub fn hit_rate(&self) -> f64 {
        self.hits as f64 / self.accesses.max(1) as f64
    }

    /// All bytes loaded into the tier: demand misses plus prefetches.
    pub fn bytes_moved(&self) -> u64 {
        self.demand_bytes + self.prefetch_bytes
    }

    pub fn bytes_per_token(&self) -> f64 {
        self.bytes_moved() as f64 / self.tokens.max(1) as f64
    }
}

/// Replays `trace` through a tier of `budget` bytes (split as `split` says) under `contender`.
/// `steering` is required for [`Contender::Predictive`] and ignored otherwise. The first
/// `warmup` tokens warm the caches and the predictor but are not counted.
pub fn replay(
    trace: &Trace,
    sizes: &ExpertSizes,
    budget: u64,
    split: Split,
    contender: Contender,
    steering: Option<Steering>,
    warmup: usize,
) -> Result<RunStats, SimError> {
    let steering = match (contender, steering) {
        (Contender::Predictive, None) => {
            return Err(SimError::Invalid("the predictive policy needs a predictor".into()))
        }
        (Contender::Predictive, s) => s,
        _ => None,
    };
    let mut r = Replayer::new(trace, sizes, budget, split, contender, steering)?;
    for (i, token) in trace.tokens.iter().enumerate() {
        if i == warmup {
            // Count from here; a prefetch issued while warming up is not this part's to claim.
            r.stats = RunStats::default();
            r.unused_prefetch.clear();
        }
        r.stats.tokens += 1;
        if let Some(s) = r.steering.as_mut() {
            s.predictor.begin_token(token.token_id);
        }
        r.protect();
        r.prefetch()?;
        for (l, choice) in token.layers.iter().enumerate() {
            let Some(choice) = choice else { continue };
            // The routing is known: predictions move on before the misses are loaded, so that
            // the misses evict around the experts predicted for the layers ahead, not around
            // stale guesses for this one.
            if let Some(s) = r.steering.as_mut() {
                s.predictor.observe(l, &choice.experts, &choice.weights);
            }
            r.protect();
            r.demand(l, &choice.experts)?;
            // Prefetch while the layer computes; its experts stay pinned until it is done.
            r.prefetch()?;
            for &e in &choice.experts {
                let k = r.key(l, e);
                r.caches[r.cache_of[l]].unpin(&k);
            }
        }
    }
    Ok(r.stats)
}

/// Replay state: the tier's caches and, for the predictive policy, its steering.
struct Replayer<'a> {
    trace: &'a Trace,
    sizes: &'a ExpertSizes,
    /// One cache for all MoE layers, or one per layer.
    caches: Vec<Cache<()>>,
    /// `cache_of[moe_layer]`: index into `caches`.
    cache_of: Vec<usize>,
    steering: Option<Steering>,
    /// One per cache when steering.
    lookaheads: Vec<Lookahead>,
    /// Caches in the order this step's prefetches are planned: nearest prediction first, as
    /// they share the step's budget.
    order: Vec<usize>,
    /// Prefetched experts not yet used: a demand hit on one makes its prefetch useful.
    unused_prefetch: HashSet<ExpertKey>,
    stats: RunStats,
}

impl<'a> Replayer<'a> {
    fn new(
        trace: &'a Trace,
        sizes: &'a ExpertSizes,
        budget: u64,
        split: Split,
        contender: Contender,
        steering: Option<Steering>,
    ) -> Result<Self, SimError> {
        let layers = trace.num_layers();
        let cache_of: Vec<usize> = match split {
            Split::Shared => vec![0; layers],
            Split::PerLayer => (0..layers).collect(),
        };
        let num_caches = cache_of.iter().max().map_or(1, |m| m + 1);
        let cache_budget = budget / num_caches as u64;
        check_capacity(trace, sizes, cache_budget)?;
        let key = |l: usize, e: u32| ExpertKey::new(trace.meta.layer_ids[l] as usize, e as usize);
        let caches = (0..num_caches)
            .map(|c| {
                let policy: Box<dyn Policy> = match contender {
                    Contender::Lru => Box::new(LruPolicy::new()),
                    Contender::Lfu => Box::new(LfuPolicy::new()),
                    Contender::Predictive => Box::new(PredictivePolicy::new()),
                    Contender::Belady => Box::new(BeladyPolicy::new(
                        demand_sequence(trace).filter(|&(l, _)| cache_of[l] == c).map(|(l, e)| key(l, e)),
                    )),
                };
                Cache::new(cache_budget, policy)
            })
            .collect();
        let lookaheads = match &steering {
            Some(s) => (0..num_caches).map(|_| Lookahead::new(s.params)).collect(),
            None => Vec::new(),
        };
        Ok(Replayer {
            trace,
            sizes,
            caches,
            cache_of,
            steering,
            lookaheads,
            order: Vec::new(),
            unused_prefetch: HashSet::new(),
            stats: RunStats::default(),
        })
    }

    fn key(&self, layer: usize, expert: u32) -> ExpertKey {
        ExpertKey::new(self.trace.meta.layer_ids[layer] as usize, expert as usize)
    }

    /// Asks the predictor and hands each cache its candidates, protecting the resident ones.
    fn protect(&mut self) {
        let Some(s) = &self.steering else { return };
        let mut candidates: Vec<Vec<Candidate>> = vec![Vec::new(); self.caches.len()];
        self.order.clear();
        for p in s.predictor.predict(s.depth) {
            if p.layer >= self.trace.num_layers() {
                continue;
            }
            let c = self.cache_of[p.layer];
            if !self.order.contains(&c) {
                self.order.push(c);
            }
            for &(e, score) in &p.experts {
                if (e as usize) < self.trace.meta.num_experts {
                    let bytes = self.sizes.get(p.layer, e);
                    candidates[c].push(Candidate {
                        key: self.key(p.layer, e),
                        distance: p.distance,
                        score,
                        bytes,
                    });
                }
            }
        }
        // A cache with no prediction this step still updates, with nothing, to drop its stale
        // protection.
        for (c, (la, cands)) in self.lookaheads.iter_mut().zip(&candidates).enumerate() {
            la.update(&self.caches[c], cands);
        }
    }

    /// Plans and loads this step's prefetches.
    fn prefetch(&mut self) -> Result<(), SimError> {
        let Some(s) = &self.steering else { return Ok(()) };
        let mut budget = s.prefetch_budget;
        for &c in &self.order {
            let (cache, la) = (&mut self.caches[c], &mut self.lookaheads[c]);
            for p in la.plan_prefetch(cache, budget) {
                budget -= p.bytes;
                self.stats.prefetches_issued += 1;
                self.stats.prefetch_bytes += p.bytes;
                let evicted = la
                    .insert(cache, p.key, (), p.bytes)
                    .map_err(|err| SimError::Invalid(format!("prefetch: {err}")))?;
                for (gone, ()) in evicted {
                    self.unused_prefetch.remove(&gone);
                }
                self.unused_prefetch.insert(p.key);
            }
        }
        Ok(())
    }

    /// MoE layer `l` needs `experts`: counts hits, loads misses, leaves all of them pinned.
    fn demand(&mut self, l: usize, experts: &[u32]) -> Result<(), SimError> {
        let c = self.cache_of[l];
        // The router names all of the layer's experts at once: the resident ones are used (and
        // pinned, since the layer computes with all of them) before any miss is loaded, so a
        // miss never evicts a sibling the layer is about to use.
        let mut missing = Vec::new();
        for &e in experts {
            let k = self.key(l, e);
            let cache = &mut self.caches[c];
            self.stats.accesses += 1;
            if cache.get(&k).is_some() {
                self.stats.hits += 1;
                if self.unused_prefetch.remove(&k) {
                    self.stats.prefetches_useful += 1;
                }
                cache.pin(&k);
            } else {
                missing.push((k, e));
            }
        }
        for (k, e) in missing {
            let bytes = self.sizes.get(l, e);
            self.stats.demand_bytes += bytes;
            let cache = &mut self.caches[c];
            let evicted = match self.lookaheads.get(c) {
                Some(la) => la.insert(cache, k, (), bytes),
                None => cache.insert(k, (), bytes, &|_| false),
            }
            .map_err(|err| SimError::Invalid(format!("demand load: {err}")))?;
            for (gone, ()) in evicted {
                self.unused_prefetch.remove(&gone);
            }
            cache.pin(&k);
        }
        Ok(())
    }
}

/// Every demand access of the trace, in replay order, as `(moe_layer, expert)`.
pub fn demand_sequence(trace: &Trace) -> impl Iterator<Item = (usize, u32)> + '_ {
    trace.tokens.iter().flat_map(|t| {
        t.layers
            .iter()
            .enumerate()
            .filter_map(|(l, c)| c.as_ref().map(|c| (l, c)))
            .flat_map(|(l, c)| c.experts.iter().map(move |&e| (l, e)))
    })
}
/// Each cache must hold at least one layer's experts at once, or a layer could not run.
fn check_capacity(trace: &Trace, sizes: &ExpertSizes, cache_budget: u64) -> Result<(), SimError> {
    for l in 0..trace.num_layers() {
        let most = trace.tokens.iter().filter_map(|t| t.layers[l].as_ref()).map(|c| c.experts.len()).max();
        let need = most.unwrap_or(0) as u64 * sizes.largest(l);
        if need > cache_budget {
            return Err(SimError::Invalid(format!(
                "a cache of {cache_budget} bytes cannot hold the {} experts MoE layer {l} uses at once ({need} bytes); \
                 give the tier a larger budget",
                most.unwrap_or(0)
            )));
        }
    }
    Ok(())
}
