//! The host-RAM expert store: routed experts live on disk and come into a byte-budgeted cache
//! when a layer's plan asks for them.
//!
//! - The store knows expert keys and byte ranges ([`layout`]), nothing else of the model.
//!   Nothing is read at start.
//! - Bookkeeping is [`stevedore_cache::Tier`]: the schedule of steps the simulator runs too,
//!   so that hits and misses are the same live and simulated (it never depends on how fast a
//!   read is). The store adds the bytes: each resident expert is one slot ([`slots`]) whose
//!   aligned buffer holds its three tensors, read by reader threads with `O_DIRECT`
//!   ([`crate::io`]).
//! - Memory promise: the tier never accounts more than the budget, and buffers exist only for
//!   accounted entries, plus an evicted entry whose read is still in flight (a reader frees it
//!   when the read ends): a reader allocates a new buffer only when the buffers alive leave room
//!   for it within the budget, so the buffers never exceed the budget either.
//! - Overlap: a layer's misses are admitted, and their reads queued, as far ahead as the budget
//!   allows; the layer computes hits first, then misses as their reads land ([`stream`]).
//!   Demand reads go before prefetches; a prefetch that a layer then asks for moves to the
//!   demand queue.

mod layout;
mod precision;
mod slots;
mod stream;
#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::Serialize;
use stevedore_cache::{CacheError, Candidate, ExpertKey, Fill, PolicyKind, Tier};

use crate::io::{IoError, IoOptions, ShardReader};
pub use layout::{ExpertFootprint, Layouts};
pub use precision::{HobbitRule, PrecisionPolicy, PrecisionStats};
use slots::{Job, SlotId, Slots};
pub use stream::StoreStream;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Model(#[from] stevedore_models::Error),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(
        "expert cache budget of {budget} bytes ({}) is below the minimum of {min} bytes ({}): \
         one layer's {top_k} active experts of up to {expert_bytes} bytes each",
        mib(*budget), mib(*min)
    )]
    BudgetTooSmall { budget: u64, min: u64, top_k: usize, expert_bytes: u64 },
    #[error("layer {layer} has no routed experts (the model has {num_layers} decoder layers; this one is not MoE)")]
    NotMoeLayer { layer: usize, num_layers: usize },
    #[error("layer {layer}: expert {expert} does not exist (the model has {num_experts} experts per layer)")]
    NoSuchExpert { layer: usize, expert: usize, num_experts: usize },
    #[error("reading {key}: {source}")]
    Read { key: ExpertKey, source: IoError },
    #[error("expert cache: {0}")]
    Cache(#[from] CacheError),
    #[error("the store has no low-bit copies of the experts (precision.policy = \"hobbit\" or \"low\" loads them)")]
    NoLowBitCopies,
    #[error("the expert I/O threads have stopped")]
    IoStopped,
    #[error("cannot start the expert I/O threads: {0}")]
    Spawn(String),
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StoreOptions {
    pub policy: PolicyKind,
    /// Never use `O_DIRECT` (to compare with it, or where the page cache is wanted).
    pub force_buffered: bool,
    /// Reader threads: more than one keeps several reads in flight, which NVMe drives reward.
    pub readers: usize,
    /// Which copy of an expert a layer uses ([`PrecisionPolicy::Hobbit`] needs the layouts'
    /// low-bit copies).
    pub precision: PrecisionPolicy,
    /// Added to the router logits of experts resident in any precision before the top-k
    /// (cache-conditional routing); 0 leaves routing alone.
    pub resident_bias: f32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            policy: PolicyKind::Lru,
            force_buffered: false,
            readers: 1,
            precision: PrecisionPolicy::Full,
            resident_bias: 0.0,
        }
    }
}

/// Counters since the store was built. Times are in seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StoreStats {
    pub policy: &'static str,
    pub budget_bytes: u64,
    /// Most bytes ever accounted at once (resident or being read); never above the budget.
    pub peak_bytes: u64,
    /// Most bytes of expert buffers alive at once; never above the budget either.
    pub buffer_peak_bytes: u64,
    pub resident_bytes: u64,
    /// Experts a layer found resident or already being read.
    pub hits: u64,
    /// Experts a layer had to start reading.
    pub misses: u64,
    pub evictions: u64,
    /// Reads started ahead of need by the predictive policy.
    pub prefetch_reads: u64,
    /// Prefetched experts later asked for by a layer (each counted once).
    pub prefetch_hits: u64,
    /// Experts the predictive policy protected that a miss evicted anyway, finding no other room.
    pub protected_evictions: u64,
    /// Expert reads completed (misses and prefetches, less those cancelled, failed or not
    /// finished), including reads of experts evicted while being read.
    pub reads: u64,
    /// Expert reads that failed (the error went to the layers that needed the expert).
    pub failed_reads: u64,
    /// Prefetches evicted before their read started, so never read.
    pub cancelled_reads: u64,
    /// Bytes transferred from the shard files, alignment padding included.
    pub bytes_read: u64,
    /// Whether every read went through `O_DIRECT` (false: the page cache may hide disk cost).
    pub direct_io: bool,
    pub readers: usize,
    /// Time the reader threads spent reading, summed over readers.
    pub read_seconds: f64,
    /// Wall time with at least one read in flight: `bytes_read / busy_seconds` is the disk
    /// bandwidth the store saw, however many readers shared it.
    pub busy_seconds: f64,
    /// Time layers waited for bytes or room.
    pub stall_seconds: f64,
    /// Experts a warm start admitted (read behind every demand, in layer order).
    pub warm_fills: u64,
    /// Bytes the warm start admitted.
    pub warm_bytes: u64,
    /// Warm-start reads landed so far.
    pub warm_reads: u64,
    /// Seconds from the warm start until its last read landed (or its last unread entry was
    /// evicted); `None` while reads are pending.
    pub warm_fill_seconds: Option<f64>,
    /// Accesses and reads by precision (all full unless the policy is HOBBIT's).
    pub precision: PrecisionStats,
}

#[derive(Default)]
struct IoCounters {
    reads: u64,
    failed_reads: u64,
    bytes_read: u64,
    read_seconds: f64,
    stall_seconds: f64,
    busy_seconds: f64,
    /// Reads in flight, and since when at least one has been.
    in_flight: usize,
    busy_since: Option<Instant>,
}

impl IoCounters {
    fn start_read(&mut self) {
        self.in_flight += 1;
        if self.in_flight == 1 {
            self.busy_since = Some(Instant::now());
        }
    }

    fn end_read(&mut self) {
        self.in_flight -= 1;
        if self.in_flight == 0 {
            self.busy_seconds += self.busy_since.take().map_or(0.0, |t| t.elapsed().as_secs_f64());
        }
    }
}

/// A warm start's progress: which of its reads are still to land.
#[derive(Default)]
struct Warm {
    started: Option<Instant>,
    pending: std::collections::HashSet<ExpertKey>,
    landed: u64,
    seconds: Option<f64>,
}

impl Warm {
    /// `key`'s warm read landed (`landed`) or will not happen (evicted first); the fill time is
    /// taken when the last one settles.
    fn settle(&mut self, key: &ExpertKey, landed: bool) {
        if self.pending.remove(key) {
            self.landed += u64::from(landed);
            if self.pending.is_empty() {
                self.seconds = self.started.map(|t| t.elapsed().as_secs_f64());
            }
        }
    }
}

struct State {
    tier: Tier<SlotId>,
    slots: Slots,
    io: IoCounters,
    precision: PrecisionStats,
    warm: Warm,
    /// Reader threads still running; 0 means every wait would be forever.
    readers_alive: usize,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a read lands or fails, a layer releases an expert, or a reader stops:
    /// what layers waiting for bytes or room wait on.
    landed: Condvar,
    /// Signalled when a read is queued, a buffer is freed, or the store shuts down: what idle
    /// readers wait on.
    work: Condvar,
    layouts: Layouts,
    reader: ShardReader,
    opts: StoreOptions,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere (no invariant spans an unwind
        // point), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, cv: &Condvar, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        cv.wait(guard).unwrap_or_else(|e| e.into_inner())
    }
}

/// Gives each entry the tier admits its slot: reusing an evicted entry's buffer of the same
/// size where one is free, and queueing its read.
/// An entry evicted before the warm start read it is no longer the warm start's to wait for.
fn fill(slots: &mut Slots, warm: &mut Warm, layouts: &Layouts, f: Fill<SlotId>) -> SlotId {
    for (key, _) in &f.evicted {
        warm.settle(key, false);
    }
    let alloc = layouts.get(f.key).expect("keys are checked before the tier sees them").alloc;
    let job = if f.prefetch { Job::Prefetch } else { Job::Demand };
    slots.admit(f.key, alloc, f.evicted.into_iter().map(|(_, id)| id), job)
}

/// Marks the readers one fewer however a reader exits (a panic included) and wakes every
/// waiter, so that layers get an error instead of waiting forever.
struct ReaderGuard<'a>(&'a Shared);

impl Drop for ReaderGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().readers_alive -= 1;
        self.0.landed.notify_all();
    }
}

/// A reader thread: takes queued reads (demand first), reads them outside the lock.
fn reader_loop(shared: &Shared, budget: u64) {
    let _guard = ReaderGuard(shared);
    let mut st = shared.lock();
    loop {
        if st.shutdown {
            return;
        }
        let Some(mut job) = st.slots.next_job(budget) else {
            st = shared.wait(&shared.work, st);
            continue;
        };
        let layout = shared.layouts.get(job.key).expect("queued keys have layouts");
        st.io.start_read();
        drop(st);
        let t0 = Instant::now();
        let buf = match job.buf.take() {
            Some(b) => Ok(b),
            None => crate::io::AlignedBuf::zeroed(layout.alloc),
        };
        // A panic while reading must not strand the layer waiting for this expert: it lands as
        // a failed read like any other.
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            buf.and_then(|mut b| {
                let mut bytes = 0;
                for seg in &layout.segments {
                    let dst = &mut b.as_mut_slice()[seg.at..seg.at + seg.span.padded];
                    bytes += shared.reader.read_into(seg.shard, seg.span, dst)?;
                }
                Ok((b, bytes))
            })
        }));
        let result = read.unwrap_or_else(|_| Err(IoError::Panicked { what: format!("reading {}", job.key) }));
        let seconds = t0.elapsed().as_secs_f64();
        st = shared.lock();
        st.io.end_read();
        st.io.read_seconds += seconds;
        match &result {
            Ok((_, bytes)) => {
                st.io.reads += 1;
                st.io.bytes_read += bytes;
                st.precision.read(job.key.precision, *bytes);
            }
            Err(e) => {
                st.io.failed_reads += 1;
                tracing::warn!("reading {}: {e}", job.key);
            }
        }
        let key = job.key;
        st.slots.land(job, result.map(|(b, _)| b));
        st.warm.settle(&key, true);
        shared.landed.notify_all();
        // A buffer may have been freed: another reader may be waiting for room.
        shared.work.notify_all();
    }
}

/// Routed experts read from disk into a byte-budgeted host cache. See the module docs.
pub struct ExpertStore {
    shared: Arc<Shared>,
    readers: Vec<JoinHandle<()>>,
}

impl ExpertStore {
    /// A store of `budget` bytes over the experts of `layouts`, reading from `shards`; starts the
    /// reader threads and reads nothing yet. `budget` must be at least the footprint's
    /// `min_budget`. With `anticipation`, the tier protects and prefetches predicted experts
    /// (the predictive policy).
    pub fn new(
        layouts: Layouts,
        shards: &[std::path::PathBuf],
        budget: u64,
        opts: StoreOptions,
        anticipation: Option<(stevedore_cache::AnticipationParams, u64)>,
        top_k: usize,
    ) -> Result<Self, StoreError> {
        let fp = layouts.footprint();
        if budget < fp.min_budget {
            return Err(StoreError::BudgetTooSmall {
                budget,
                min: fp.min_budget,
                top_k,
                expert_bytes: fp.max_expert_bytes,
            });
        }
        if opts.precision != PrecisionPolicy::Full && !layouts.has_low() {
            return Err(StoreError::NoLowBitCopies);
        }
        let reader = ShardReader::open(shards, IoOptions { force_buffered: opts.force_buffered })?;
        let mut tier = Tier::new(budget, opts.policy.build());
        if let Some((params, prefetch_budget)) = anticipation {
            tier = tier.with_anticipation(params, prefetch_budget);
        }
        let readers = opts.readers.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                tier,
                slots: Slots::default(),
                io: IoCounters::default(),
                precision: PrecisionStats {
                    policy: match opts.precision {
                        PrecisionPolicy::Full => "full",
                        PrecisionPolicy::Hobbit(_) => "hobbit",
                        PrecisionPolicy::Low => "low",
                    },
                    low_format: layouts.low_format().map(|f| f.name()),
                    ..PrecisionStats::default()
                },
                warm: Warm::default(),
                readers_alive: readers,
                shutdown: false,
            }),
            landed: Condvar::new(),
            work: Condvar::new(),
            layouts,
            reader,
            opts,
        });
        let mut handles = Vec::with_capacity(readers);
        for i in 0..readers {
            let thread_shared = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("stevedore-io-{i}"))
                .spawn(move || reader_loop(&thread_shared, budget));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // The readers not started will never decrement the count.
                    shared.lock().readers_alive -= readers - i;
                    let store = ExpertStore { shared, readers: handles };
                    drop(store);
                    return Err(StoreError::Spawn(e.to_string()));
                }
            }
        }
        Ok(ExpertStore { shared, readers: handles })
    }

    pub fn footprint(&self) -> ExpertFootprint {
        self.shared.layouts.footprint()
    }

    /// Bytes `key`'s expert occupies in the cache (its aligned buffer): what the budget counts.
    pub fn expert_bytes(&self, key: ExpertKey) -> Result<u64, StoreError> {
        Ok(self.shared.layouts.check(key)?.alloc as u64)
    }

    /// `candidates` with the store's sizes, each in the precision a layer would read it in
    /// (the low-bit copy under the `low` policy; HOBBIT's choice depends on the gate weights
    /// to come, so it prefetches and protects full precision); candidates that name no expert
    /// are dropped.
    fn sized(&self, candidates: &[Candidate]) -> Vec<Candidate> {
        let low = self.shared.opts.precision == PrecisionPolicy::Low;
        candidates
            .iter()
            .filter_map(|c| {
                let key = if low { c.key.at(stevedore_cache::Precision::Low) } else { c.key };
                Some(Candidate { key, bytes: self.shared.layouts.get(key)?.alloc as u64, ..*c })
            })
            .collect()
    }

    /// The start of a forward pass: protection moves onto `candidates` and the predictive
    /// policy's prefetches are queued (nothing happens for other policies).
    pub fn begin_step(&self, candidates: &[Candidate]) {
        let candidates = self.sized(candidates);
        let mut guard = self.shared.lock();
        let State { tier, slots, warm, .. } = &mut *guard;
        let layouts = &self.shared.layouts;
        tier.begin_step(&candidates, &mut |f| fill(slots, warm, layouts, f));
        drop(guard);
        self.shared.work.notify_all();
    }

    /// A warm start: admits every expert in layer order while the budget has room (evicting
    /// nothing) and queues their reads behind every demand, so that a model the budget holds
    /// reaches full speed after one sequential pass over its experts instead of one miss at a
    /// time. A layer that asks for an expert still queued moves its read to the front. Returns
    /// the number of experts admitted.
    pub fn warm(&self) -> usize {
        // The copies a layer reads first: the low-bit ones under the `low` policy.
        let precision = match self.shared.opts.precision {
            PrecisionPolicy::Low => stevedore_cache::Precision::Low,
            PrecisionPolicy::Full | PrecisionPolicy::Hobbit(_) => stevedore_cache::Precision::Full,
        };
        let keys = self.shared.layouts.all_keys(precision);
        let mut guard = self.shared.lock();
        let State { tier, slots, warm, .. } = &mut *guard;
        let layouts = &self.shared.layouts;
        warm.started = Some(Instant::now());
        let n = tier.warm(&keys, &mut |f| {
            warm.pending.insert(f.key);
            fill(slots, warm, layouts, f)
        });
        if n == 0 {
            warm.seconds = Some(0.0);
        }
        drop(guard);
        self.shared.work.notify_all();
        tracing::info!(experts = n, "warm start: reading experts in layer order");
        n
    }

    /// Sets how far ahead the predictive policy prefetches: `layers` MoE layers, at most
    /// `bytes` per prefetch round (see [`crate::horizon`]).
    pub fn set_horizon(&self, layers: usize, bytes: u64) {
        self.shared.lock().tier.set_prefetch(layers, bytes);
    }

    pub fn stats(&self) -> StoreStats {
        let st = self.shared.lock();
        let (t, c, io) = (st.tier.stats(), st.tier.cache_stats(), &st.io);
        StoreStats {
            policy: st.tier.cache().policy_name(),
            budget_bytes: st.tier.cache().budget(),
            peak_bytes: c.peak_bytes,
            buffer_peak_bytes: st.slots.peak_bytes(),
            resident_bytes: c.bytes,
            hits: t.hits,
            misses: t.misses,
            evictions: c.evictions,
            prefetch_reads: t.prefetches,
            prefetch_hits: t.prefetch_hits,
            protected_evictions: t.protected_evictions,
            reads: io.reads,
            failed_reads: io.failed_reads,
            cancelled_reads: st.slots.cancelled(),
            bytes_read: io.bytes_read,
            direct_io: self.shared.reader.direct_io(),
            readers: self.readers.len(),
            read_seconds: io.read_seconds,
            busy_seconds: io.busy_seconds + io.busy_since.map_or(0.0, |t| t.elapsed().as_secs_f64()),
            stall_seconds: io.stall_seconds,
            warm_fills: t.warm_fills,
            warm_bytes: t.warm_bytes,
            warm_reads: st.warm.landed,
            warm_fill_seconds: st.warm.seconds,
            precision: st.precision.clone(),
        }
    }

    /// [`StoreOptions::resident_bias`] for each expert of decoder layer `layer` resident in
    /// any precision (or being read); `None` when the bias is 0.
    pub fn routing_bias(&self, layer: stevedore_models::LayerId) -> Option<Vec<f32>> {
        let lambda = self.shared.opts.resident_bias;
        if lambda == 0.0 {
            return None;
        }
        let st = self.shared.lock();
        let n = self.shared.layouts.num_experts();
        Some(
            (0..n)
                .map(|e| {
                    let key = ExpertKey::new(layer.0, e);
                    let resident =
                        stevedore_cache::Precision::ALL.iter().any(|&p| st.tier.contains(&key.at(p)));
                    if resident {
                        lambda
                    } else {
                        0.0
                    }
                })
                .collect(),
        )
    }
}

impl Drop for ExpertStore {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
        for h in self.readers.drain(..) {
            let _ = h.join();
        }
    }
}
