//! The flags every command that runs the engine takes (`generate`, `serve`), and how they and
//! the config file become an [`EngineConfig`] and a started [`Engine`].

use std::path::{Path, PathBuf};

use clap::Args;
use stevedore_cache::PolicyKind;

use super::{parse_size, CliError};
use crate::config::{Config, Split, WarmStart};
use crate::engine::{Engine, EngineConfig, EngineError, Loaded, Schedule};
use crate::size::{human, Size};
use crate::store::StoreError;

#[derive(Args, Debug)]
pub struct EngineArgs {
    /// Model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Host-RAM expert cache budget: `512MiB`, `2GiB`, or `25%` of the model's expert bytes.
    /// Default: the config's `tiers.host.budget` with `--config`; without it, what available
    /// memory allows after dense weights and the KV cache.
    #[arg(long, value_parser = parse_size)]
    pub host_cache: Option<Size>,
    /// Config file (TOML, `stevedore config --print-default`): budgets, policy, predictor, batching.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Expert cache policy: `lru`, `lfu` or `predictive` (LRU order, steered by a routing
    /// predictor: experts predicted for the next layers are protected and prefetched).
    /// Default: the config's `cache.policy`, `predictive` unless the file says otherwise (with
    /// next-gate prediction it decoded 1.04-1.48x faster than `lru` on the bench checkpoint
    /// at 25% and 50%, reading at most 1.1x the bytes: README, "Prediction").
    #[arg(long, value_parser = PolicyKind::parse)]
    pub policy: Option<PolicyKind>,
    /// Most sequences in one forward pass (default: the config's `engine.max_batch`, 32).
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// Bytes of the KV cache, e.g. `1GiB`. Requests wait for blocks when it is full.
    #[arg(long, value_parser = parse_size)]
    pub kv_cache: Option<Size>,
    /// Read experts through the page cache instead of O_DIRECT.
    #[arg(long)]
    pub buffered_io: bool,
    /// Record every token's routing (experts and gate weights per MoE layer) to this trace file.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Which sequences share a forward pass: `fcfs` or `regroup` (by route; see
    /// `stevedore config --print-default`, `[engine]`). Default: the config's `engine.schedule`.
    #[arg(long, value_parser = ["fcfs", "regroup"])]
    pub schedule: Option<String>,
    /// Fill the host cache at start, in layer order, while the first requests run: `auto` (when
    /// the budget holds every expert), `on` or `off`. Default: the config's `engine.warm_start`.
    #[arg(long, value_parser = WarmStart::parse)]
    pub warm_start: Option<WarmStart>,
    /// Compute threads. Default: the config's `engine.threads`, else the physical cores.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Which copy of an expert a layer uses: `full`; `hobbit` (a missed expert of small gate
    /// weight is read as its low-bit copy or skipped); `low` (every expert's low-bit copy).
    /// The last two need `stevedore quantize`. Default: the config's `precision.policy`.
    #[arg(long, value_parser = ["full", "hobbit", "low"])]
    pub precision: Option<String>,
    /// Added to the router logits of experts already resident (cache-conditional routing).
    /// Default: the config's `routing.resident_bias`, 0 (off).
    #[arg(long)]
    pub resident_bias: Option<f32>,
}

/// Sizes rayon's global pool (every matmul and attention runs on it) to `threads`, or to the
/// physical cores. Must run before the first parallel computation; a second call (a pool
/// already built) keeps the first size and says so.
pub fn configure_threads(threads: Option<usize>) -> Result<usize, CliError> {
    let n = match threads {
        Some(0) => return Err("--threads must be at least 1".into()),
        Some(n) => n,
        None => crate::sys::physical_cores(),
    };
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("stevedore-cpu-{i}"))
        .build_global()
    {
        tracing::debug!("compute threads already set ({e}); keeping {}", rayon::current_num_threads());
    }
    Ok(rayon::current_num_threads())
}

/// The flags read with the config file they name.
pub struct Settings<'a> {
    args: &'a EngineArgs,
    /// The file, if given.
    file: Option<Config>,
    /// The file, or the defaults it would spell out (`stevedore config --print-default`).
    pub config: Config,
    pub max_batch: usize,
    /// `--kv-cache` or `engine.kv_cache`, if either says.
    pub kv_cache: Option<u64>,
}

impl EngineArgs {
    /// Reads the config file and checks the flags.
    pub fn settings(&self) -> Result<Settings<'_>, CliError> {
        let file = match &self.config {
            Some(path) => {
                let cfg = Config::load(path)?;
                check_live(&cfg, path)?;
                Some(cfg)
            }
            None => None,
        };
        let mut config = file.clone().unwrap_or_default();
        match self.schedule.as_deref() {
            Some("regroup") => config.engine.schedule = crate::config::ScheduleKind::Regroup,
            Some(_) => config.engine.schedule = crate::config::ScheduleKind::Fcfs,
            None => {}
        }
        if let Some(w) = self.warm_start {
            config.engine.warm_start = w;
        }
        match self.precision.as_deref() {
            Some("hobbit") => config.precision.policy = crate::config::PrecisionKind::Hobbit,
            Some("low") => config.precision.policy = crate::config::PrecisionKind::Low,
            Some(_) => config.precision.policy = crate::config::PrecisionKind::Full,
            None => {}
        }
        if let Some(b) = self.resident_bias {
            config.routing.resident_bias = b;
            config.routing.validate()?;
        }
        configure_threads(self.threads.or(config.engine.threads))?;
        let max_batch = self.max_batch.unwrap_or(config.engine.max_batch);
        if max_batch == 0 {
            return Err("--max-batch must be at least 1".into());
        }
        let kv_cache = match self.kv_cache.or(config.engine.kv_cache) {
            Some(Size::Percent(_)) => {
                return Err("--kv-cache must be a size in bytes (e.g. 1GiB), not a percentage".into())
            }
            Some(Size::Bytes(b)) => Some(b),
            None => None,
        };
        Ok(Settings { args: self, file, config, max_batch, kv_cache })
    }
}

impl Settings<'_> {
    pub fn schedule(&self) -> Schedule {
        self.config.engine.schedule(self.max_batch)
    }

    /// A default KV cache of `need` bytes, at most half the memory available now (a default
    /// never asks for more than the machine has; requests wait for blocks instead).
    pub fn default_kv(&self, need: u64) -> u64 {
        crate::sys::available_memory_bytes().map_or(need, |a| need.min(a / 2))
    }

    /// Sequences that may hold KV blocks at once: what a default KV cache is sized for.
    pub fn resident(&self) -> usize {
        match self.schedule() {
            Schedule::Fcfs => self.max_batch,
            Schedule::Regroup { pool, .. } => pool,
        }
    }

    /// A message about the config file, named when there is one.
    fn in_config(&self, msg: String) -> String {
        match &self.args.config {
            Some(path) => format!("{}: {msg}", path.display()),
            None => msg,
        }
    }

    /// Loads the model (`--model`), its dense matrices in the precision the config asks for.
    pub fn load(&self) -> Result<Loaded, CliError> {
        Ok(Loaded::load_with(&self.args.model, self.config.precision.dense)?)
    }

    /// Starts the engine on `loaded` with a KV cache of `kv_cache` bytes; says how the host
    /// budget was chosen when it was automatic.
    pub fn start(&self, loaded: Loaded, kv_cache: u64) -> Result<Engine, CliError> {
        let args = self.args;
        let engine_config = EngineConfig {
            host_cache: args.host_cache.or(self.file.as_ref().map(|c| c.tiers.host.budget)),
            // Without a file, the defaults it would spell out: `predictive`.
            policy: args.policy.unwrap_or(self.config.cache.policy),
            predictor: self.config.predictor.clone(),
            kv_cache,
            max_batch: self.max_batch,
            max_batch_tokens: self.config.engine.max_batch_tokens,
            force_buffered: args.buffered_io,
            readers: self.config.engine.readers,
            trace: args.trace.clone(),
            schedule: self.schedule(),
            warm_start: self.config.engine.warm_start,
            precision: self.config.precision.clone(),
            resident_bias: self.config.routing.resident_bias,
        };
        let engine = loaded.start(&engine_config).map_err(|e| -> CliError {
            match e {
                EngineError::Store(e @ StoreError::BudgetTooSmall { .. })
                    if args.host_cache.is_none() && self.file.is_some() =>
                {
                    self.in_config(format!("tiers.host.budget: {e}")).into()
                }
                EngineError::Config(msg) => self.in_config(msg).into(),
                e => e.into(),
            }
        })?;
        let budgets = engine.budgets();
        if let Some(a) = budgets.host_auto {
            eprintln!(
                "host cache: {} automatic (available {} - dense {} - KV {} - reserve {}; experts total {})",
                human(budgets.host),
                human(a.available),
                human(a.dense),
                human(a.kv_cache),
                human(a.reserve),
                human(engine.footprint().total_bytes)
            );
        }
        Ok(engine)
    }
}

/// Refuses what the config file asks for that the live engine cannot do, naming the key.
fn check_live(cfg: &Config, path: &Path) -> Result<(), CliError> {
    if cfg.cache.split != Split::Shared {
        return Err(format!(
            "{}: cache.split = \"per-layer\" is not supported by the live engine (only by \
             `stevedore simulate`); use \"shared\"",
            path.display()
        )
        .into());
    }
    Ok(())
}
