//! stevedore's trace format: JSON lines. The first line is a header carrying the [`TraceMeta`];
//! each following line is one token, in the order tokens were processed. `docs/traces.md` is
//! the reference; keep the two in step.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{
    validate_meta, validate_token, Foreseen, Horizon, LayerChoice, Phase, TokenRouting, Trace, TraceError,
    TraceMeta,
};

/// Value of the header's `format` field.
pub const FORMAT_NAME: &str = "stevedore-trace";
/// Version this code writes. Bump it on any change an older reader would misread. Version 2
/// added the tokens' optional `step`, version 3 their optional `ahead` and `horizon`; older
/// files (without them) are read too.
pub const FORMAT_VERSION: u32 = 3;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    format: String,
    version: u32,
    model: String,
    num_experts: usize,
    top_k: usize,
    layer_ids: Vec<u32>,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum PhaseName {
    Prefill,
    Decode,
}

/// One token line. `experts[i]` / `weights[i]` belong to MoE layer `i`; `null` where the layer
/// was not recorded; `weights[i]` may be `[]` when the gate weights are unknown.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenLine {
    seq: u64,
    pos: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    step: Option<u64>,
    token_id: Option<u32>,
    phase: PhaseName,
    experts: Vec<Option<Vec<u32>>>,
    weights: Vec<Option<Vec<f32>>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ahead: Vec<AheadEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    horizon: Option<HorizonEntry>,
}

/// A next-gate estimate: made at MoE layer `at` for MoE layer `layer`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AheadEntry {
    /// `null` (or absent) for an estimate made at the token's start, from its embedding.
    #[serde(default)]
    at: Option<usize>,
    layer: usize,
    experts: Vec<u32>,
    probs: Vec<f32>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HorizonEntry {
    layers: usize,
    bytes: u64,
}

impl From<&TraceMeta> for Header {
    fn from(m: &TraceMeta) -> Self {
        Header {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            model: m.model.clone(),
            num_experts: m.num_experts,
            top_k: m.top_k,
            layer_ids: m.layer_ids.clone(),
        }
    }
}

impl From<&TokenRouting> for TokenLine {
    fn from(t: &TokenRouting) -> Self {
        TokenLine {
            seq: t.seq,
            pos: t.pos,
            step: t.step,
            token_id: t.token_id,
            phase: match t.phase {
                Phase::Prefill => PhaseName::Prefill,
                Phase::Decode => PhaseName::Decode,
            },
            experts: t.layers.iter().map(|l| l.as_ref().map(|c| c.experts.clone())).collect(),
            weights: t.layers.iter().map(|l| l.as_ref().map(|c| c.weights.clone())).collect(),
            ahead: (t.ahead.iter())
                .map(|f| AheadEntry {
                    at: f.at,
                    layer: f.layer,
                    experts: f.experts.clone(),
                    probs: f.probs.clone(),
                })
                .collect(),
            horizon: t.horizon.map(|h| HorizonEntry { layers: h.layers, bytes: h.bytes }),
        }
    }
}

impl TokenLine {
    fn into_token(self) -> Result<TokenRouting, String> {
        if self.experts.len() != self.weights.len() {
            return Err(format!(
                "`experts` has {} layers but `weights` has {}",
                self.experts.len(),
                self.weights.len()
            ));
        }
        let layers = (self.experts.into_iter().zip(self.weights).enumerate())
            .map(|(i, pair)| match pair {
                (Some(experts), Some(weights)) => Ok(Some(LayerChoice { experts, weights })),
                (None, None) => Ok(None),
                _ => Err(format!("MoE layer {i}: `experts` and `weights` must both be null or both lists")),
            })
            .collect::<Result<_, _>>()?;
        let phase = match self.phase {
            PhaseName::Prefill => Phase::Prefill,
            PhaseName::Decode => Phase::Decode,
        };
        Ok(TokenRouting {
            seq: self.seq,
            pos: self.pos,
            step: self.step,
            token_id: self.token_id,
            phase,
            layers,
            ahead: (self.ahead.into_iter())
                .map(|a| Foreseen { at: a.at, layer: a.layer, experts: a.experts, probs: a.probs })
                .collect(),
            horizon: self.horizon.map(|h| Horizon { layers: h.layers, bytes: h.bytes }),
        })
    }
}

/// Writes a trace token by token, as the engine produces it. Each token is checked against the
/// header so that a bad trace fails where it is made, not where it is read.
pub struct TraceWriter {
    path: PathBuf,
    meta: TraceMeta,
    out: BufWriter<File>,
    line: usize,
}

impl TraceWriter {
    /// Creates (or truncates) `path` and writes the header.
    pub fn create(path: &Path, meta: &TraceMeta) -> Result<Self, TraceError> {
        validate_meta(meta).map_err(|msg| TraceError::file(path, msg))?;
        let file = File::create(path).map_err(|e| TraceError::io(path, e))?;
        let mut w =
            TraceWriter { path: path.to_owned(), meta: meta.clone(), out: BufWriter::new(file), line: 0 };
        w.write_line(&Header::from(meta))?;
        Ok(w)
    }

    pub fn write_token(&mut self, token: &TokenRouting) -> Result<(), TraceError> {
        validate_token(&self.meta, token).map_err(|msg| TraceError::line(&self.path, self.line + 1, msg))?;
        self.write_line(&TokenLine::from(token))
    }

    /// Flushes the file; errors that a drop would swallow surface here.
    pub fn finish(mut self) -> Result<(), TraceError> {
        self.out.flush().map_err(|e| TraceError::io(&self.path, e))
    }

    fn write_line(&mut self, value: &impl Serialize) -> Result<(), TraceError> {
        let io = |e| TraceError::io(&self.path, e);
        serde_json::to_writer(&mut self.out, value).map_err(|e| io(e.into()))?;
        self.out.write_all(b"\n").map_err(io)?;
        self.line += 1;
        Ok(())
    }
}

/// Writes a whole trace to `path`.
pub fn write(path: &Path, trace: &Trace) -> Result<(), TraceError> {
    let mut w = TraceWriter::create(path, &trace.meta)?;
    for t in &trace.tokens {
        w.write_token(t)?;
    }
    w.finish()
}

/// Reads a trace in stevedore's format. Blank lines and lines starting with `#` are skipped.
pub fn read(path: &Path) -> Result<Trace, TraceError> {
    let file = File::open(path).map_err(|e| TraceError::io(path, e))?;
    let mut meta: Option<TraceMeta> = None;
    let mut tokens = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| TraceError::io(path, e))?;
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let bad = |msg: String| TraceError::line(path, n, msg);
        match &meta {
            None => {
                let h: Header = serde_json::from_str(text)
                    .map_err(|e| bad(format!("not a stevedore trace header: {e}")))?;
                if h.format != FORMAT_NAME {
                    return Err(bad(format!("`format` is `{}`, expected `{FORMAT_NAME}`", h.format)));
                }
                if !(1..=FORMAT_VERSION).contains(&h.version) {
                    return Err(bad(format!(
                        "trace format version {} is not supported (this build reads versions 1 to {FORMAT_VERSION})",
                        h.version
                    )));
                }
                let m = TraceMeta {
                    model: h.model,
                    num_experts: h.num_experts,
                    top_k: h.top_k,
                    layer_ids: h.layer_ids,
                };
                validate_meta(&m).map_err(bad)?;
                meta = Some(m);
            }
            Some(m) => {
                let t: TokenLine =
                    serde_json::from_str(text).map_err(|e| bad(format!("bad token line: {e}")))?;
                let t = t.into_token().map_err(bad)?;
                validate_token(m, &t).map_err(bad)?;
                tokens.push(t);
            }
        }
    }
    let meta = meta.ok_or_else(|| TraceError::file(path, "empty file: no trace header"))?;
    Ok(Trace { meta, tokens })
}
