//! `[predictor]`: which routing predictor steers the predictive policy (and the next-gate
//! estimates it may ask the model for), how far ahead it protects and prefetches, and what
//! building it needs loaded.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use stevedore_cache::AnticipationParams;
use stevedore_predictor::{
    Ensemble, NextGatePredictor, OnlineKind, PathModel, PathPredictor, RoutePredictor, RoutingShape,
};

use super::ConfigError;
use crate::size::Size;

/// Routing predictor steering the `predictive` policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PredictorKind {
    Frequency,
    Recency,
    Transition,
    /// The learned routing-path model; needs `predictor.model`.
    Path,
    /// Next-gate estimates: the routers of the layers ahead applied to the hidden state.
    #[default]
    Gate,
}

impl PredictorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PredictorKind::Frequency => "frequency",
            PredictorKind::Recency => "recency",
            PredictorKind::Transition => "transition",
            PredictorKind::Path => "path",
            PredictorKind::Gate => "gate",
        }
    }
}

/// The hidden state next-gate estimates are made from (`predictor.gate_input`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateInputKind {
    #[default]
    PostAttention,
    LayerInput,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PredictorConfig {
    pub kind: PredictorKind,
    /// MoE layers looked ahead: experts predicted for them are protected from eviction.
    pub depth: Layers,
    /// Only predictions at most this many MoE layers ahead are prefetched; `auto`: as many as
    /// the measured disk bandwidth and layer compute time call for ([`crate::horizon`]), and
    /// then `prefetch_budget` is measured too.
    pub prefetch_depth: PrefetchDepth,
    /// A predicted layer's best `prefetch_top` experts may be prefetched; `None`: the model's
    /// top-k.
    pub prefetch_top: Option<usize>,
    /// Prefetch only experts whose score is at least this multiple of `top_k / num_experts`,
    /// the chance that an expert picked at random is routed to (or halfway from chance to
    /// certainty where that is less). A lift, not a raw score, so that one value suits models
    /// with 8 experts and with 64.
    pub prefetch_min_lift: f32,
    /// Protect only experts scoring at least this multiple of `top_k / num_experts`.
    pub protect_min_lift: f32,
    /// Most bytes prefetched per step (a token start or one MoE layer's routing): the
    /// transfer one step of compute can hide. A percentage is of the tier's budget.
    pub prefetch_budget: Size,
    /// Most of the cache that protection may hold, as a percentage of its budget.
    pub max_protected: Size,
    /// Trained model for `kind = "path"`; relative paths are from the config file's directory.
    pub model: Option<PathBuf>,
    /// Predictors blended with `kind`, each with its weight (`kind` weighs 1).
    pub ensemble: BTreeMap<PredictorKind, f32>,
    /// Which hidden state next-gate estimates apply the routers ahead to.
    pub gate_input: GateInputKind,
    /// Experts taken from each next-gate estimate beyond the router's top-k; `None`: top-k.
    pub gate_margin: Option<usize>,
}

impl Default for PredictorConfig {
    fn default() -> Self {
        PredictorConfig {
            kind: PredictorKind::Gate,
            depth: Layers::Percent(60.0),
            prefetch_depth: PrefetchDepth::Auto,
            prefetch_top: None,
            prefetch_min_lift: 1.8,
            protect_min_lift: 0.0,
            prefetch_budget: Size::Percent(5.0),
            max_protected: Size::Percent(75.0),
            model: None,
            ensemble: BTreeMap::from([(PredictorKind::Transition, 0.5)]),
            gate_input: GateInputKind::PostAttention,
            gate_margin: None,
        }
    }
}

/// How far ahead to prefetch: a fixed number of MoE layers or `"auto"` (measured).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefetchDepth {
    Auto,
    Layers(usize),
}

impl PrefetchDepth {
    /// The depth to start with: `auto` starts at one layer.
    pub fn initial(self) -> usize {
        match self {
            PrefetchDepth::Auto => 1,
            PrefetchDepth::Layers(n) => n,
        }
    }
}

impl fmt::Display for PrefetchDepth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrefetchDepth::Auto => f.write_str("auto"),
            PrefetchDepth::Layers(n) => write!(f, "{n}"),
        }
    }
}

impl<'de> Deserialize<'de> for PrefetchDepth {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct DepthVisitor;
        impl Visitor<'_> for DepthVisitor {
            type Value = PrefetchDepth;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of MoE layers (1) or \"auto\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PrefetchDepth, E> {
                match v {
                    "auto" => Ok(PrefetchDepth::Auto),
                    _ => Err(E::custom(format!("`{v}` is neither a number of layers nor \"auto\""))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PrefetchDepth, E> {
                usize::try_from(v)
                    .map(PrefetchDepth::Layers)
                    .map_err(|_| E::custom(format!("{v} layers is negative")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PrefetchDepth, E> {
                Ok(PrefetchDepth::Layers(v as usize))
            }
        }
        d.deserialize_any(DepthVisitor)
    }
}

/// A number of MoE layers, absolute (`4`) or a percentage of the model's (`"60%"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Layers {
    Count(usize),
    Percent(f64),
}

impl Layers {
    /// Resolves against a model with `num_layers` MoE layers; at least 1.
    pub fn of(self, num_layers: usize) -> usize {
        match self {
            Layers::Count(n) => n.max(1),
            Layers::Percent(p) => ((num_layers as f64 * p / 100.0).ceil() as usize).max(1),
        }
    }
}

impl fmt::Display for Layers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layers::Count(n) => write!(f, "{n}"),
            Layers::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl<'de> Deserialize<'de> for Layers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct LayersVisitor;
        impl Visitor<'_> for LayersVisitor {
            type Value = Layers;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of MoE layers (4) or a percentage of them (\"60%\")")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Layers, E> {
                match Size::parse(v) {
                    Ok(Size::Percent(p)) => Ok(Layers::Percent(p)),
                    _ => Err(E::custom(format!(
                        "`{v}` is neither a number of layers nor a percentage like \"60%\""
                    ))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Layers, E> {
                usize::try_from(v)
                    .map(Layers::Count)
                    .map_err(|_| E::custom(format!("{v} layers is negative")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Layers, E> {
                Ok(Layers::Count(v as usize))
            }
        }
        d.deserialize_any(LayersVisitor)
    }
}

impl PredictorConfig {
    /// Protection and prefetch settings for a model of `shape`, for
    /// [`stevedore_cache::Anticipation`]: lifts become score thresholds.
    pub fn anticipation_params(&self, shape: RoutingShape) -> AnticipationParams {
        let chance = shape.top_k as f32 / shape.num_experts.max(1) as f32;
        AnticipationParams {
            protect_min_score: (self.protect_min_lift * chance).min(1.0),
            // Capped halfway from chance to certainty: where a router picks half the experts,
            // 1.8x chance would ask for more than certainty.
            prefetch_min_score: (self.prefetch_min_lift * chance).min((1.0 + chance) / 2.0),
            prefetch_depth: self.prefetch_depth.initial(),
            prefetch_top: self.prefetch_top.unwrap_or(shape.top_k),
            max_protected_fraction: match self.max_protected {
                Size::Percent(p) => p / 100.0,
                Size::Bytes(_) => 1.0,
            },
        }
    }

    /// Loads what building the predictor needs (the trained model for `kind = "path"`), once:
    /// every cache or simulated run then builds its own predictor from it.
    pub fn source(&self) -> Result<PredictorSource, ConfigError> {
        let model = match (self.kind, &self.model) {
            (PredictorKind::Path, Some(path)) => {
                let err = |msg: String| ConfigError { path: path.clone(), msg };
                let bytes = std::fs::read(path).map_err(|e| err(format!("predictor.model: {e}")))?;
                Some(Arc::new(PathModel::from_bytes(&bytes).map_err(|e| err(e.to_string()))?))
            }
            _ => None,
        };
        Ok(PredictorSource {
            kind: self.kind,
            ensemble: self.ensemble.iter().filter(|(k, _)| **k != self.kind).map(|(&k, &w)| (k, w)).collect(),
            gate_margin: self.gate_margin,
            model,
            model_path: self.model.clone(),
        })
    }

    /// Whether any predictor in use reads next-gate estimates.
    pub fn uses_gate(&self) -> bool {
        self.kind == PredictorKind::Gate || self.ensemble.contains_key(&PredictorKind::Gate)
    }

    /// What each MoE layer should estimate ahead for a model of `shape` looking `depth` MoE
    /// layers ahead; `None` when no predictor reads the estimates.
    pub fn foresight(&self, shape: RoutingShape, depth: usize) -> Option<stevedore_models::Foresight> {
        self.uses_gate().then(|| stevedore_models::Foresight {
            depth,
            candidates: shape.top_k + self.gate_margin.unwrap_or(shape.top_k),
            input: match self.gate_input {
                GateInputKind::PostAttention => stevedore_models::GateInput::PostAttention,
                GateInputKind::LayerInput => stevedore_models::GateInput::LayerInput,
            },
        })
    }
}

/// A predictor kind with whatever it needs loaded; [`PredictorSource::build`] makes fresh
/// predictors from it.
pub struct PredictorSource {
    kind: PredictorKind,
    /// Members blended with `kind`, and their weights.
    ensemble: Vec<(PredictorKind, f32)>,
    gate_margin: Option<usize>,
    model: Option<Arc<PathModel>>,
    model_path: Option<PathBuf>,
}

impl PredictorSource {
    /// A predictor for a model of `shape`, with no history. The trained path model must have
    /// been trained for the same shape.
    pub fn build(&self, shape: RoutingShape) -> Result<Box<dyn RoutePredictor>, String> {
        let first = self.build_one(self.kind, shape)?;
        if self.ensemble.is_empty() {
            return Ok(first);
        }
        let mut members = vec![(first, 1.0)];
        for &(kind, weight) in &self.ensemble {
            members.push((self.build_one(kind, shape)?, weight));
        }
        Ok(Box::new(Ensemble::new(shape, members)))
    }

    fn build_one(&self, kind: PredictorKind, shape: RoutingShape) -> Result<Box<dyn RoutePredictor>, String> {
        let online = |k: OnlineKind| Ok(k.build(shape));
        match kind {
            PredictorKind::Gate => {
                Ok(Box::new(NextGatePredictor::new(shape, self.gate_margin.unwrap_or(shape.top_k))))
            }
            PredictorKind::Frequency => online(OnlineKind::Frequency),
            PredictorKind::Recency => online(OnlineKind::Recency),
            PredictorKind::Transition => online(OnlineKind::Transition),
            PredictorKind::Path => {
                let model =
                    self.model.as_ref().ok_or("predictor.model: kind = \"path\" needs a model file")?;
                let trained = model.shape();
                if (trained.moe_layers, trained.num_experts) != (shape.moe_layers, shape.num_experts) {
                    return Err(format!(
                        "predictor.model {}: trained for {} MoE layers x {} experts, but this model has {} x {}",
                        self.model_path.as_deref().unwrap_or(Path::new("?")).display(),
                        trained.moe_layers,
                        trained.num_experts,
                        shape.moe_layers,
                        shape.num_experts
                    ));
                }
                Ok(Box::new(PathPredictor::new(model.clone())))
            }
        }
    }
}
