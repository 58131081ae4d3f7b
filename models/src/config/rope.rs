//! RoPE scaling as configs declare it (`rope_scaling` in transformers 4.x, `rope_parameters` in
//! 5.x): LongRoPE's short factors and YaRN's interpolation, turned into the rotary frequencies
//! and scales transformers computes.

use super::RawRope;

/// How RoPE's frequencies depart from `theta^(-2i/d)`, from `rope_scaling` (4.x) or
/// `rope_parameters` (5.x).
#[derive(Clone, Debug, PartialEq)]
pub(super) enum RopeScaling {
    Default,
    /// LongRoPE (Phi-3.5-MoE): the short factors hold up to `original`; past it transformers
    /// switches every position to the long factors, re-encoding the cache, which this engine does
    /// not do: such positions are refused (`max_positions`).
    LongRope {
        short: Vec<f64>,
        mscale: f64,
        original: usize,
    },
    /// YaRN (DeepSeek-V2/V3, Kimi-K2).
    Yarn {
        factor: f64,
        original: usize,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        mscale_all_dim: f64,
    },
}

/// YaRN's magnitude correction, as transformers computes it.
fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl RopeScaling {
    pub(super) fn parse(r: &RawRope, top_original: Option<usize>) -> Result<Self, String> {
        let kind = r.rope_type.as_deref().or(r.kind.as_deref()).unwrap_or("default");
        let original = || {
            (r.original_max_position_embeddings.or(top_original))
                .ok_or(format!("`rope_scaling` ({kind}): missing `original_max_position_embeddings`"))
        };
        match kind {
            "default" => Ok(RopeScaling::Default),
            "longrope" | "su" => {
                let short =
                    r.short_factor.clone().ok_or("`rope_scaling` (longrope): missing `short_factor`")?;
                let mscale = r.short_mscale.unwrap_or(1.0);
                if short.iter().chain([&mscale]).any(|f| !(f.is_finite() && *f > 0.0)) {
                    return Err(
                        "`rope_scaling` (longrope): factors and `short_mscale` must be positive".into()
                    );
                }
                Ok(RopeScaling::LongRope { short, mscale, original: original()? })
            }
            "yarn" => {
                let factor = r.factor.ok_or("`rope_scaling` (yarn): missing `factor`")?;
                let (mscale, all) = (r.mscale.unwrap_or(0.0), r.mscale_all_dim.unwrap_or(0.0));
                let attention_factor = r.attention_factor.unwrap_or(if mscale != 0.0 && all != 0.0 {
                    yarn_mscale(factor, mscale) / yarn_mscale(factor, all)
                } else {
                    yarn_mscale(factor, 1.0)
                });
                let y = RopeScaling::Yarn {
                    factor,
                    original: original()?,
                    beta_fast: r.beta_fast.filter(|b| *b != 0.0).unwrap_or(32.0),
                    beta_slow: r.beta_slow.filter(|b| *b != 0.0).unwrap_or(1.0),
                    attention_factor,
                    mscale_all_dim: all,
                };
                if ![factor, attention_factor].iter().all(|v| v.is_finite() && *v > 0.0) {
                    return Err(format!(
                        "`rope_scaling` (yarn): `factor` {factor} and the attention factor must be positive"
                    ));
                }
                Ok(y)
            }
            _ => Err(format!("RoPE type `{kind}` is not supported (only `default`, `longrope` and `yarn`)")),
        }
    }

    /// The frequencies of `dim` rotated dimensions where they are not the default, and the
    /// scale on cos and sin, as transformers computes them (f32 where it does).
    pub(super) fn frequencies(&self, theta: f64, dim: usize) -> Result<(Option<Vec<f32>>, f32), String> {
        let base_pow = |i: usize| (theta as f32).powf((2 * i) as f32 / dim as f32);
        match self {
            RopeScaling::Default => Ok((None, 1.0)),
            RopeScaling::LongRope { short, mscale, .. } => {
                if short.len() != dim / 2 {
                    return Err(format!(
                        "`rope_scaling` (longrope): `short_factor` has {} values, but a head rotates {} frequencies",
                        short.len(),
                        dim / 2
                    ));
                }
                let inv = (0..dim / 2).map(|i| 1.0 / (short[i] as f32 * base_pow(i))).collect();
                Ok((Some(inv), *mscale as f32))
            }
            RopeScaling::Yarn { factor, original, beta_fast, beta_slow, attention_factor, .. } => {
                let correction = |rot: f64| {
                    (dim as f64 * (*original as f64 / (rot * 2.0 * std::f64::consts::PI)).ln())
                        / (2.0 * theta.ln())
                };
                let low = correction(*beta_fast).floor().max(0.0);
                let mut high = correction(*beta_slow).ceil().min(dim as f64 - 1.0);
                if low == high {
                    high += 0.001;
                }
                let inv = (0..dim / 2)
                    .map(|i| {
                        let pos = base_pow(i);
                        let (extra, inter) = (1.0 / pos, 1.0 / (*factor as f32 * pos));
                        let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                        let extra_factor = 1.0 - ramp;
                        inter * (1.0 - extra_factor) + extra * extra_factor
                    })
                    .collect();
                Ok((Some(inv), *attention_factor as f32))
            }
        }
    }

    /// The factor MLA's softmax scale takes under YaRN: `yarn_mscale(factor, mscale_all_dim)^2`.
    pub(super) fn softmax_correction(&self) -> f64 {
        match self {
            RopeScaling::Yarn { factor, mscale_all_dim, .. } if *mscale_all_dim != 0.0 => {
                yarn_mscale(*factor, *mscale_all_dim).powi(2)
            }
            _ => 1.0,
        }
    }
}
