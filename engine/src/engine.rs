//! The [`Engine`]: one loaded model serving many requests. It owns the model, the expert store,
//! the routing forecaster, the tokenizer, the KV cache and the statistics, and runs a worker
//! thread whose scheduler admits requests as KV blocks allow and steps every running sequence
//! through shared forward passes (continuous batching: prefill chunks of some sequences beside
//! the decode tokens of others). Callers submit requests and receive their tokens as events.
//!
//! Building is two-phase so that a caller can tokenize prompts and size the KV cache before
//! anything is started: [`Loaded::load`] loads the model and tokenizer, [`Loaded::start`] makes
//! the store and starts the worker. [`Engine::build`] does both.

pub mod regroup;
mod scheduler;
mod source;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use serde::Serialize;
use stevedore_cache::PolicyKind;
use stevedore_models::{Foresight, KvPool, LowBitExperts, Model, SeqId};
use stevedore_predictor::RoutingShape;

use crate::config::{PredictorConfig, PrefetchDepth};
use crate::forecast::{ForecastStats, Forecaster};
use crate::horizon::{HorizonControl, HorizonStats};
use crate::record::Recorder;
use crate::sampling::SamplingParams;
use crate::size::Size;
use crate::store::{
    ExpertFootprint, ExpertStore, Layouts, PrecisionPolicy, StoreError, StoreOptions, StoreStats,
};
use crate::text::Text;
use regroup::Route;
pub use regroup::Schedule;
use scheduler::{Scheduler, Sequence};

/// Memory kept free for the OS and everything else when the host budget is automatic.
pub const AUTO_RESERVE: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] stevedore_models::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Trace(#[from] crate::trace::TraceError),
    #[error("{0}")]
    Config(String),
    /// A request the engine cannot run; the message says why.
    #[error("{0}")]
    Request(String),
    /// The request failed while running (an expert read, say); the others go on.
    #[error("{0}")]
    Failed(String),
    #[error("the engine stopped before finishing the request")]
    Stopped,
}

/// How an engine runs: budgets, policy, batching, I/O. The CLI and the server build one from
/// flags and the config file.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Host RAM for cached experts: bytes, or a percentage of all expert bytes; `None`: what
    /// available memory allows after the dense weights, the KV cache and [`AUTO_RESERVE`].
    pub host_cache: Option<Size>,
    pub policy: PolicyKind,
    /// The routing predictor's settings (used by the predictive policy).
    pub predictor: PredictorConfig,
    /// Bytes of the paged KV cache.
    pub kv_cache: u64,
    /// Most sequences in one forward pass.
    pub max_batch: usize,
    /// Most token rows in one forward pass (prompts longer than this are prefilled in chunks).
    pub max_batch_tokens: usize,
    pub force_buffered: bool,
    pub readers: usize,
    /// Record every forward pass's routing to this trace file.
    pub trace: Option<PathBuf>,
    /// Which sequences share a step: all admitted (FCFS) or regrouped by route.
    pub schedule: Schedule,
    /// Whether the host cache is filled at start (see [`ExpertStore::warm`]).
    pub warm_start: crate::config::WarmStart,
    /// Which copy of an expert a layer uses (`[precision]`).
    pub precision: crate::config::PrecisionConfig,
    /// `routing.resident_bias`.
    pub resident_bias: f32,
}

/// How the host budget was chosen, when it was automatic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AutoBudget {
    pub available: u64,
    pub dense: u64,
    pub kv_cache: u64,
    pub reserve: u64,
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt_ids: Vec<u32>,
    /// Tokens to generate; 0 with `prompt_logprobs` scores the prompt and generates nothing.
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Also return each prompt token's log-probability given the tokens before it
    /// ([`Completion::prompt_logprobs`]), as vLLM's `prompt_logprobs` does.
    pub prompt_logprobs: bool,
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// It produced a stop (EOS) id, which ends its output.
    Stop,
    /// It reached its `max_new_tokens`.
    Length,
}

/// A finished request.
#[derive(Clone, Debug, Serialize)]
pub struct Completion {
    pub prompt_tokens: usize,
    /// With [`Request::prompt_logprobs`]: entry `i` is ln p(`prompt[i + 1]` | `prompt[..=i]`),
    /// from the full vocabulary's log-softmax computed in f64; `prompt_tokens - 1` entries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<f32>>,
    pub generated_ids: Vec<u32>,
    /// The decoded output (`None` without a tokenizer).
    pub text: Option<String>,
    /// Text held back at the end of the stream (an incomplete character), not yet sent in a
    /// [`Event::Token`].
    pub tail: String,
    pub finish_reason: FinishReason,
    /// Submission to admission (waiting for a batch slot or KV blocks).
    pub queue_seconds: f64,
    /// Admission to the first token: the prompt's prefill.
    pub prefill_seconds: f64,
    /// First token to the last: decode steps.
    pub decode_seconds: f64,
}

impl Completion {
    /// Tokens produced by decode steps (every generated token after the first).
    pub fn decode_tokens(&self) -> usize {
        self.generated_ids.len().saturating_sub(1)
    }

    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_seconds)
    }

    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.decode_tokens(), self.decode_seconds)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// What a request's owner hears.
#[derive(Clone, Debug)]
pub enum Event {
    /// A new token, and the text it completes (empty while a character is incomplete, or
    /// without a tokenizer).
    Token {
        id: u32,
        text: String,
    },
    Finished(Completion),
    Failed(String),
}

/// Receives a request's events on the engine's thread; returns false when its owner stopped
/// listening (the request is then cancelled). It must not block.
pub type EventFn = Box<dyn Fn(Event) -> bool + Send>;

/// Where a sequence's events go.
pub(crate) enum Sink {
    Own(Sender<Event>),
    Shared(Sender<(SeqId, Event)>),
    Callback(EventFn),
}

impl Sink {
    /// Sends; false when the receiver is gone (the owner stopped listening).
    fn send(&self, id: SeqId, e: Event) -> bool {
        match self {
            Sink::Own(tx) => tx.send(e).is_ok(),
            Sink::Shared(tx) => tx.send((id, e)).is_ok(),
            Sink::Callback(f) => f(e),
        }
    }
}

/// A submitted request: its id, its events (unless they go to a shared channel), and the
/// means to cancel it. Dropping the handle cancels the request.
pub struct RequestHandle {
    id: SeqId,
    events: Option<Receiver<Event>>,
    cancel: Arc<AtomicBool>,
}

impl RequestHandle {
    pub fn id(&self) -> SeqId {
        self.id
    }

    /// The request's events, unless it was submitted with a shared channel.
    pub fn events(&self) -> Option<&Receiver<Event>> {
        self.events.as_ref()
    }

    /// Stops the request: it leaves the batch and frees its KV blocks before the next step.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Waits for the request to finish (its own channel only).
    pub fn wait(self) -> Result<Completion, EngineError> {
        let rx = self.events.as_ref().ok_or(EngineError::Request("events go to a shared channel".into()))?;
        for e in rx.iter() {
            match e {
                Event::Token { .. } => {}
                Event::Finished(c) => return Ok(c),
                Event::Failed(msg) => return Err(EngineError::Failed(msg)),
            }
        }
        Err(EngineError::Stopped)
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// A model and tokenizer, loaded and checked; nothing started yet.
pub struct Loaded {
    dir: PathBuf,
    model: Model,
    text: Option<Text>,
    layouts: Layouts,
}

impl Loaded {
    /// Loads `dir`'s config, weight index (dense weights mapped, every tensor checked) and
    /// tokenizer (if it has one).
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        Self::load_with(dir, None)
    }

    /// [`Loaded::load`] with the dense matrices from their `dense` low-bit copies when given
    /// (`precision.dense`).
    pub fn load_with(dir: &Path, dense: Option<stevedore_kernels::DType>) -> Result<Self, EngineError> {
        let t = Instant::now();
        let model = Model::load_with(dir, dense)?;
        let text = Text::load(dir).map_err(EngineError::Config)?;
        let layouts = Layouts::of(&model);
        tracing::info!(
            arch = model.config.arch.hf_name(),
            dense = %crate::size::human(model.dense_bytes()),
            seconds = t.elapsed().as_secs_f64(),
            "loaded {}",
            dir.display()
        );
        Ok(Loaded { dir: dir.to_owned(), model, text, layouts })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn text(&self) -> Option<&Text> {
        self.text.as_ref()
    }

    pub fn footprint(&self) -> ExpertFootprint {
        self.layouts.footprint()
    }

    /// Checks `req` against the model (see [`check_request`]).
    pub fn check(&self, req: &Request) -> Result<(), EngineError> {
        check_request(&self.model, req)
    }

    /// KV bytes for sequences of `positions` running at once (whole blocks each).
    pub fn kv_bytes_for(&self, positions: impl IntoIterator<Item = usize>) -> u64 {
        positions.into_iter().map(|p| KvPool::bytes_for(&self.model.config, KV_BLOCK, p)).sum()
    }

    /// The host budget `config` asks for, and how it was chosen when automatic.
    pub fn host_budget(&self, config: &EngineConfig) -> Result<(u64, Option<AutoBudget>), EngineError> {
        let fp = self.footprint();
        match config.host_cache {
            Some(size) => Ok((size.bytes(fp.total_bytes), None)),
            None => {
                let available = crate::sys::available_memory_bytes().ok_or_else(|| {
                    EngineError::Config(
                        "cannot read MemAvailable from /proc/meminfo; give a host cache budget".into(),
                    )
                })?;
                // The checkpoint's dense weights and what the model derives from them at load.
                let dense = self.model.dense_bytes() + self.model.derived_bytes();
                let room = available.saturating_sub(dense + config.kv_cache + AUTO_RESERVE);
                let auto = AutoBudget { available, dense, kv_cache: config.kv_cache, reserve: AUTO_RESERVE };
                Ok((room.min(fp.total_bytes).max(fp.min_budget), Some(auto)))
            }
        }
    }

    /// Makes the expert store, the forecaster (predictive policy), the trace recorder and the
    /// KV cache, and starts the worker.
    pub fn start(self, config: &EngineConfig) -> Result<Engine, EngineError> {
        let (budget, auto) = self.host_budget(config)?;
        let cfg = &self.model.config;
        let shape = RoutingShape {
            moe_layers: self.model.layers.num_moe_layers(),
            num_experts: cfg.num_experts,
            top_k: cfg.num_experts_per_tok,
        };
        let fp = self.layouts.footprint();
        let (mut forecaster, mut anticipation, mut foresight, mut horizon) = (None, None, None, None);
        if config.policy == PolicyKind::Predictive {
            let p = &config.predictor;
            let predictor = p.source().map_err(|e| EngineError::Config(e.to_string()))?.build(shape);
            let predictor = predictor.map_err(EngineError::Config)?;
            let layer_ids = self.model.layers.moe_layers().iter().map(|l| l.0).collect();
            let depth = p.depth.of(shape.moe_layers);
            forecaster = Some(Mutex::new(Forecaster::new(predictor, shape, layer_ids, depth)));
            anticipation = Some((p.anticipation_params(shape), p.prefetch_budget.bytes(budget)));
            foresight = p.foresight(shape, depth);
            if p.prefetch_depth == PrefetchDepth::Auto {
                let count = (shape.moe_layers * shape.num_experts).max(1) as u64;
                horizon = Some(Mutex::new(HorizonControl::new(fp.total_bytes / count, depth)));
            }
        }
        let mut shards: Vec<PathBuf> = self.model.index.shards.iter().map(|s| s.path.clone()).collect();
        let mut layouts = self.layouts;
        if let Some(format) = config.precision.low_format() {
            // The low-bit copies' file is read as one more shard.
            let low = LowBitExperts::open(&self.model, format, shards.len())?;
            layouts = layouts.with_low(&low.tensors, &self.model.layers);
            shards.push(low.path);
        }
        let opts = StoreOptions {
            policy: config.policy,
            force_buffered: config.force_buffered,
            readers: config.readers,
            precision: config.precision.policy(),
            resident_bias: config.resident_bias,
        };
        // What a warm start would read: every expert in the precision layers read first.
        let total = match opts.precision {
            PrecisionPolicy::Low => layouts.footprint().low_total_bytes.unwrap_or(fp.total_bytes),
            PrecisionPolicy::Full | PrecisionPolicy::Hobbit(_) => fp.total_bytes,
        };
        let store = ExpertStore::new(layouts, &shards, budget, opts, anticipation, cfg.num_experts_per_tok)?;
        if config.warm_start.applies(budget, total) {
            store.warm();
        }
        let recorder = match &config.trace {
            Some(path) => {
                let name = self.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                Some(Recorder::create(path, &name, cfg, &self.model.layers)?)
            }
            None => None,
        };
        // The pool is allocated (lazily mapped) at once: refuse one larger than memory up front
        // rather than let the allocator abort.
        if let Some(available) = crate::sys::available_memory_bytes() {
            if config.kv_cache > available {
                return Err(EngineError::Config(format!(
                    "a KV cache of {} is more than the {} of memory available; give a smaller one \
                     (--kv-cache or engine.kv_cache)",
                    crate::size::human(config.kv_cache),
                    crate::size::human(available)
                )));
            }
        }
        let schedule =
            config.schedule.effective(config.max_batch.max(1), cfg.num_experts_per_tok, cfg.num_experts);
        if schedule != config.schedule {
            tracing::warn!(
                max_batch = config.max_batch,
                "regrouping falls back to FCFS: {} sequences x top-{} cover the {} experts of a layer more than \
                 four times over, so every grouping loads nearly all of them",
                config.max_batch,
                cfg.num_experts_per_tok,
                cfg.num_experts
            );
        }
        let kv =
            KvPool::new(cfg, config.kv_cache, KV_BLOCK).map_err(|e| EngineError::Config(e.to_string()))?;
        let inner = Arc::new(Inner {
            model: self.model,
            text: self.text,
            store,
            forecaster,
            foresight,
            horizon,
            recorder: Mutex::new(recorder),
            stats: Mutex::new(StepStats::default()),
            trace_error: Mutex::new(None),
            budgets: Budgets { host: budget, host_auto: auto, kv_cache: kv.bytes(), kv_block: KV_BLOCK },
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let scheduler = Scheduler::new(kv, config.max_batch.max(1), config.max_batch_tokens.max(1), schedule);
        let worker_inner = Arc::clone(&inner);
        let worker = std::thread::Builder::new()
            .name("stevedore-engine".into())
            .spawn(move || scheduler.run(&worker_inner, rx))
            .map_err(|e| EngineError::Config(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine { inner, tx, worker: Some(worker), next_id: Mutex::new(0) })
    }
}

/// Checks `req` against `model`: a prompt, token ids in the vocabulary, and prompt plus new tokens
/// within the context the model runs exactly.
pub fn check_request(model: &Model, req: &Request) -> Result<(), EngineError> {
    let cfg = &model.config;
    if req.prompt_ids.is_empty() {
        return Err(EngineError::Request("the prompt is empty".into()));
    }
    if let Some(&t) = req.prompt_ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        return Err(EngineError::Request(format!(
            "prompt token id {t} is outside the vocabulary ({} ids)",
            cfg.vocab_size
        )));
    }
    let limit = cfg.max_positions();
    if req.prompt_ids.len().saturating_add(req.max_new_tokens) > limit {
        return Err(EngineError::Request(format!(
            "the prompt's {} tokens plus {} new tokens exceed the model's context of {limit} positions \
             (max_position_embeddings{}{})",
            req.prompt_ids.len(),
            req.max_new_tokens,
            if cfg.sliding_window.is_some() { " or sliding_window" } else { "" },
            if cfg.rope_kind == stevedore_models::RopeKind::LongRope {
                ", or LongRoPE's original_max_position_embeddings: past it the long factors would apply"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

/// Tokens per KV block.
pub const KV_BLOCK: usize = stevedore_models::kv::DEFAULT_BLOCK_SIZE;

/// The budgets the engine runs with.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Budgets {
    pub host: u64,
    pub host_auto: Option<AutoBudget>,
    pub kv_cache: u64,
    pub kv_block: usize,
}

/// Counts of the forward passes run. Also what readers of `generate --json` parse (the
/// benchmarks), so it deserializes, with absent counters as zero.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct StepStats {
    /// Forward passes.
    pub steps: u64,
    /// Token rows run: prompt tokens (prefill) and generated tokens fed back (decode).
    pub prefill_rows: u64,
    pub decode_rows: u64,
    /// Generated tokens (sampled from logits).
    pub generated_tokens: u64,
    /// Most sequences in one forward pass.
    pub max_batch_seen: usize,
    /// Most KV blocks in use at once.
    pub kv_blocks_peak: usize,
    /// Time in forward passes, and in whole steps (forward passes plus scheduling and sampling).
    pub forward_seconds: f64,
    pub busy_seconds: f64,
    pub requests_finished: u64,
    pub requests_failed: u64,
    pub requests_cancelled: u64,
    /// Now: sequences in the batch, requests waiting for admission, KV blocks in use.
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    /// Forward passes by how many sequences they ran: `batch_sizes[i]` counts passes of up to
    /// [`BATCH_SIZE_BOUNDS`]`[i]` sequences (and more than the bound before); the last counts
    /// the rest.
    pub batch_sizes: Vec<u64>,
    /// Sequences summed over forward passes.
    pub batch_sizes_sum: u64,
    /// MoE layers run with routed rows, over all passes, and the distinct experts they used:
    /// `layer_experts / layer_steps` is the experts a layer loads per micro-batch.
    pub layer_steps: u64,
    pub layer_experts: u64,
    /// The same over passes of decode rows only (no prompt chunk): what regrouping acts on.
    pub decode_layer_steps: u64,
    pub decode_layer_experts: u64,
}

/// Upper bounds of the [`StepStats::batch_sizes`] buckets.
pub const BATCH_SIZE_BOUNDS: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

impl StepStats {
    fn count_batch(&mut self, sequences: usize) {
        if self.batch_sizes.len() != BATCH_SIZE_BOUNDS.len() + 1 {
            self.batch_sizes = vec![0; BATCH_SIZE_BOUNDS.len() + 1];
        }
        let i = BATCH_SIZE_BOUNDS.iter().position(|&b| sequences <= b).unwrap_or(BATCH_SIZE_BOUNDS.len());
        self.batch_sizes[i] += 1;
        self.batch_sizes_sum += sequences as u64;
    }
}

/// Everything the engine reports.
#[derive(Clone, Debug, Serialize)]
pub struct EngineStats {
    pub steps: StepStats,
    pub budgets: Budgets,
    pub expert_cache: StoreStats,
    pub forecast: Option<ForecastStats>,
    /// With `prefetch_depth = "auto"`: the prefetch horizon and the figures behind it.
    pub horizon: Option<HorizonStats>,
}

/// What the engine and its worker share.
pub(crate) struct Inner {
    pub model: Model,
    pub text: Option<Text>,
    pub store: ExpertStore,
    pub forecaster: Option<Mutex<Forecaster>>,
    /// The next-gate estimates each MoE layer makes for the forecaster.
    pub foresight: Option<Foresight>,
    /// With `prefetch_depth = "auto"`: the measured prefetch horizon.
    pub horizon: Option<Mutex<HorizonControl>>,
    /// Present with `--trace`; taken out when the engine finishes.
    pub recorder: Mutex<Option<Recorder>>,
    pub stats: Mutex<StepStats>,
    /// The first trace write error, reported when the engine finishes.
    pub trace_error: Mutex<Option<crate::trace::TraceError>>,
    pub budgets: Budgets,
}

/// Locks `m`, using the data even if a panic elsewhere poisoned it (counters and forecasts stay
/// usable).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) enum Command {
    Submit(Box<Sequence>),
    Shutdown,
}

/// One model serving requests. See the module docs.
pub struct Engine {
    inner: Arc<Inner>,
    tx: Sender<Command>,
    worker: Option<JoinHandle<()>>,
    next_id: Mutex<SeqId>,
}

impl Engine {
    /// Loads `model_dir` and starts an engine on it with `config`.
    pub fn build(model_dir: &Path, config: &EngineConfig) -> Result<Engine, EngineError> {
        Loaded::load(model_dir)?.start(config)
    }

    pub fn model(&self) -> &Model {
        &self.inner.model
    }

    pub fn text(&self) -> Option<&Text> {
        self.inner.text.as_ref()
    }

    pub fn budgets(&self) -> Budgets {
        self.inner.budgets
    }

    pub fn footprint(&self) -> ExpertFootprint {
        self.inner.store.footprint()
    }

    /// The experts' weight format as stored (`bf16`, ...; the first expert's: a checkpoint's
    /// experts share one).
    pub fn expert_precision(&self) -> String {
        let dtype = self.inner.model.experts.iter().next().map(|(_, _, t)| t[0].dtype);
        dtype.map_or_else(|| "none".to_owned(), |d| d.name().to_ascii_lowercase())
    }

    /// Positions one sequence can hold: the whole KV cache.
    pub fn kv_positions(&self) -> usize {
        let b = self.inner.budgets;
        let block_bytes = KvPool::bytes_for(&self.inner.model.config, b.kv_block, b.kv_block).max(1);
        (b.kv_cache / block_bytes) as usize * b.kv_block
    }

    /// Checks `req` against the model (see [`check_request`]).
    pub fn check(&self, req: &Request) -> Result<(), EngineError> {
        check_request(&self.inner.model, req)
    }

    fn enqueue(&self, req: Request, sink: Sink) -> Result<RequestHandle, EngineError> {
        self.check(&req)?;
        let id = {
            let mut n = lock(&self.next_id);
            *n += 1;
            *n - 1
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let cfg = &self.inner.model.config;
        let route = Route::new(self.inner.model.layers.num_moe_layers(), cfg.num_experts);
        let seq = Sequence::new(id, req, self.inner.text.is_some(), sink, Arc::clone(&cancel), route);
        self.tx.send(Command::Submit(Box::new(seq))).map_err(|_| EngineError::Stopped)?;
        Ok(RequestHandle { id, events: None, cancel })
    }

    /// Submits `req`; its events arrive on the handle.
    pub fn submit(&self, req: Request) -> Result<RequestHandle, EngineError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut h = self.enqueue(req, Sink::Own(tx))?;
        h.events = Some(rx);
        Ok(h)
    }

    /// Submits `req` with its events going to `events`, tagged with the request's id (one
    /// channel for many requests).
    pub fn submit_to(
        &self,
        req: Request,
        events: &Sender<(SeqId, Event)>,
    ) -> Result<RequestHandle, EngineError> {
        self.enqueue(req, Sink::Shared(events.clone()))
    }

    /// Submits `req` with its events handed to `f` as they happen, on the engine's thread (an
    /// async server forwards them into its own channels this way).
    pub fn submit_with(
        &self,
        req: Request,
        f: impl Fn(Event) -> bool + Send + 'static,
    ) -> Result<RequestHandle, EngineError> {
        self.enqueue(req, Sink::Callback(Box::new(f)))
    }

    /// Asks the worker to stop after its current step: every request not finished then gets
    /// [`Event::Failed`]. Does not wait; [`Engine::finish`] (or dropping the engine) does.
    pub fn stop_soon(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            steps: lock(&self.inner.stats).clone(),
            budgets: self.inner.budgets,
            expert_cache: self.inner.store.stats(),
            forecast: self.inner.forecaster.as_ref().map(|f| lock(f).stats()),
            horizon: self.inner.horizon.as_ref().map(|h| lock(h).stats()),
        }
    }

    /// Stops the worker (requests not finished fail) and flushes the trace; returns the stats.
    pub fn finish(mut self) -> Result<EngineStats, EngineError> {
        self.stop();
        if let Some(e) = lock(&self.inner.trace_error).take() {
            return Err(e.into());
        }
        let stats = self.stats();
        if let Some(recorder) = lock(&self.inner.recorder).take() {
            recorder.finish()?;
        }
        Ok(stats)
    }

    fn stop(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}
