//! The TOML config file: one file drives both `stevedore generate` and `stevedore simulate`.
//! `docs/config.md` describes every key; [`DEFAULT_TOML`] is the commented default that
//! `stevedore config --print-default` prints.
//!
//! Each section is its own table with `deny_unknown_fields`, and every key has a default, so a
//! file names only what it changes, a misspelt key is an error that names it, and later
//! sections (`[tiers.gpu]`, `[precision]`, `[regroup]`) slot in without breaking older files.

mod precision;
mod predictor;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use stevedore_cache::PolicyKind;

pub use precision::{PrecisionConfig, PrecisionKind, RoutingConfig};
pub use predictor::{GateInputKind, Layers, PredictorConfig, PredictorKind, PredictorSource, PrefetchDepth};

use crate::size::Size;

/// The whole config file.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub tiers: Tiers,
    pub cache: CacheConfig,
    pub predictor: PredictorConfig,
    pub engine: EngineSection,
    pub precision: PrecisionConfig,
    pub routing: RoutingConfig,
    pub simulator: SimulatorConfig,
}

/// Memory tiers experts are cached in, fastest last. Only host RAM for now; a `gpu` tier will
/// sit beside it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tiers {
    pub host: TierConfig,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TierConfig {
    /// Bytes of the tier given to cached experts; a percentage is of the model's total
    /// routed-expert bytes.
    pub budget: Size,
}

impl Default for TierConfig {
    fn default() -> Self {
        TierConfig { budget: Size::Percent(25.0) }
    }
}

/// A policy name (`stevedore_cache::PolicyKind` keeps the one list of names).
fn policy<'de, D: Deserializer<'de>>(d: D) -> Result<PolicyKind, D::Error> {
    let name = String::deserialize(d)?;
    PolicyKind::parse(&name).map_err(de::Error::custom)
}

/// Whether all MoE layers share one cache or each gets an equal slice of the budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Split {
    #[default]
    Shared,
    PerLayer,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    #[serde(deserialize_with = "policy")]
    pub policy: PolicyKind,
    pub split: Split,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { policy: PolicyKind::Predictive, split: Split::Shared }
    }
}

/// How the engine batches and reads: `[engine]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSection {
    /// Most sequences in one forward pass.
    pub max_batch: usize,
    /// The row budget of one forward pass: decode tokens first, then prompt chunks up to it.
    pub max_batch_tokens: usize,
    /// Bytes of the paged KV cache; `None`: what the requests need (`generate`).
    pub kv_cache: Option<Size>,
    /// Expert reader threads.
    pub readers: usize,
    /// Which sequences share a step: `fcfs` (every admitted one) or `regroup` (by route).
    pub schedule: ScheduleKind,
    /// Regrouping: sequences holding KV blocks to choose from (default 16 x max_batch).
    pub regroup_pool: Option<usize>,
    /// Regrouping: most steps a sequence waits before it runs regardless of its route
    /// (default 4 x pool / max_batch: with less, aged sequences fill every step and nothing is
    /// left to choose).
    pub regroup_max_wait: Option<usize>,
    /// Read experts into the host cache at start, in layer order: `auto` (when the budget holds
    /// every expert), `on` (as many as the budget holds) or `off` (only on a miss).
    pub warm_start: WarmStart,
    /// Compute threads; `None`: the physical cores this process may use.
    pub threads: Option<usize>,
}

/// When the engine fills the host cache at start (`engine.warm_start`, `--warm-start`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmStart {
    /// When the budget holds every expert.
    #[default]
    Auto,
    On,
    Off,
}

impl WarmStart {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(WarmStart::Auto),
            "on" => Ok(WarmStart::On),
            "off" => Ok(WarmStart::Off),
            _ => Err(format!("`{s}` is not one of auto, on, off")),
        }
    }

    /// Whether a budget of `budget` bytes over experts of `total` bytes is warmed at start.
    pub fn applies(self, budget: u64, total: u64) -> bool {
        match self {
            WarmStart::Auto => budget >= total,
            WarmStart::On => true,
            WarmStart::Off => false,
        }
    }
}

impl Default for EngineSection {
    fn default() -> Self {
        EngineSection {
            max_batch: 32,
            max_batch_tokens: 512,
            kv_cache: None,
            readers: 2,
            schedule: ScheduleKind::Fcfs,
            regroup_pool: None,
            regroup_max_wait: None,
            warm_start: WarmStart::Auto,
            threads: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    #[default]
    Fcfs,
    Regroup,
}

impl EngineSection {
    /// The engine's schedule for these settings and `max_batch` sequences a step.
    pub fn schedule(&self, max_batch: usize) -> crate::engine::Schedule {
        match self.schedule {
            ScheduleKind::Fcfs => crate::engine::Schedule::Fcfs,
            ScheduleKind::Regroup => {
                let pool = self.regroup_pool.unwrap_or(16 * max_batch).max(max_batch);
                let max_wait = self.regroup_max_wait.unwrap_or(4 * pool / max_batch.max(1));
                crate::engine::Schedule::Regroup { pool, max_wait }
            }
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulatorConfig {
    /// Bytes of one routed expert, for `stevedore simulate` without `--model`.
    pub expert_bytes: Option<Size>,
}

/// A config file that cannot be read or is invalid; the message names the key.
#[derive(Debug, thiserror::Error)]
#[error("{}: {msg}", path.display())]
pub struct ConfigError {
    pub path: PathBuf,
    pub msg: String,
}

/// Deepest look-ahead accepted: predictors stop at the next token's last layer anyway, and a
/// larger value is more likely a typo than a plan.
pub const MAX_DEPTH: usize = 64;

impl Config {
    /// Reads and validates `path`; `predictor.model` is resolved against its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let err = |msg: String| ConfigError { path: path.to_owned(), msg };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut cfg = Self::parse(&text).map_err(err)?;
        if let (Some(model), Some(dir)) = (&cfg.predictor.model, path.parent()) {
            cfg.predictor.model = Some(dir.join(model));
        }
        Ok(cfg)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: Config = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the values serde cannot: ranges and combinations. Errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.tiers.host.budget == Size::Bytes(0) {
            return Err("tiers.host.budget: must be more than 0 bytes".into());
        }
        let e = &self.engine;
        for (key, v, max) in [
            ("engine.max_batch", e.max_batch, 1 << 16),
            ("engine.max_batch_tokens", e.max_batch_tokens, 1 << 20),
            ("engine.readers", e.readers, 64),
            ("engine.threads", e.threads.unwrap_or(1), 4096),
            ("engine.regroup_pool", e.regroup_pool.unwrap_or(1), 1 << 16),
            ("engine.regroup_max_wait", e.regroup_max_wait.unwrap_or(1), 1 << 16),
        ] {
            if v == 0 || v > max {
                return Err(format!("{key}: {v} is not between 1 and {max}"));
            }
        }
        match e.kv_cache {
            Some(Size::Percent(_)) => {
                return Err(
                    "engine.kv_cache: must be a size in bytes (e.g. \"2GiB\"), not a percentage".into()
                )
            }
            Some(Size::Bytes(0)) => return Err("engine.kv_cache: must be more than 0 bytes".into()),
            _ => {}
        }
        let p = &self.predictor;
        match p.depth {
            Layers::Count(n) if n == 0 || n > MAX_DEPTH => {
                return Err(format!("predictor.depth: {n} is not between 1 and {MAX_DEPTH}"))
            }
            _ => {}
        }
        if let PrefetchDepth::Layers(n) = p.prefetch_depth {
            if n > MAX_DEPTH {
                return Err(format!("predictor.prefetch_depth: {n} is more than {MAX_DEPTH}"));
            }
        }
        if p.prefetch_top == Some(0) {
            return Err(
                "predictor.prefetch_top: must be at least 1 (to turn prefetch off, set prefetch_depth = 0)"
                    .into(),
            );
        }
        for (key, v) in [
            ("predictor.protect_min_lift", p.protect_min_lift),
            ("predictor.prefetch_min_lift", p.prefetch_min_lift),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{key}: {v} must be zero or more"));
            }
        }
        if !matches!(p.max_protected, Size::Percent(_)) {
            return Err(format!(
                "predictor.max_protected: `{}` must be a percentage of the cache (e.g. \"50%\")",
                p.max_protected
            ));
        }
        for (kind, w) in &p.ensemble {
            if !(w.is_finite() && *w > 0.0) {
                return Err(format!(
                    "predictor.ensemble.{}: weight {w} must be more than zero",
                    kind.as_str()
                ));
            }
        }
        if (p.kind == PredictorKind::Path || p.ensemble.contains_key(&PredictorKind::Path))
            && p.model.is_none()
        {
            return Err("predictor.model: kind = \"path\" needs the trained model file (from `stevedore predictor train`)".into());
        }
        self.precision.validate()?;
        self.routing.validate()?;
        match self.simulator.expert_bytes {
            Some(Size::Percent(_)) => {
                return Err(
                    "simulator.expert_bytes: must be a size in bytes (e.g. \"336MiB\"), not a percentage"
                        .into(),
                )
            }
            Some(Size::Bytes(0)) => return Err("simulator.expert_bytes: must be more than 0 bytes".into()),
            _ => {}
        }
        Ok(())
    }
}

/// The commented default config. It parses to [`Config::default`] (tested).
pub const DEFAULT_TOML: &str = r#"# stevedore config: one file drives `stevedore generate` and `stevedore simulate`.
# Every key is optional; this file spells out the defaults. Sizes are bytes (4096), a unit
# (512MiB, 2GiB, 1.5GB) or a percentage (25%); each key says what its percentage is of.

[tiers.host]
# Host RAM given to cached experts. A percentage is of the model's total routed-expert bytes.
budget = "25%"

[cache]
# Replacement policy: "lru", "lfu" or "predictive" (LRU order; experts predicted for the next
# `predictor.depth` MoE layers are protected from eviction and prefetched).
policy = "predictive"
# "shared": one cache for all MoE layers; "per-layer": the budget split evenly between them.
split = "shared"

[predictor]
# What steers the predictive policy: "gate" (next-gate estimates: each MoE layer applies the
# routers of the layers ahead to its hidden state), "frequency", "recency", "transition"
# (inter-layer statistics, learned online) or "path" (a model trained by `stevedore predictor
# train`).
kind = "gate"
# Predictors blended with `kind` (which weighs 1), each with its weight: each layer's experts
# are scored by the weighted mean of the members that predict that layer. The gate sees only
# the current token's layers; the transition statistics also predict the next token's first.
ensemble = { transition = 0.5 }
# The hidden state the next-gate estimates start from: "post_attention" (the residual stream
# after the layer's attention, the newest at its routing) or "layer_input" (before attention).
gate_input = "post_attention"
# Experts taken from each estimate beyond the router's top-k (default: top-k more).
# gate_margin = 2
# MoE layers looked ahead: experts predicted for them are protected from eviction. A number of
# layers (4) or a percentage of the model's MoE layers ("60%").
depth = "60%"
# Of those, the nearest layers whose predicted experts are prefetched: a number, or "auto" to
# follow the measured disk bandwidth, expert size and layer compute time (the prefetch budget
# below is then measured too; the figures are in the stats' `horizon`).
prefetch_depth = "auto"
# Prefetch at most this many of a layer's predicted experts (default: the model's top-k).
# prefetch_top = 2
# Prefetch only experts predicted at least this many times as likely as chance
# (top_k / num_experts, the chance that an expert picked at random is routed to), or halfway
# from chance to certainty where that is less...
prefetch_min_lift = 1.8
# ...and protect only those at least this many times as likely.
protect_min_lift = 0.0
# Most bytes prefetched per step (a token's start, or one MoE layer's routing): the transfer
# one step of compute can hide. A percentage is of the tier's budget. With prefetch_depth =
# "auto", the bytes one layer's compute time can move, times the horizon, instead.
prefetch_budget = "5%"
# Most of the cache that protection may hold, so that misses always find room.
max_protected = "75%"
# Trained model file for kind = "path", relative to this file.
# model = "path-model.bin"

[engine]
# Most sequences in one forward pass (continuous batching: sequences join and leave between
# passes, and every expert read serves all the tokens routed to it).
max_batch = 32
# Rows of one forward pass: every running sequence's decode token, then prompt chunks until
# this many rows in all (a longer prompt is prefilled over several passes).
max_batch_tokens = 512
# Bytes of the paged KV cache. Without it, `generate` and `batch` take what their requests need
# at once and `serve` max_batch sequences of min(context, 4096) positions, at most half the
# memory available.
# kv_cache = "2GiB"
# Threads reading experts from disk (more keep more reads in flight: NVMe drives reward it).
# Two filled a 3 GiB warm start at 1.2-1.6 GB/s where one managed 0.5-0.85 on the development
# VM's disk; for the scattered misses of a streaming decode they made no difference there.
readers = 2
# Which sequences share a forward pass: "fcfs" runs every admitted sequence (up to max_batch);
# "regroup" keeps up to regroup_pool sequences in the KV cache and runs, each step, the
# max_batch whose last routes overlap most, so each step loads fewer distinct experts (batch
# jobs with many more requests than max_batch gain; tokens are the same either way). A sequence
# never waits more than regroup_max_wait steps. A larger pool groups better (pydoc-moe at
# max_batch 8: 21% fewer distinct experts per decode pass with 8x, 29% with 16x) and holds more
# KV (requests wait for KV blocks when the cache is smaller than the pool needs).
schedule = "fcfs"
# regroup_pool = 512       # default: 16 x max_batch
# regroup_max_wait = 64    # default: 4 x regroup_pool / max_batch
# Read experts into the host cache at start, in layer order, behind every demand read, so that
# a model the budget holds runs at full speed after one pass over its experts at the disk's
# bandwidth instead of one miss at a time: "auto" (when the budget holds every expert), "on"
# (as many as the budget holds, in layer order) or "off" (read an expert only on a miss).
warm_start = "auto"
# Compute threads (matmuls, attention). Default: the physical cores this process may use (SMT
# siblings add nothing to a memory-bound decode).
# threads = 8

[precision]
# Which copy of an expert a layer uses: "full" (the checkpoint's precision), "hobbit" (mixed
# precision on a miss: rank a token's experts by gate weight; with s the share of its gate mass
# ranked above an expert, a missed expert is read in full while s <= full_until, as its low-bit
# copy while s <= skip_above, and skipped beyond; copies already resident are always used) or
# "low" (every expert's low-bit copy). The last two need the copies: `stevedore quantize
# --model DIR --format q4_0`.
policy = "full"
# The low-bit copies' format: "q4_0" (4.5 bits per weight) or "q8_0" (8.5).
low = "q4_0"
full_until = 0.6
skip_above = 0.9
# Read an expert in full when a token needs it so while only its low-bit copy is resident.
upgrade = true
# The dense matrices (attention, dense and shared MLPs, embeddings, LM head): "full" (the
# checkpoint's) or their low-bit copies, "q8_0" or "q4_0" (`stevedore quantize --all`).
dense = "full"

[routing]
# Cache-conditional routing: added to the router logits of experts already resident before the
# top-k (gate weights stay the router's own). 0 keeps the reference's tokens; more trades
# quality (measure it: `stevedore perplexity`) for fewer reads.
resident_bias = 0.0

[simulator]
# Bytes of one routed expert, for `stevedore simulate` without --model DIR.
# expert_bytes = "336MiB"
"#;

/// Prints [`DEFAULT_TOML`] (`stevedore config --print-default`).
pub fn print_default() {
    print!("{DEFAULT_TOML}");
}

/// Sizes as strings (`"512MiB"`, `"25%"`) or plain byte counts.
impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"512MiB\", \"2GiB\" or \"25%\", or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                Size::parse(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v).map(Size::Bytes).map_err(|_| E::custom(format!("{v} bytes is negative")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size::Bytes(v))
            }
        }
        d.deserialize_any(SizeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use stevedore_predictor::RoutingShape;

    use super::*;

    #[test]
    fn default_toml_parses_to_the_default() {
        assert_eq!(Config::parse(DEFAULT_TOML).unwrap(), Config::default());
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn values_parse() {
        let cfg = Config::parse(
            "[tiers.host]\nbudget = \"2GiB\"\n[cache]\npolicy = \"lfu\"\nsplit = \"per-layer\"\n\
             [predictor]\nkind = \"path\"\nmodel = \"m.bin\"\ndepth = 3\nprefetch_budget = 1048576\n\
             prefetch_top = 4\n\
             [simulator]\nexpert_bytes = \"336MiB\"\n",
        )
        .unwrap();
        assert_eq!(cfg.tiers.host.budget, Size::Bytes(2 << 30));
        assert_eq!((cfg.cache.policy, cfg.cache.split), (PolicyKind::Lfu, Split::PerLayer));
        assert_eq!((cfg.predictor.kind, cfg.predictor.depth), (PredictorKind::Path, Layers::Count(3)));
        assert_eq!(cfg.predictor.prefetch_top, Some(4));
        let depth = Config::parse("[predictor]\ndepth = \"50%\"\n").unwrap().predictor.depth;
        assert_eq!((depth, depth.of(32), depth.of(5)), (Layers::Percent(50.0), 16, 3));
        assert_eq!(cfg.predictor.prefetch_budget, Size::Bytes(1 << 20));
        assert_eq!(cfg.simulator.expert_bytes, Some(Size::Bytes(336 << 20)));
        // Untouched keys keep their defaults.
        assert_eq!(cfg.predictor.max_protected, Size::Percent(75.0));
        assert_eq!(cfg.predictor.prefetch_depth, PrefetchDepth::Auto);
        let p = Config::parse(
            "[predictor]\nkind = \"transition\"\nensemble = { gate = 2.0, path = 0.5 }\nmodel = \"m.bin\"\n\
             gate_input = \"layer_input\"\ngate_margin = 1\nprefetch_depth = 2\n",
        )
        .unwrap()
        .predictor;
        assert_eq!(p.ensemble, BTreeMap::from([(PredictorKind::Gate, 2.0), (PredictorKind::Path, 0.5)]));
        assert_eq!(
            (p.gate_input, p.gate_margin, p.prefetch_depth),
            (GateInputKind::LayerInput, Some(1), PrefetchDepth::Layers(2))
        );
        let shape = RoutingShape { moe_layers: 8, num_experts: 16, top_k: 2 };
        let f = p.foresight(shape, 4).unwrap();
        assert_eq!((f.depth, f.candidates, f.input), (4, 3, stevedore_models::GateInput::LayerInput));
        // Without the gate anywhere, nothing is estimated.
        let p = Config::parse("[predictor]\nkind = \"transition\"\nensemble = {}\n").unwrap().predictor;
        assert_eq!(p.foresight(shape, 4), None);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[cache]\npolcy = \"lru\"\n", "unknown field `polcy`"),
            ("[cahce]\n", "unknown field `cahce`"),
            ("[tiers.gpu]\nbudget = \"1GiB\"\n", "unknown field `gpu`"),
            ("[cache]\npolicy = \"mru\"\n", "`mru` is not a policy (expected one of: lru, lfu, predictive)"),
            ("[engine]\nmax_batch = 0\n", "engine.max_batch: 0 is not between 1 and 65536"),
            ("[engine]\nreaders = 100\n", "engine.readers: 100 is not between 1 and 64"),
            ("[engine]\nkv_cache = \"10%\"\n", "engine.kv_cache: must be a size in bytes"),
            ("[tiers.host]\nbudget = \"12XB\"\n", "unknown unit `xb`"),
            ("[tiers.host]\nbudget = \"150%\"\n", "a percentage must be in (0, 100]"),
            ("[tiers.host]\nbudget = 0\n", "tiers.host.budget: must be more than 0"),
            ("[predictor]\ndepth = 0\n", "predictor.depth: 0 is not between 1 and 64"),
            ("[predictor]\nprefetch_depth = \"far\"\n", "`far` is neither a number of layers nor \"auto\""),
            ("[predictor]\nprefetch_depth = 65\n", "predictor.prefetch_depth: 65 is more than 64"),
            (
                "[predictor]\nensemble = { transition = 0.0 }\n",
                "predictor.ensemble.transition: weight 0 must be more than zero",
            ),
            ("[predictor]\nensemble = { lstm = 1.0 }\n", "unknown variant `lstm`"),
            (
                "[predictor]\nensemble = { path = 1.0 }\n",
                "predictor.model: kind = \"path\" needs the trained model file",
            ),
            ("[predictor]\ngate_input = \"output\"\n", "unknown variant `output`"),
            ("[predictor]\ndepth = -1\n", "-1 layers is negative"),
            ("[predictor]\ndepth = \"4MiB\"\n", "`4MiB` is neither a number of layers nor a percentage"),
            ("[predictor]\nprefetch_top = 0\n", "predictor.prefetch_top: must be at least 1"),
            (
                "[predictor]\nprefetch_min_lift = -1.5\n",
                "predictor.prefetch_min_lift: -1.5 must be zero or more",
            ),
            ("[predictor]\nprefetch_min_score = 0.5\n", "unknown field `prefetch_min_score`"),
            (
                "[predictor]\nmax_protected = \"1GiB\"\n",
                "predictor.max_protected: `1.0 GiB` must be a percentage",
            ),
            ("[predictor]\nkind = \"path\"\n", "predictor.model: kind = \"path\" needs"),
            ("[simulator]\nexpert_bytes = \"5%\"\n", "simulator.expert_bytes: must be a size in bytes"),
        ];
        for (text, want) in cases {
            let err = Config::parse(text).unwrap_err();
            assert!(err.contains(want), "for {text:?}: want `{want}` in `{err}`");
        }
        // serde's messages point at the line with the key.
        let err = Config::parse("[cache]\npolicy = \"mru\"\n").unwrap_err();
        assert!(err.contains("line 2") && err.contains("policy = \"mru\""), "{err}");
    }

    #[test]
    fn load_names_the_file_and_resolves_the_model_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, "[predictor]\nkind = \"path\"\nmodel = \"m.bin\"\n").unwrap();
        assert_eq!(Config::load(&path).unwrap().predictor.model, Some(dir.path().join("m.bin")));
        std::fs::write(&path, "[predictor]\ndepht = 2\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}: ", path.display())) && err.contains("depht"), "{err}");
    }
}
