//! One layer's experts pulled from the store: the live side of a [`Tier`] layer step. The
//! stream computes nothing; it admits, queues reads, waits, and hands out pinned weights in the
//! demand's order (hits first, then misses as their reads land).

use std::sync::Arc;
use std::time::Instant;

use stevedore_cache::{Candidate, Demand, ExpertKey, Precision};
use stevedore_models::{
    ExpertFailure, ExpertPlan, ExpertSource, ExpertStream, ExpertsError, LayerId, ReadyExperts, Served,
};

use super::precision::Need;
use super::{fill, ExpertStore, PrecisionPolicy, State, StoreError};
use crate::io::AlignedBuf;

/// The experts of one [`ExpertPlan`], delivered as they become ready; dropping it releases
/// every pin it still holds (also on error or panic).
pub struct StoreStream<'p> {
    store: &'p ExpertStore,
    plan: &'p ExpertPlan<'p>,
    demand: Demand,
    /// The buffers of the experts handed out last, kept alive until the next call.
    current: Vec<Arc<AlignedBuf>>,
    /// How many experts at the front of the demand were handed out, to be released on the next
    /// call.
    holding: usize,
    /// Plan entries the precision policy skipped, still to be handed out (first).
    skipped: Vec<usize>,
}

fn failure(expert: Option<usize>, e: StoreError) -> ExpertFailure {
    ExpertFailure { expert, error: Arc::new(e) }
}

impl ExpertStore {
    /// Starts `plan`'s layer step: protection moves onto `candidates` (predictions for the
    /// layers ahead), the layer's experts are looked up (hits pinned at once), and the misses
    /// that fit are admitted and their reads queued, demand reads before any prefetch.
    pub fn stream<'p>(
        &'p self,
        plan: &'p ExpertPlan<'_>,
        candidates: &[Candidate],
    ) -> Result<StoreStream<'p>, StoreError> {
        let layouts = &self.shared.layouts;
        let policy = self.shared.opts.precision;
        let hobbit = match policy {
            PrecisionPolicy::Hobbit(rule) => Some(rule),
            PrecisionPolicy::Full | PrecisionPolicy::Low => None,
        };
        // What each expert's rows need of it (HOBBIT), decided before taking the lock.
        let needs: Vec<Need> = match &hobbit {
            Some(rule) => (0..plan.experts.len()).map(|i| rule.need(plan, i)).collect(),
            None => Vec::new(),
        };
        let candidates = self.sized(candidates);
        let mut guard = self.shared.lock();
        let State { tier, slots, warm, precision, .. } = &mut *guard;
        // Each expert's copy: full precision, or what the rule picks given what is resident
        // (each key checked here; an error returns before the tier is touched).
        let (mut keys, mut skipped) = (Vec::with_capacity(plan.experts.len()), Vec::new());
        for (i, e) in plan.experts.iter().enumerate() {
            let full = ExpertKey::new(plan.layer.0, e.expert as usize);
            let full_bytes = layouts.check(full)?.alloc as u64;
            let chosen = match &hobbit {
                None if policy == PrecisionPolicy::Low => Some(Precision::Low),
                None => Some(Precision::Full),
                Some(rule) => {
                    let low = full.at(Precision::Low);
                    rule.choose(needs[i], tier.contains(&full), tier.contains(&low))
                }
            };
            match chosen {
                Some(Precision::Full) => keys.push((full, full_bytes)),
                Some(p) => {
                    let key = full.at(p);
                    keys.push((key, layouts.check(key)?.alloc as u64));
                }
                None => skipped.push(i),
            }
        }
        precision.skipped += skipped.len() as u64;
        // An entry whose read failed is read again by the next layer that needs it.
        for (key, _) in &keys {
            if let Some(&id) = tier.peek(key) {
                if slots.failed(id) && !tier.cache().is_pinned(key) {
                    tier.remove(key);
                    slots.free(id);
                }
            }
        }
        for (key, _) in &keys {
            precision.access(key.precision, tier.contains(key));
        }
        tier.steer(&candidates);
        let mut demand = tier.begin(&keys);
        for key in demand.pinned() {
            slots.raise(*tier.peek(&key).expect("pinned keys are resident"));
        }
        let advanced = tier.advance(&mut demand, &mut |f| fill(slots, warm, layouts, f));
        if let Err(e) = advanced {
            tier.abandon(&mut demand);
            drop(guard);
            // Reads queued before the error still want a reader.
            self.shared.work.notify_all();
            return Err(e.into());
        }
        drop(guard);
        self.shared.work.notify_all();
        // The plan's contents outlive 'p; narrowing its lifetime parameter to 'p is a coercion.
        let plan: &'p ExpertPlan<'p> = plan;
        Ok(StoreStream { store: self, plan, demand, current: Vec::new(), holding: 0, skipped })
    }
}

impl StoreStream<'_> {
    fn index_of(&self, key: ExpertKey) -> usize {
        self.plan
            .experts
            .binary_search_by_key(&key.expert, |u| u.expert)
            .expect("the demand's keys are the plan's experts")
    }
}

impl ExpertStream for StoreStream<'_> {
    fn next_ready(&mut self, max: usize) -> Option<Result<ReadyExperts<'_>, ExpertFailure>> {
        if !self.skipped.is_empty() {
            let n = self.skipped.len().min(max.max(1));
            return Some(Ok(self.skipped.drain(..n).map(|i| (i, Served::Skipped)).collect()));
        }
        let shared = &self.store.shared;
        let layouts = &shared.layouts;
        let mut st = shared.lock();
        let mut failed = None;
        if self.holding > 0 {
            self.current.clear();
            // One release and one admission round per expert handed out, as if they had come
            // one at a time: the tier sees the same calls whatever was ready together (which
            // depends on read timing), so hits and misses stay those of the simulator.
            for _ in 0..std::mem::take(&mut self.holding) {
                let State { tier, slots, warm, .. } = &mut *st;
                tier.release(&mut self.demand);
                if let Err(e) = tier.advance(&mut self.demand, &mut |f| fill(slots, warm, layouts, f)) {
                    failed = Some(e);
                    break;
                }
            }
            shared.landed.notify_all();
        }
        let mut stalled: Option<Instant> = None;
        let result = loop {
            if let Some(e) = failed.take() {
                break Some(Err(failure(None, e.into())));
            }
            let State { tier, slots, warm, .. } = &mut *st;
            let advanced = tier.advance(&mut self.demand, &mut |f| fill(slots, warm, layouts, f));
            shared.work.notify_all();
            if let Err(e) = advanced {
                break Some(Err(failure(None, e.into())));
            }
            if self.demand.is_done() {
                break None;
            }
            if let Some(key) = self.demand.front() {
                let id = *tier.peek(&key).expect("the demand pins its front");
                match slots.data(id) {
                    Some(Ok(_)) => {
                        // The front and the pinned experts after it whose bytes are in, up to
                        // `max`: all handed out now, released together on the next call.
                        let mut ready = Vec::new();
                        for key in self.demand.pinned().take(max.max(1)) {
                            let id = *tier.peek(&key).expect("pinned keys are resident");
                            let Some(Ok(buf)) = slots.data(id) else { break };
                            self.current.push(Arc::clone(buf));
                            ready.push(key);
                        }
                        self.holding = ready.len();
                        break Some(Ok(ready));
                    }
                    Some(Err(e)) => {
                        let error = StoreError::Read { key, source: e.clone() };
                        tier.release(&mut self.demand);
                        break Some(Err(failure(Some(self.index_of(key)), error)));
                    }
                    None => {}
                }
            }
            // Waiting for a read to land, or (when other streams hold the room) for a release.
            if st.readers_alive == 0 {
                break Some(Err(failure(None, StoreError::IoStopped)));
            }
            stalled.get_or_insert_with(Instant::now);
            st = shared.wait(&shared.landed, st);
        };
        if let Some(t) = stalled {
            st.io.stall_seconds += t.elapsed().as_secs_f64();
        }
        drop(st);
        match result? {
            Ok(keys) => Some(Ok(keys
                .into_iter()
                .zip(&self.current)
                .map(|(key, buf)| {
                    let layout = layouts.get(key).expect("checked when the stream began");
                    (self.index_of(key), Served::Weights(layout.weights(buf.as_slice())))
                })
                .collect())),
            Err(f) => Some(Err(f)),
        }
    }
}

impl Drop for StoreStream<'_> {
    fn drop(&mut self) {
        self.current.clear();
        let mut st = self.store.shared.lock();
        st.tier.abandon(&mut self.demand);
        drop(st);
        self.store.shared.landed.notify_all();
    }
}

impl ExpertSource for ExpertStore {
    /// Without predictions, estimates would go unused.
    fn foresight(&self) -> Option<stevedore_models::Foresight> {
        None
    }

    fn routing_bias(&self, layer: LayerId) -> Option<Vec<f32>> {
        ExpertStore::routing_bias(self, layer)
    }

    /// A layer step without predictions (the predictive policy then protects nothing).
    fn stream<'p>(&'p self, plan: &'p ExpertPlan<'_>) -> Result<Box<dyn ExpertStream + 'p>, ExpertsError> {
        match ExpertStore::stream(self, plan, &[]) {
            Ok(s) => Ok(Box::new(s)),
            Err(e) => Err(Arc::new(e)),
        }
    }
}
