//! `[precision]` (which copy of an expert a layer uses: HOBBIT's mixed precision) and
//! `[routing]` (cache-conditional routing) of the config file.

use serde::{Deserialize, Deserializer};
use stevedore_kernels::DType;

use crate::store::{HobbitRule, PrecisionPolicy};

/// `precision.policy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionKind {
    /// Every expert in the checkpoint's precision.
    #[default]
    Full,
    /// A missed expert of small gate weight is read as its low-bit copy, or skipped.
    Hobbit,
    /// Every expert from its low-bit copy.
    Low,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrecisionConfig {
    pub policy: PrecisionKind,
    /// The low-bit copies' format (`stevedore quantize` writes them).
    #[serde(deserialize_with = "low_format")]
    pub low: DType,
    /// A row needs an expert in full precision while the gate mass ranked above it is at most
    /// this share of the row's...
    pub full_until: f32,
    /// ...its low-bit copy while at most this, and nothing beyond.
    pub skip_above: f32,
    /// Whether an expert needed in full precision is read in full while its low-bit copy is
    /// resident (false: the low-bit copy serves).
    pub upgrade: bool,
    /// The dense matrices' format: `None` (`"full"`) for the checkpoint's, or their low-bit
    /// copies (`stevedore quantize --all`).
    #[serde(deserialize_with = "dense_format")]
    pub dense: Option<DType>,
}

impl Default for PrecisionConfig {
    fn default() -> Self {
        PrecisionConfig {
            policy: PrecisionKind::Full,
            low: DType::Q4_0,
            full_until: 0.6,
            skip_above: 0.9,
            upgrade: true,
            dense: None,
        }
    }
}

fn low_format<'de, D: Deserializer<'de>>(d: D) -> Result<DType, D::Error> {
    let name = String::deserialize(d)?;
    match DType::parse(&name) {
        Some(f) if stevedore_models::LOW_BIT_FORMATS.contains(&f) => Ok(f),
        _ => {
            Err(serde::de::Error::custom(format!("`{name}` is not a low-bit format (\"q8_0\" or \"q4_0\")")))
        }
    }
}

fn dense_format<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DType>, D::Error> {
    let name = String::deserialize(d)?;
    if name == "full" {
        return Ok(None);
    }
    match DType::parse(&name) {
        Some(f) if stevedore_models::LOW_BIT_FORMATS.contains(&f) => Ok(Some(f)),
        _ => Err(serde::de::Error::custom(format!(
            "`{name}` is not \"full\" or a low-bit format (\"q8_0\" or \"q4_0\")"
        ))),
    }
}

impl PrecisionConfig {
    /// Checks the thresholds; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        for (key, v) in [("precision.full_until", self.full_until), ("precision.skip_above", self.skip_above)]
        {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{key}: {v} is not between 0 and 1"));
            }
        }
        if self.full_until > self.skip_above {
            return Err(format!(
                "precision.full_until: {} is above precision.skip_above ({})",
                self.full_until, self.skip_above
            ));
        }
        Ok(())
    }

    /// The store's policy.
    pub fn policy(&self) -> PrecisionPolicy {
        match self.policy {
            PrecisionKind::Full => PrecisionPolicy::Full,
            PrecisionKind::Hobbit => PrecisionPolicy::Hobbit(HobbitRule {
                full_until: self.full_until,
                skip_above: self.skip_above,
                upgrade: self.upgrade,
            }),
            PrecisionKind::Low => PrecisionPolicy::Low,
        }
    }

    /// The low-bit format the store loads, if the policy uses one.
    pub fn low_format(&self) -> Option<DType> {
        (self.policy != PrecisionKind::Full).then_some(self.low)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Added to the router logits of experts already resident before the top-k; 0 (off) keeps
    /// the reference's tokens.
    pub resident_bias: f32,
}

impl RoutingConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.resident_bias.is_finite() && self.resident_bias >= 0.0) {
            return Err(format!("routing.resident_bias: {} must be zero or more", self.resident_bias));
        }
        Ok(())
    }
}
