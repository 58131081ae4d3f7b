//! `stevedore simulate`: replays a routing trace through the configured expert tier under
//! every policy (lru, lfu, predictive, and Belady's optimum as the bound) at one or more
//! capacities, and reports demand hit rate, bytes moved and prefetch use. It drives the same
//! cache, policies and predictors the live engine uses; only the bytes are imaginary.

mod replay;
mod sizes;

use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;
use stevedore_cache::PolicyKind;
use stevedore_predictor::{split_holdout, RoutingShape};

pub use replay::{layer_steps, replay, steps, Caches, Contender, RunStats, Steering};
pub use sizes::ExpertSizes;

use crate::config::{Config, ConfigError};
use crate::size::{human, Size};
use crate::trace::{self, Trace, TraceError};

/// Arguments of `stevedore simulate`.
#[derive(clap::Args, Clone, Debug)]
pub struct SimulateArgs {
    /// Routing trace: stevedore's format, or a FLAME-MoE, Mixtral or Qwen1.5 trace
    /// (docs/traces.md).
    #[arg(long, value_name = "FILE")]
    pub trace: PathBuf,
    /// Config file (TOML); without it the defaults apply (`stevedore config --print-default`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Tier capacities to compare, comma-separated: percentages of the model's routed-expert
    /// bytes (10%,25%,50%) or sizes (2GiB). Default: the config's `tiers.host.budget`.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub capacity: Vec<Size>,
    /// Model directory (config.json + safetensors) giving each expert's size; otherwise the
    /// config's `simulator.expert_bytes`.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Routed experts per MoE layer of the traced model, for a trace whose file does not say
    /// (a CSV without a header comment); `--model` says it too. Without either, it is read
    /// from the file or inferred from the largest expert id (and printed).
    #[arg(long, value_name = "N")]
    pub experts: Option<usize>,
    /// Count only the last FRAC of the trace (split as `stevedore predictor train --holdout`
    /// splits it); the rest is replayed first to warm caches and predictors. Use it to measure
    /// a path model on tokens it was not trained on.
    #[arg(long, value_name = "FRAC", default_value_t = 0.0)]
    pub holdout: f64,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Model(#[from] stevedore_models::Error),
    #[error("{0}")]
    Invalid(String),
}

/// One policy's results at one capacity.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyReport {
    /// Demand accesses that found the expert resident (cached, or prefetched in time).
    pub hit_rate: f64,
    /// Bytes loaded in all: demand misses plus prefetches.
    pub bytes_moved: u64,
    pub bytes_per_token: f64,
    pub hits: u64,
    pub accesses: u64,
    pub demand_bytes: u64,
    pub prefetch_bytes: u64,
    pub prefetches_issued: u64,
    pub prefetches_useful: u64,
}

impl From<RunStats> for PolicyReport {
    fn from(s: RunStats) -> Self {
        PolicyReport {
            hit_rate: s.hit_rate(),
            bytes_moved: s.bytes_moved(),
            bytes_per_token: s.bytes_per_token(),
            hits: s.hits,
            accesses: s.accesses,
            demand_bytes: s.demand_bytes,
            prefetch_bytes: s.prefetch_bytes,
            prefetches_issued: s.prefetches_issued,
            prefetches_useful: s.prefetches_useful,
        }
    }
}

/// The four policies side by side (a struct, not a map, to keep this order in the JSON).
#[derive(Clone, Debug, Serialize)]
pub struct Policies {
    pub lru: PolicyReport,
    pub lfu: PolicyReport,
    pub predictive: PolicyReport,
    pub belady: PolicyReport,
}

impl Policies {
    pub fn get(&self, c: Contender) -> &PolicyReport {
        match c {
            Contender::Policy(PolicyKind::Lru) => &self.lru,
            Contender::Policy(PolicyKind::Lfu) => &self.lfu,
            Contender::Policy(PolicyKind::Predictive) => &self.predictive,
            Contender::Belady => &self.belady,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct CapacityReport {
    /// Fraction of the model's routed-expert bytes.
    pub capacity: f64,
    pub budget_bytes: u64,
    pub policies: Policies,
}

/// What the predictive policy ran with.
#[derive(Clone, Debug, Serialize)]
pub struct PredictorSummary {
    pub kind: &'static str,
    /// The members blended with `kind`, with their weights (`transition x0.5`).
    pub ensemble: String,
    pub depth: String,
    /// A number of MoE layers, or `auto` (a recorded trace's horizons, else one layer).
    pub prefetch_depth: String,
    pub prefetch_budget: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub trace: String,
    pub model: String,
    /// Tokens counted (the held-out part with `--holdout`).
    pub tokens: usize,
    /// Tokens replayed before counting began.
    pub warmup_tokens: usize,
    pub moe_layers: usize,
    pub num_experts: usize,
    pub top_k: usize,
    /// Bytes of all routed experts of the traced layers: what capacities are fractions of.
    pub expert_bytes_total: u64,
    /// The policy the config chose.
    pub configured: &'static str,
    pub split: &'static str,
    pub predictor: PredictorSummary,
    pub capacities: Vec<CapacityReport>,
}

/// Replays `trace` under every policy at each capacity, counting only the held-out fraction
/// `holdout` of it when that is not 0.
pub fn simulate(
    trace: &Trace,
    trace_name: &str,
    cfg: &Config,
    sizes: &ExpertSizes,
    capacities: &[Size],
    holdout: f64,
) -> Result<Report, SimError> {
    if !(0.0..1.0).contains(&holdout) {
        return Err(SimError::Invalid(format!("--holdout {holdout}: must be at least 0 and less than 1")));
    }
    let (trace, warmup) = if holdout > 0.0 {
        let split = split_holdout(&trace.tokens, holdout);
        let warmup = split.train.len();
        let tokens = split.train.into_iter().chain(split.test).collect();
        (std::borrow::Cow::Owned(Trace { meta: trace.meta.clone(), tokens }), warmup)
    } else {
        (std::borrow::Cow::Borrowed(trace), 0)
    };
    let trace = trace.as_ref();
    let source = cfg.predictor.source()?;
    let total = sizes.total();
    let mut reports = Vec::new();
    for &capacity in capacities {
        let budget = capacity.bytes(total);
        let run = |c: Contender| -> Result<PolicyReport, SimError> {
            let steering = match c {
                Contender::Policy(PolicyKind::Predictive) => Some(Steering {
                    predictor: source.build(RoutingShape::from(&trace.meta)).map_err(SimError::Invalid)?,
                    params: cfg.predictor.anticipation_params(RoutingShape::from(&trace.meta)),
                    depth: cfg.predictor.depth.of(trace.num_layers()),
                    prefetch_budget: cfg.predictor.prefetch_budget.bytes(budget),
                }),
                _ => None,
            };
            let caches =
                Caches { split: cfg.cache.split, warm: cfg.engine.warm_start.applies(budget, total) };
            Ok(replay(trace, sizes, budget, caches, c, steering, warmup)?.into())
        };
        let policies = Policies {
            lru: run(Contender::Policy(PolicyKind::Lru))?,
            lfu: run(Contender::Policy(PolicyKind::Lfu))?,
            predictive: run(Contender::Policy(PolicyKind::Predictive))?,
            belady: run(Contender::Belady)?,
        };
        reports.push(CapacityReport {
            capacity: budget as f64 / total.max(1) as f64,
            budget_bytes: budget,
            policies,
        });
    }
    Ok(Report {
        trace: trace_name.to_owned(),
        model: trace.meta.model.clone(),
        tokens: trace.tokens.len() - warmup,
        warmup_tokens: warmup,
        moe_layers: trace.num_layers(),
        num_experts: trace.meta.num_experts,
        top_k: trace.meta.top_k,
        expert_bytes_total: total,
        configured: cfg.cache.policy.name(),
        split: match cfg.cache.split {
            crate::config::Split::Shared => "shared",
            crate::config::Split::PerLayer => "per-layer",
        },
        predictor: PredictorSummary {
            kind: cfg.predictor.kind.as_str(),
            ensemble: (cfg.predictor.ensemble.iter())
                .filter(|(k, _)| **k != cfg.predictor.kind)
                .map(|(k, w)| format!("{} x{w}", k.as_str()))
                .collect::<Vec<_>>()
                .join(", "),
            depth: cfg.predictor.depth.to_string(),
            prefetch_depth: cfg.predictor.prefetch_depth.to_string(),
            prefetch_budget: cfg.predictor.prefetch_budget.to_string(),
        },
        capacities: reports,
    })
}

/// `stevedore simulate`: loads everything `args` names, simulates, prints.
pub fn run(args: &SimulateArgs) -> Result<(), SimError> {
    let cfg = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let declared = trace::declared(args.model.as_deref(), args.experts).map_err(SimError::Invalid)?;
    let imported = trace::load_with(&args.trace, &declared)?;
    eprintln!("trace {}", imported.describe(&args.trace));
    let trace = imported.trace;
    let sizes = match (&args.model, cfg.simulator.expert_bytes) {
        (Some(dir), _) => ExpertSizes::from_model(dir, &trace.meta)?,
        (None, Some(bytes)) => ExpertSizes::uniform(&trace.meta, bytes.bytes(0)),
        (None, None) => {
            return Err(SimError::Invalid(
                "expert sizes unknown: pass --model DIR or set `expert_bytes` in the config's [simulator] section".into(),
            ))
        }
    };
    let capacities =
        if args.capacity.is_empty() { vec![cfg.tiers.host.budget] } else { args.capacity.clone() };
    let name = args
        .trace
        .file_name()
        .map_or_else(|| args.trace.display().to_string(), |n| n.to_string_lossy().into());
    let report = simulate(&trace, &name, &cfg, &sizes, &capacities, args.holdout)?;
    let text = if args.json {
        serde_json::to_string(&report).expect("a report serialises") + "\n"
    } else {
        render(&report)
    };
    // A reader that stops early (`| head`) is not an error.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(SimError::Invalid(format!("stdout: {e}")))
        }
        _ => Ok(()),
    }
}

/// The report as text tables, one per capacity.
pub fn render(r: &Report) -> String {
    let experts = (r.moe_layers * r.num_experts) as u64;
    let mut out = format!(
        "trace      {}: {}, {} tokens{}, {} MoE layers x {} experts, top-{}\n\
         experts    {} in all ({} x {})\n\
         configured {} ({} cache; predictor {}{}, depth {}, prefetch depth {}, {} per step)\n",
        r.trace,
        r.model,
        r.tokens,
        if r.warmup_tokens > 0 {
            format!(" counted after {} warm-up tokens", r.warmup_tokens)
        } else {
            String::new()
        },
        r.moe_layers,
        r.num_experts,
        r.top_k,
        human(r.expert_bytes_total),
        experts,
        human(r.expert_bytes_total / experts.max(1)),
        r.configured,
        r.split,
        r.predictor.kind,
        if r.predictor.ensemble.is_empty() { String::new() } else { format!(" + {}", r.predictor.ensemble) },
        r.predictor.depth,
        r.predictor.prefetch_depth,
        r.predictor.prefetch_budget,
    );
    for c in &r.capacities {
        out += &format!("\ncapacity {:.0}% ({})\n", c.capacity * 100.0, human(c.budget_bytes));
        out += "  policy        hit rate   moved/token   prefetches   useful\n";
        for p in Contender::ALL {
            let s = c.policies.get(p);
            let mark = if p.name() == r.configured { '*' } else { ' ' };
            let (issued, useful) = if p == Contender::Policy(PolicyKind::Predictive) {
                (s.prefetches_issued.to_string(), s.prefetches_useful.to_string())
            } else {
                ("-".into(), "-".into())
            };
            out += &format!(
                "{mark} {:<12} {:>8.1}%   {:>11}   {:>10}   {:>6}\n",
                p.name(),
                s.hit_rate * 100.0,
                human(s.bytes_per_token.round() as u64),
                issued,
                useful
            );
        }
    }
    out
}

#[cfg(test)]
mod tests;
