//! Replays a trace through one tier of expert caches under one policy, counting what the live
//! engine counts: demand hits and misses, bytes loaded, prefetches issued and used.
//!
//! The schedule is the engine's own (`docs/traces.md`, "Simulating a trace"): the trace's
//! forward passes (its `step`s; a token per step where the trace has none) replayed in order,
//! each through [`Forecaster`] and [`Tier`] exactly as the engine's step loop and expert store
//! call them: the step's start, then every MoE layer with a recorded routing (the union of its
//! rows' experts, ascending). Only the bytes are imaginary, so reads take no time: a prefetch
//! admitted at one step is resident for every later one.

use std::ops::Range;

use stevedore_cache::{
    AnticipationParams, BeladyPolicy, Candidate, ExpertKey, Policy, PolicyKind, Tier, TierStats,
};
use stevedore_predictor::{RoutePredictor, RoutingShape};

use super::{ExpertSizes, SimError};
use crate::config::Split;
use crate::forecast::{Forecaster, RowAhead, StepRow};
use crate::trace::Trace;

/// The policies the simulator compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    Policy(PolicyKind),
    /// Optimal replacement with knowledge of the future: the upper bound for demand caching.
    Belady,
}

impl Contender {
    pub const ALL: [Contender; 4] = [
        Contender::Policy(PolicyKind::Lru),
        Contender::Policy(PolicyKind::Lfu),
        Contender::Policy(PolicyKind::Predictive),
        Contender::Belady,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Contender::Policy(p) => p.name(),
            Contender::Belady => "belady",
        }
    }
}

/// What steers the predictive policy in one replay.
pub struct Steering {
    pub predictor: Box<dyn RoutePredictor>,
    pub params: AnticipationParams,
    /// MoE layers looked ahead.
    pub depth: usize,
    /// Most bytes prefetched per step, over all caches of the tier.
    pub prefetch_budget: u64,
}

/// Counts from one replay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    pub tokens: u64,
    /// Expert uses: one per (step, recorded layer, expert the step's rows chose).
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

    fn add(&mut self, t: TierStats) {
        self.accesses += t.accesses;
        self.hits += t.hits;
        self.demand_bytes += t.demand_bytes;
        self.prefetch_bytes += t.prefetch_bytes;
        self.prefetches_issued += t.prefetches;
        self.prefetches_useful += t.prefetch_hits;
    }
}

/// The trace's steps as token ranges: tokens of the same `step` in a row form one; a token
/// without a step is a step of its own.
pub fn steps(trace: &Trace) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for (i, t) in trace.tokens.iter().enumerate() {
        match out.last_mut() {
            Some(r) if t.step.is_some() && trace.tokens[r.start].step == t.step => r.end = i + 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

/// The experts each layer step needs, in replay order, as `(moe_layer, experts ascending)`.
pub fn layer_steps(trace: &Trace) -> impl Iterator<Item = (usize, Vec<u32>)> + '_ {
    steps(trace).into_iter().flat_map(move |range| {
        let tokens = &trace.tokens[range];
        (0..trace.num_layers()).filter_map(move |l| {
            let mut experts: Vec<u32> = tokens
                .iter()
                .filter_map(|t| t.layers[l].as_ref())
                .flat_map(|c| c.experts.iter().copied())
                .collect();
            experts.sort_unstable();
            experts.dedup();
            (!experts.is_empty()).then_some((l, experts))
        })
    })
}

/// How the simulated budget is laid out: one cache or one per layer, and whether it starts warm
/// (the engine's `engine.warm_start`: every cache filled in layer order before the first step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caches {
    pub split: Split,
    pub warm: bool,
}

impl From<Split> for Caches {
    fn from(split: Split) -> Self {
        Caches { split, warm: false }
    }
}

/// Replays `trace` through a tier of `budget` bytes (laid out as `caches` says) under `contender`.
/// `steering` is required for the predictive policy and ignored otherwise. Steps starting
/// before token `warmup` warm the caches and the predictor but are not counted.
pub fn replay(
    trace: &Trace,
    sizes: &ExpertSizes,
    budget: u64,
    caches: impl Into<Caches>,
    contender: Contender,
    steering: Option<Steering>,
    warmup: usize,
) -> Result<RunStats, SimError> {
    let predictive = contender == Contender::Policy(PolicyKind::Predictive);
    let steering = match (predictive, steering) {
        (true, None) => return Err(SimError::Invalid("the predictive policy needs a predictor".into())),
        (true, s) => s,
        (false, _) => None,
    };
    let Caches { split, warm } = caches.into();
    let layers = trace.num_layers();
    let cache_of: Vec<usize> = match split {
        Split::Shared => vec![0; layers],
        Split::PerLayer => (0..layers).collect(),
    };
    let num_caches = cache_of.iter().max().map_or(1, |m| m + 1);
    let cache_budget = budget / num_caches as u64;
    check_capacity(trace, sizes, cache_budget)?;
    let key = |l: usize, e: u32| ExpertKey::new(trace.meta.layer_ids[l] as usize, e as usize);
    let mut tiers: Vec<Tier<()>> = (0..num_caches)
        .map(|c| {
            let policy: Box<dyn Policy> = match contender {
                Contender::Policy(p) => p.build(),
                Contender::Belady => Box::new(BeladyPolicy::new(
                    layer_steps(trace)
                        .filter(|(l, _)| cache_of[*l] == c)
                        .flat_map(|(l, experts)| experts.into_iter().map(move |e| key(l, e))),
                )),
            };
            let tier = Tier::new(cache_budget, policy);
            match &steering {
                Some(s) => tier.with_anticipation(s.params, s.prefetch_budget / num_caches as u64),
                None => tier,
            }
        })
        .collect();
    if warm {
        // As the live store: each cache takes its layers' experts in layer order while they fit.
        for (c, tier) in tiers.iter_mut().enumerate() {
            let keys: Vec<(ExpertKey, u64)> = (0..layers)
                .filter(|&l| cache_of[l] == c)
                .flat_map(|l| (0..trace.meta.num_experts as u32).map(move |e| (l, e)))
                .map(|(l, e)| (key(l, e), sizes.get(l, e)))
                .collect();
            tier.warm(&keys, &mut |_| ());
        }
    }
    let mut forecaster = steering.map(|s| {
        let layer_ids = trace.meta.layer_ids.iter().map(|&l| l as usize).collect();
        Forecaster::new(s.predictor, RoutingShape::from(&trace.meta), layer_ids, s.depth)
    });
    // Candidates by the cache their layer belongs to, with the tier's sizes.
    let layer_of = |k: &ExpertKey| trace.meta.layer_ids.iter().position(|&l| l == k.layer);
    let route = |cands: Vec<Candidate>| -> Vec<Vec<Candidate>> {
        let mut out = vec![Vec::new(); num_caches];
        for c in cands {
            if let Some(l) = layer_of(&c.key) {
                out[cache_of[l]].push(Candidate { bytes: sizes.get(l, c.key.expert), ..c });
            }
        }
        out
    };
    let mut tokens = 0u64;
    let mut counting = warmup == 0;
    for range in steps(trace) {
        if !counting && range.start >= warmup {
            // Count from here; a prefetch issued while warming up is not this part's to claim.
            counting = true;
            tiers.iter_mut().for_each(Tier::reset_stats);
        }
        if counting {
            tokens += range.len() as u64;
        }
        let rows = &trace.tokens[range];
        // A horizon the live run measured is replayed as it was set.
        if let Some(h) = rows.iter().find_map(|t| t.horizon) {
            tiers.iter_mut().for_each(|t| t.set_prefetch(h.layers, h.bytes / num_caches as u64));
        }
        if let Some(f) = forecaster.as_mut() {
            let step_rows: Vec<StepRow> =
                rows.iter().map(|t| StepRow { seq: t.seq, token: t.token_id }).collect();
            let start = |r: usize| -> RowAhead<'_> {
                rows[r].ahead_at(None).map(|a| (a.layer, &a.experts[..], &a.probs[..])).collect()
            };
            for (tier, cands) in tiers.iter_mut().zip(route(f.begin_step(&step_rows, start))) {
                tier.begin_step(&cands, &mut |_| ());
            }
        }
        for l in 0..layers {
            let choice = |r: usize| rows[r].layers[l].as_ref().map(|c| (&c.experts[..], &c.weights[..]));
            let mut experts: Vec<u32> =
                (0..rows.len()).filter_map(choice).flat_map(|(e, _)| e.iter().copied()).collect();
            if experts.is_empty() {
                continue;
            }
            experts.sort_unstable();
            experts.dedup();
            // The routing is known: predictions move on before the misses are loaded, so that
            // the misses evict around the experts predicted for the layers ahead.
            let cands = match forecaster.as_mut() {
                Some(f) => route(f.observe(l, choice, |r| {
                    rows[r].ahead_at(Some(l)).map(|a| (a.layer, &a.experts[..], &a.probs[..])).collect()
                })),
                None => vec![Vec::new(); num_caches],
            };
            for (tier, cands) in tiers.iter_mut().zip(&cands) {
                tier.steer(cands);
            }
            let keys: Vec<(ExpertKey, u64)> = experts.iter().map(|&e| (key(l, e), sizes.get(l, e))).collect();
            let tier = &mut tiers[cache_of[l]];
            let mut demand = tier.begin(&keys);
            let fail = |e: stevedore_cache::CacheError| SimError::Invalid(format!("demand load: {e}"));
            tier.advance(&mut demand, &mut |_| ()).map_err(fail)?;
            while demand.front().is_some() {
                tier.release(&mut demand);
                tier.advance(&mut demand, &mut |_| ()).map_err(fail)?;
            }
        }
    }
    let mut stats = RunStats { tokens, ..RunStats::default() };
    for tier in &tiers {
        stats.add(tier.stats());
    }
    Ok(stats)
}

/// Each cache must hold one token's experts of any layer (`top_k` of the layer's largest), as
/// the live store requires of its budget; a step that needs more of a layer loads them in turn.
fn check_capacity(trace: &Trace, sizes: &ExpertSizes, cache_budget: u64) -> Result<(), SimError> {
    for l in 0..trace.num_layers() {
        let most = trace.tokens.iter().filter_map(|t| t.layers[l].as_ref()).map(|c| c.experts.len()).max();
        let need = most.unwrap_or(0) as u64 * sizes.largest(l);
        if need > cache_budget {
            return Err(SimError::Invalid(format!(
                "a cache of {cache_budget} bytes cannot hold the {} experts one token uses at MoE layer {l} ({need} \
                 bytes); give the tier a larger budget",
                most.unwrap_or(0)
            )));
        }
    }
    Ok(())
}
