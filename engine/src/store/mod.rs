//! The host-RAM expert store: routed experts live on disk and come into a byte-budgeted cache
//! when a layer's routing asks for them.
//!
//! - The store knows expert keys and byte ranges ([`layout`]), nothing else of the model.
//!   Nothing is read at start.
//! - Each resident expert is ONE aligned buffer holding its three tensors, read by one
//!   `O_DIRECT` read where its tensors are adjacent on disk ([`crate::io`]).
//! - Memory promise: the cache accounts every buffer from the moment its read is queued (the
//!   entry is inserted, pinned, before the bytes exist) until it is evicted, and the cache never
//!   exceeds its budget. An entry is evictable only when nobody holds it: a read in flight and
//!   an expert being computed on are pinned, so no buffer is alive outside the budget.
//! - Overlap: one I/O thread reads a `for_each` call's misses in routing order, ahead of the
//!   expert being computed on, as far as the budget allows (at the minimum budget, `top_k`
//!   experts: one computed on while the next is read; with less room, one at a time). `f` is
//!   called in routing order whatever the budget, so outputs never depend on it.
//! - Steering (the `predictive` policy): with a [`Lookahead`] set, a caller hands
//!   [`ExpertStore::for_each_steered`] the experts predicted for the coming layers as
//!   [`Candidate`]s. The store protects the resident ones before this call's misses are
//!   inserted, inserts the misses around them (a read-ahead waits rather than evict a protected
//!   expert; the expert the caller waits for evicts one if nothing else can go), and once all of
//!   this call's reads are queued starts the prefetches the lookahead plans, which the I/O
//!   thread reads after any demand read. The store takes candidates, never a predictor:
//!   [`crate::prefetch`] turns routing into candidates.

mod layout;
#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use serde::Serialize;
use stevedore_cache::{Cache, CacheError, Candidate, ExpertKey, Lookahead, LookaheadParams, Policy};
use stevedore_models::{ExpertWeights, Experts, ExpertsError, LayerRouting, ModelConfig, WeightIndex};

use crate::io::{AlignedBuf, IoError, IoOptions, ShardReader};
use layout::{ExpertLayout, Layouts};

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
    #[error("layer {layer} has no routed experts (the model has {num_layers} layers; this one is not MoE)")]
    NotMoeLayer { layer: usize, num_layers: usize },
    #[error("layer {layer}: expert {expert} does not exist (the model has {num_experts} experts per layer)")]
    NoSuchExpert { layer: usize, expert: usize, num_experts: usize },
    #[error("reading {key}: {source}")]
    Read { key: ExpertKey, source: IoError },
    #[error("expert cache: {0}")]
    Cache(#[from] CacheError),
    #[error("the expert I/O thread has stopped")]
    IoStopped,
    #[error("cannot start the expert I/O thread: {0}")]
    Spawn(String),
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// Never use `O_DIRECT` (to compare with it, or where the page cache is wanted).
    pub force_buffered: bool,
    /// Most experts read ahead of the one being computed on within a `for_each` call (the
    /// budget bounds it too). 0 turns overlap off, to measure what it buys.
    pub lookahead: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { force_buffered: false, lookahead: usize::MAX }
    }
}

/// What a checkpoint's routed experts cost the store, in accounted (aligned) bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ExpertFootprint {
    /// Routed experts over all MoE layers.
    pub experts: u64,
    /// The largest expert's buffer.
    pub max_expert_bytes: u64,
    /// All experts' buffers: a budget of this much holds every expert at once.
    pub total_bytes: u64,
    /// The smallest budget the store accepts: `top_k` times `max_expert_bytes`.
    pub min_budget: u64,
}

/// Counters since the store was built. Times are in seconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StoreStats {
    pub policy: &'static str,
    pub budget_bytes: u64,
    /// Most bytes ever accounted at once (resident + being read); never above the budget.
    pub peak_bytes: u64,
    pub resident_bytes: u64,
    /// Experts a `for_each` found resident or already being read.
    pub hits: u64,
    /// Experts a `for_each` had to start reading.
    pub misses: u64,
    pub evictions: u64,
    /// Reads started by [`ExpertStore::prefetch`].
    pub prefetch_reads: u64,
    /// Prefetched experts later asked for by a `for_each` (each counted once).
    pub prefetch_hits: u64,
    /// Experts the lookahead protected that a demand miss evicted anyway, finding no other
    /// room (how often protection had to yield).
    pub protected_evictions: u64,
    /// Expert reads completed (misses + prefetches, less any not finished yet).
    pub reads: u64,
    /// Bytes transferred from the shard files, alignment padding included.
    pub bytes_read: u64,
    /// Whether every read went through `O_DIRECT` (false: the page cache may hide disk cost).
    pub direct_io: bool,
    /// Time the I/O thread spent reading.
    pub read_seconds: f64,
    /// Time `for_each` callers waited for room or for bytes.
    pub stall_seconds: f64,
}

#[derive(Default)]
struct Counters {
    hits: u64,
    misses: u64,
    prefetch_reads: u64,
    prefetch_hits: u64,
    protected_evictions: u64,
    reads: u64,
    bytes_read: u64,
    read_seconds: f64,
    stall_seconds: f64,
}

/// One expert's bytes: a single aligned buffer holding its three tensors, filled once by the
/// I/O thread. The cache holds it from before the read starts, so its bytes are accounted
/// while being read.
struct ExpertBuf {
    key: ExpertKey,
    prefetched: bool,
    /// A read of it has started (it can be queued twice: by a prefetch, then by demand).
    claimed: AtomicBool,
    /// A `for_each` has asked for it (to count each prefetch hit once).
    used: AtomicBool,
    /// The buffer of an expert this one evicted, to read into instead of allocating: a fresh
    /// allocation costs a memset and a page fault per 4 KiB, which halved the read rate of
    /// multi-MiB experts. Its bytes moved from the evicted entry's account to this one's.
    recycled: Mutex<Option<AlignedBuf>>,
    data: OnceLock<Result<AlignedBuf, IoError>>,
}

impl ExpertBuf {
    fn new(key: ExpertKey, prefetched: bool) -> Arc<Self> {
        Arc::new(ExpertBuf {
            key,
            prefetched,
            claimed: AtomicBool::new(false),
            used: AtomicBool::new(false),
            recycled: Mutex::new(None),
            data: OnceLock::new(),
        })
    }

    /// Before its read is queued: keeps one buffer of `evicted` (the entries its insert pushed
    /// out) that is exactly `alloc` bytes and referenced nowhere else, to read into. The rest
    /// of `evicted` is freed here.
    fn recycle(&self, evicted: Vec<(ExpertKey, Arc<ExpertBuf>)>, alloc: usize) {
        let found = evicted
            .into_iter()
            .filter_map(|(_, buf)| Arc::try_unwrap(buf).ok()?.data.into_inner()?.ok())
            .find(|data| data.len() == alloc);
        *self.recycled.lock().unwrap_or_else(|e| e.into_inner()) = found;
    }
}

/// The prediction side of the `predictive` policy, kept beside the cache it steers.
struct Steer {
    lookahead: Lookahead,
    /// Most bytes prefetched per steered call.
    prefetch_budget: u64,
}

struct State {
    cache: Cache<Arc<ExpertBuf>>,
    counters: Counters,
    io_stopped: bool,
    steer: Option<Steer>,
}

impl State {
    /// Whether the lookahead protects `key` from eviction now.
    fn protects(&self, key: &ExpertKey) -> bool {
        self.steer.as_ref().is_some_and(|s| s.lookahead.protects(key))
    }
}

/// Unpins `buf`'s entry if the cache still holds that very buffer (a failed read is removed,
/// and the key may have been loaded again since).
fn unpin_same(cache: &mut Cache<Arc<ExpertBuf>>, buf: &Arc<ExpertBuf>) {
    if cache.peek(&buf.key).is_some_and(|b| Arc::ptr_eq(b, buf)) {
        cache.unpin(&buf.key);
    }
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a read completes, an entry is unpinned, or the I/O thread stops.
    changed: Condvar,
    layouts: Layouts,
    reader: ShardReader,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere (no invariant spans an unwind
        // point), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).unwrap_or_else(|e| e.into_inner())
    }

    /// Reads one expert (unless another job already did), publishes the bytes, and drops the
    /// read's pin. A failed read leaves the cache so that a later request tries again.
    fn load(&self, buf: &Arc<ExpertBuf>) {
        if buf.claimed.swap(true, Ordering::AcqRel) {
            return;
        }
        let t0 = Instant::now();
        let layout = self.layouts.get(buf.key).expect("keys are checked before their reads are queued");
        let recycled = buf.recycled.lock().unwrap_or_else(|e| e.into_inner()).take();
        let result = read_expert(&self.reader, layout, recycled);
        let seconds = t0.elapsed().as_secs_f64();
        let (data, bytes) = match result {
            Ok((data, bytes)) => (Ok(data), bytes),
            Err(e) => {
                tracing::warn!("reading {}: {e}", buf.key);
                (Err(e), 0)
            }
        };
        let failed = data.is_err();
        let _ = buf.data.set(data);
        {
            let mut st = self.lock();
            st.counters.reads += 1;
            st.counters.bytes_read += bytes;
            st.counters.read_seconds += seconds;
            unpin_same(&mut st.cache, buf);
            if failed && st.cache.peek(&buf.key).is_some_and(|b| Arc::ptr_eq(b, buf)) {
                st.cache.remove(&buf.key);
            }
        }
        self.changed.notify_all();
    }
}

/// Reads one expert into `recycled` (an evicted expert's buffer of the same size) or a new buffer.
fn read_expert(
    reader: &ShardReader,
    layout: &ExpertLayout,
    recycled: Option<AlignedBuf>,
) -> Result<(AlignedBuf, u64), IoError> {
    let mut buf = match recycled {
        Some(b) if b.len() == layout.alloc => b,
        _ => AlignedBuf::zeroed(layout.alloc)?,
    };
    let mut bytes = 0;
    for seg in &layout.segments {
        bytes += reader.read_into(
            seg.shard,
            seg.span,
            &mut buf.as_mut_slice()[seg.at..seg.at + seg.span.padded],
        )?;
    }
    Ok((buf, bytes))
}

/// Marks the I/O thread stopped however it exits (a panic included) and wakes every waiter, so
/// that callers get an error instead of waiting forever.
struct StopGuard<'a>(&'a Shared);

impl Drop for StopGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().io_stopped = true;
        self.0.changed.notify_all();
    }
}

/// The I/O thread: demand reads first, prefetches when no demand read waits.
fn io_loop(shared: &Shared, demand: Receiver<Arc<ExpertBuf>>, prefetch: Receiver<Arc<ExpertBuf>>) {
    let _guard = StopGuard(shared);
    loop {
        let buf = match demand.try_recv() {
            Ok(buf) => buf,
            Err(TryRecvError::Disconnected) => return,
            Err(TryRecvError::Empty) => crossbeam_channel::select! {
                recv(demand) -> m => match m { Ok(buf) => buf, Err(_) => return },
                recv(prefetch) -> m => match m { Ok(buf) => buf, Err(_) => return },
            },
        };
        shared.load(&buf);
    }
}

struct IoThread {
    demand: Sender<Arc<ExpertBuf>>,
    prefetch: Sender<Arc<ExpertBuf>>,
    handle: JoinHandle<()>,
}

/// Routed experts read from disk into a byte-budgeted host cache. See the module docs.
pub struct ExpertStore {
    shared: Arc<Shared>,
    /// `None` only while dropping.
    io: Option<IoThread>,
    lookahead: usize,
    min_budget: u64,
}

impl ExpertStore {
    /// Plans every routed expert's reads from `index` (checking each tensor's dtype and shape
    /// against `cfg`), opens the shard files, and starts the I/O thread. Reads nothing yet.
    /// `budget` is in bytes and must be at least [`ExpertStore::min_budget_for`].
    pub fn new(
        index: &WeightIndex,
        cfg: &ModelConfig,
        budget: u64,
        policy: Box<dyn Policy>,
        opts: StoreOptions,
    ) -> Result<Self, StoreError> {
        let layouts = Layouts::build(index, cfg)?;
        let (min_budget, top_k, expert_bytes) = min_budget(&layouts, cfg);
        if budget < min_budget {
            return Err(StoreError::BudgetTooSmall { budget, min: min_budget, top_k, expert_bytes });
        }
        let paths: Vec<_> = index.shards.iter().map(|s| s.path.clone()).collect();
        let reader = ShardReader::open(&paths, IoOptions { force_buffered: opts.force_buffered })?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                cache: Cache::new(budget, policy),
                counters: Counters::default(),
                io_stopped: false,
                steer: None,
            }),
            changed: Condvar::new(),
            layouts,
            reader,
        });
        let (demand_tx, demand_rx) = crossbeam_channel::unbounded();
        let (prefetch_tx, prefetch_rx) = crossbeam_channel::unbounded();
        let thread_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("stevedore-io".into())
            .spawn(move || io_loop(&thread_shared, demand_rx, prefetch_rx))
            .map_err(|e| StoreError::Spawn(e.to_string()))?;
        Ok(ExpertStore {
            shared,
            io: Some(IoThread { demand: demand_tx, prefetch: prefetch_tx, handle }),
            lookahead: opts.lookahead,
            min_budget,
        })
    }

    /// The smallest budget [`ExpertStore::new`] accepts for this checkpoint: one layer's
    /// `top_k` active experts, each as large as the largest expert's buffer.
    pub fn min_budget_for(index: &WeightIndex, cfg: &ModelConfig) -> Result<u64, StoreError> {
        Ok(Self::footprint(index, cfg)?.min_budget)
    }

    /// The bytes the store would account for this checkpoint's experts (checks every expert
    /// tensor, reads nothing). Sizes include alignment padding, so they are a little above the
    /// tensors' own bytes: size budgets from these.
    pub fn footprint(index: &WeightIndex, cfg: &ModelConfig) -> Result<ExpertFootprint, StoreError> {
        let layouts = Layouts::build(index, cfg)?;
        let (min_budget, _, max_expert_bytes) = min_budget(&layouts, cfg);
        let (experts, total_bytes) = layouts.iter().fold((0, 0), |(n, b), l| (n + 1, b + l.alloc as u64));
        Ok(ExpertFootprint { experts, max_expert_bytes, total_bytes, min_budget })
    }

    pub fn min_budget(&self) -> u64 {
        self.min_budget
    }

    /// Turns on prediction-driven protection and prefetch (the `predictive` policy's
    /// [`Lookahead`]), with at most `prefetch_budget` bytes prefetched per steered call. Only
    /// [`ExpertStore::for_each_steered`] moves it; without this, candidates are ignored.
    pub fn set_lookahead(&mut self, params: LookaheadParams, prefetch_budget: u64) {
        self.shared.lock().steer = Some(Steer { lookahead: Lookahead::new(params), prefetch_budget });
    }

    /// Bytes `key`'s expert occupies in the cache (its aligned buffer): what the budget counts.
    pub fn expert_bytes(&self, key: ExpertKey) -> Result<u64, StoreError> {
        Ok(self.shared.layouts.check(key)?.alloc as u64)
    }

    /// Whether `key`'s expert is resident or being read.
    pub fn contains(&self, key: &ExpertKey) -> bool {
        self.shared.lock().cache.contains(key)
    }

    pub fn stats(&self) -> StoreStats {
        let st = self.shared.lock();
        let (cache, c) = (st.cache.stats(), &st.counters);
        StoreStats {
            policy: st.cache.policy_name(),
            budget_bytes: st.cache.budget(),
            peak_bytes: cache.peak_bytes,
            resident_bytes: cache.bytes,
            hits: c.hits,
            misses: c.misses,
            evictions: cache.evictions,
            prefetch_reads: c.prefetch_reads,
            prefetch_hits: c.prefetch_hits,
            protected_evictions: c.protected_evictions,
            reads: c.reads,
            bytes_read: c.bytes_read,
            direct_io: self.shared.reader.direct_io(),
            read_seconds: c.read_seconds,
            stall_seconds: c.stall_seconds,
        }
    }

    /// A hint: start reading these experts (in priority order) if there is room, evicting only
    /// entries that are neither pinned, nor in `keys`, nor protected by the lookahead; stops at
    /// the first that does not fit.
    /// Returns how many reads it started. Reads run after any waiting demand reads. Safe to call
    /// at any time, from any thread, including from inside a `for_each` callback.
    pub fn prefetch(&self, keys: &[ExpertKey]) -> Result<usize, StoreError> {
        for &key in keys {
            self.shared.layouts.check(key)?;
        }
        let mut st = self.shared.lock();
        let mut started = 0;
        for &key in keys {
            if st.cache.contains(&key) {
                continue;
            }
            let bytes = self.shared.layouts.check(key)?.alloc as u64;
            let st = &mut *st;
            let steer = &st.steer;
            let protect =
                |k: &ExpertKey| keys.contains(k) || steer.as_ref().is_some_and(|s| s.lookahead.protects(k));
            if !st.cache.can_make_room(bytes, &protect) {
                break;
            }
            let buf = ExpertBuf::new(key, true);
            let evicted = st.cache.insert(key, Arc::clone(&buf), bytes, &protect)?;
            buf.recycle(evicted, bytes as usize);
            st.cache.pin(&key); // the read's pin
            st.counters.prefetch_reads += 1;
            self.send(buf, true)?;
            started += 1;
        }
        Ok(started)
    }

    fn send(&self, buf: Arc<ExpertBuf>, prefetch: bool) -> Result<(), StoreError> {
        let io = self.io.as_ref().ok_or(StoreError::IoStopped)?;
        let tx = if prefetch { &io.prefetch } else { &io.demand };
        tx.send(buf).map_err(|_| StoreError::IoStopped)
    }
}

fn min_budget(layouts: &Layouts, cfg: &ModelConfig) -> (u64, usize, u64) {
    let (top_k, expert_bytes) = (cfg.num_experts_per_tok, layouts.max_alloc as u64);
    (top_k as u64 * expert_bytes, top_k, expert_bytes)
}

impl Drop for ExpertStore {
    fn drop(&mut self) {
        if let Some(io) = self.io.take() {
            drop((io.demand, io.prefetch));
            let _ = io.handle.join();
        }
    }
}

impl Experts for ExpertStore {
    fn for_each(
        &self,
        routing: &LayerRouting<'_>,
        f: &mut dyn FnMut(u32, ExpertWeights<'_>) -> Result<(), ExpertsError>,
    ) -> Result<(), ExpertsError> {
        self.for_each_steered(routing, None, f)
    }
}

impl ExpertStore {
    /// [`Experts::for_each`] with this step's predictions. `candidates` are the experts
    /// predicted for the MoE layers after `routing.layer` (those whose routing is not known
    /// yet). With a lookahead set ([`ExpertStore::set_lookahead`]) the resident candidates are
    /// protected before this call's misses are inserted, replacing the previous step's
    /// protection (an empty slice drops it), and once all of this call's reads are queued the
    /// prefetches the lookahead plans start, to be read while the layer computes. `None` leaves
    /// protection as it is and prefetches nothing. A candidate's `bytes` is ignored: the store
    /// counts its own buffers.
    pub fn for_each_steered(
        &self,
        routing: &LayerRouting<'_>,
        candidates: Option<&[Candidate]>,
        f: &mut dyn FnMut(u32, ExpertWeights<'_>) -> Result<(), ExpertsError>,
    ) -> Result<(), ExpertsError> {
        let keys: Vec<ExpertKey> =
            routing.experts.iter().map(|&e| ExpertKey::new(routing.layer, e as usize)).collect();
        let mut layouts = Vec::with_capacity(keys.len());
        for &key in &keys {
            layouts.push(self.shared.layouts.check(key)?);
        }
        let steered = match candidates {
            Some(c) => self.steer(c)?,
            None => false,
        };
        if steered && keys.is_empty() {
            self.start_prefetches(&mut self.shared.lock())?;
        }
        let mut run = Run::new(self, keys, steered);
        for (i, layout) in layouts.into_iter().enumerate() {
            let buf = run.acquire(i)?;
            match buf.data.get() {
                Some(Ok(data)) => f(buf.key.expert, layout.weights(data.as_slice()))?,
                Some(Err(e)) => return Err(StoreError::Read { key: buf.key, source: e.clone() }.into()),
                None => unreachable!("acquire returns only filled buffers"),
            }
            run.release_front();
        }
        Ok(())
    }

    /// Checks and sizes `candidates` and moves the lookahead's protection onto them. Returns
    /// whether a lookahead is set.
    fn steer(&self, candidates: &[Candidate]) -> Result<bool, StoreError> {
        let mut sized = Vec::with_capacity(candidates.len());
        for c in candidates {
            let bytes = self.shared.layouts.check(c.key)?.alloc as u64;
            sized.push(Candidate { bytes, ..*c });
        }
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        match &mut st.steer {
            Some(s) => {
                s.lookahead.update(&st.cache, &sized);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Plans this step's prefetches and queues their reads (behind any demand read). The plan
    /// only takes room that no pinned or protected entry holds, so these inserts never break
    /// protection.
    fn start_prefetches(&self, st: &mut State) -> Result<(), StoreError> {
        let State { cache, counters, steer: Some(steer), .. } = st else { return Ok(()) };
        for c in steer.lookahead.plan_prefetch(cache, steer.prefetch_budget) {
            let buf = ExpertBuf::new(c.key, true);
            buf.recycle(steer.lookahead.insert(cache, c.key, Arc::clone(&buf), c.bytes)?, c.bytes as usize);
            cache.pin(&c.key); // the read's pin
            counters.prefetch_reads += 1;
            self.send(buf, true)?;
        }
        Ok(())
    }
}

/// One `for_each` call's pipeline over its keys. Holds a pin on every expert it has issued and
/// not yet finished with (`keys[done..issued]`, in `pinned`); dropping it releases them, so an
/// error or a panic in the caller's callback leaks no budget.
struct Run<'s> {
    store: &'s ExpertStore,
    keys: Vec<ExpertKey>,
    /// Position of each of this layer's experts in `keys` (`usize::MAX` if absent), so that an
    /// eviction can spare the experts this call needs soonest.
    pos: Vec<usize>,
    pinned: VecDeque<Arc<ExpertBuf>>,
    issued: usize,
    /// This call was steered and its prefetches have not started: they start once every key
    /// is issued, so that they never take room this call's own misses need.
    prefetch_due: bool,
}

impl<'s> Run<'s> {
    fn new(store: &'s ExpertStore, keys: Vec<ExpertKey>, steered: bool) -> Self {
        let mut pos = vec![usize::MAX; store.shared.layouts.num_experts];
        for (i, k) in keys.iter().enumerate() {
            pos[k.expert as usize] = pos[k.expert as usize].min(i);
        }
        Run { store, keys, pos, pinned: VecDeque::new(), issued: 0, prefetch_due: steered }
    }

    /// Waits until `keys[i]` is resident and read, issuing reads ahead as room allows; counts
    /// the wait as stall time. Returns the pinned buffer.
    fn acquire(&mut self, i: usize) -> Result<Arc<ExpertBuf>, StoreError> {
        let shared = &self.store.shared;
        let mut st = shared.lock();
        let mut stalled: Option<Instant> = None;
        loop {
            if st.io_stopped {
                return Err(StoreError::IoStopped);
            }
            self.issue(&mut st, i)?;
            if let Some(front) = self.pinned.front().filter(|_| self.issued > i) {
                if front.data.get().is_some() {
                    let front = Arc::clone(front);
                    if let Some(t) = stalled {
                        st.counters.stall_seconds += t.elapsed().as_secs_f64();
                    }
                    return Ok(front);
                }
            }
            stalled.get_or_insert_with(Instant::now);
            st = shared.wait(st);
        }
    }

    /// Issues `keys[issued..]` in order while they fit, up to the lookahead limit; then, once
    /// all are issued, starts the step's prefetches.
    fn issue(&mut self, st: &mut State, head: usize) -> Result<(), StoreError> {
        let limit = head.saturating_add(1).saturating_add(self.store.lookahead).min(self.keys.len());
        while self.issued < limit {
            if !self.try_issue(st, self.issued == head)? {
                break;
            }
            self.issued += 1;
        }
        if self.prefetch_due && self.issued == self.keys.len() {
            self.prefetch_due = false;
            self.store.start_prefetches(st)?;
        }
        Ok(())
    }

    /// Pins `keys[issued]`, starting its read if it is not resident. Experts this call needs
    /// later are spared from eviction, and so are those the lookahead protects; only the head
    /// (the expert the caller waits for) may evict some of them: first protected ones (the
    /// layer needs its experts now, predictions only later), then this call's experts needed
    /// last. A read-ahead waits instead, for the experts before it to be released. Returns
    /// false if there is no room yet.
    fn try_issue(&mut self, st: &mut State, head: bool) -> Result<bool, StoreError> {
        let j = self.issued;
        let key = self.keys[j];
        if st.cache.contains(&key) {
            let Some(buf) = st.cache.get(&key).cloned() else { return Ok(false) };
            st.cache.pin(&key);
            st.counters.hits += 1;
            if buf.prefetched && !buf.used.swap(true, Ordering::Relaxed) {
                st.counters.prefetch_hits += 1;
            }
            if buf.prefetched && !buf.claimed.load(Ordering::Acquire) {
                // Queued behind other prefetches: ask again on the demand queue.
                self.store.send(Arc::clone(&buf), false)?;
            }
            self.pinned.push_back(buf);
            return Ok(true);
        }

        let bytes = self.store.shared.layouts.check(key)?.alloc as u64;
        let later = self.keys.len() - j - 1;
        let spare = |m: usize| {
            let pos = &self.pos;
            move |k: &ExpertKey| {
                k.layer == key.layer && pos.get(k.expert as usize).is_some_and(|&p| p > j && p <= j + m)
            }
        };
        let (keep, guard) = {
            let st: &State = st;
            let fits = |m: usize, guard: bool| {
                let spare = spare(m);
                st.cache.can_make_room(bytes, &|k| spare(k) || (guard && st.protects(k)))
            };
            if fits(later, true) {
                (later, true)
            } else if !head {
                return Ok(false);
            } else if fits(later, false) {
                (later, false)
            } else if !fits(0, false) {
                return Ok(false);
            } else {
                // The most of the soonest-needed experts that can be spared (fits is monotone).
                let (mut lo, mut hi) = (0, later);
                while lo < hi {
                    let mid = (lo + hi).div_ceil(2);
                    if fits(mid, false) {
                        lo = mid;
                    } else {
                        hi = mid - 1;
                    }
                }
                (lo, false)
            }
        };
        let buf = ExpertBuf::new(key, false);
        let State { cache, steer, counters, .. } = st;
        let spare = spare(keep);
        let protect =
            |k: &ExpertKey| spare(k) || (guard && steer.as_ref().is_some_and(|s| s.lookahead.protects(k)));
        let evicted = cache.insert(key, Arc::clone(&buf), bytes, &protect)?;
        if !guard {
            let protected = |k: &ExpertKey| steer.as_ref().is_some_and(|s| s.lookahead.protects(k));
            counters.protected_evictions += evicted.iter().filter(|(k, _)| protected(k)).count() as u64;
        }
        buf.recycle(evicted, bytes as usize);
        cache.pin(&key); // this call's pin
        cache.pin(&key); // the read's pin
        counters.misses += 1;
        self.store.send(Arc::clone(&buf), false)?;
        self.pinned.push_back(buf);
        Ok(true)
    }

    /// Unpins the expert just computed on, making room for the next reads.
    fn release_front(&mut self) {
        if let Some(buf) = self.pinned.pop_front() {
            unpin_same(&mut self.store.shared.lock().cache, &buf);
            self.store.shared.changed.notify_all();
        }
    }
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        if self.pinned.is_empty() {
            return;
        }
        let mut st = self.store.shared.lock();
        for buf in self.pinned.drain(..) {
            unpin_same(&mut st.cache, &buf);
        }
        drop(st);
        self.store.shared.changed.notify_all();
    }
}
