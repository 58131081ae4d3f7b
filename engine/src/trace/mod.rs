//! Routing traces on disk: stevedore's own JSONL format (see `docs/traces.md`), written live by
//! `stevedore generate --trace FILE` and read by the simulator and predictor training, plus
//! importers for the public traces of other projects (FLAME-MoE, Mixtral, Qwen1.5-MoE).
//!
//! The in-memory types ([`Trace`], [`TokenRouting`], ...) belong to the predictor crate, which is
//! pure; all file handling lives here.

mod format;
mod import;

use std::path::{Path, PathBuf};

pub use format::{read, write, TraceWriter, FORMAT_NAME, FORMAT_VERSION};
pub use import::{detect, import, load, load_with, Declared, ExpertsFrom, Format, Imported};
pub use stevedore_predictor::{Foreseen, Horizon, LayerChoice, Phase, TokenRouting, Trace, TraceMeta};

/// A trace file that cannot be read or written. Messages name the file and, for bad content,
/// the line.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}:{line}: {msg}", path.display())]
    Line { path: PathBuf, line: usize, msg: String },
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
}

impl TraceError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        TraceError::Io { path: path.to_owned(), source }
    }

    pub(crate) fn line(path: &Path, line: usize, msg: impl Into<String>) -> Self {
        TraceError::Line { path: path.to_owned(), line, msg: msg.into() }
    }

    pub(crate) fn file(path: &Path, msg: impl Into<String>) -> Self {
        TraceError::File { path: path.to_owned(), msg: msg.into() }
    }
}

/// What `--model DIR` (its `config.json`) and `--experts N` declare about a trace's model.
pub fn declared(model: Option<&Path>, experts: Option<usize>) -> Result<Declared, String> {
    let Some(dir) = model else {
        return Ok(match experts {
            Some(n) => {
                Declared { num_experts: Some(n), source: format!("--experts {n}"), ..Declared::none() }
            }
            None => Declared::none(),
        });
    };
    let cfg =
        stevedore_models::ModelConfig::from_file(&dir.join("config.json")).map_err(|e| e.to_string())?;
    let source = format!("the model in {}", dir.display());
    if let Some(n) = experts.filter(|&n| n != cfg.num_experts) {
        return Err(format!(
            "--experts {n} contradicts {source}, which has {} routed experts",
            cfg.num_experts
        ));
    }
    let layers = stevedore_models::LayerMap::new(&cfg);
    Ok(Declared {
        num_experts: Some(cfg.num_experts),
        top_k: Some(cfg.num_experts_per_tok),
        moe_layers: Some(layers.moe_layers().iter().map(|l| l.0 as u32).collect()),
        source,
    })
}

/// Checks a header: at least one MoE layer, distinct layer ids, `1 <= top_k <= num_experts`.
pub fn validate_meta(meta: &TraceMeta) -> Result<(), String> {
    // Bounds that real models sit far inside, so that a damaged header cannot make a reader
    // allocate without limit.
    const MAX_EXPERTS: usize = 1 << 16;
    const MAX_LAYERS: usize = 4096;
    if meta.num_experts > MAX_EXPERTS {
        return Err(format!("`num_experts` ({}) is above the supported {MAX_EXPERTS}", meta.num_experts));
    }
    if meta.layer_ids.len() > MAX_LAYERS {
        return Err(format!(
            "`layer_ids` lists {} layers, above the supported {MAX_LAYERS}",
            meta.layer_ids.len()
        ));
    }
    if meta.layer_ids.is_empty() {
        return Err("`layer_ids` is empty: a trace needs at least one MoE layer".into());
    }
    let mut ids = meta.layer_ids.clone();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("`layer_ids` lists layer {} twice", w[0]));
    }
    if meta.num_experts == 0 || meta.top_k == 0 || meta.top_k > meta.num_experts {
        return Err(format!(
            "`top_k` ({}) must be between 1 and `num_experts` ({})",
            meta.top_k, meta.num_experts
        ));
    }
    Ok(())
}

/// Checks one token against its trace's header: one entry per MoE layer; per recorded layer,
/// distinct expert ids below `num_experts`, and weights (when present) parallel and finite.
pub fn validate_token(meta: &TraceMeta, token: &TokenRouting) -> Result<(), String> {
    if token.layers.len() != meta.layer_ids.len() {
        return Err(format!(
            "token has {} layers but the trace has {} MoE layers",
            token.layers.len(),
            meta.layer_ids.len()
        ));
    }
    for (i, choice) in token.layers.iter().enumerate() {
        let Some(c) = choice else { continue };
        let at = || format!("MoE layer {i} (decoder layer {})", meta.layer_ids[i]);
        if c.experts.is_empty() || c.experts.len() > meta.num_experts {
            return Err(format!(
                "{}: {} experts chosen; expected 1..={}",
                at(),
                c.experts.len(),
                meta.num_experts
            ));
        }
        if let Some(&e) = c.experts.iter().find(|&&e| e as usize >= meta.num_experts) {
            return Err(format!("{}: expert {e} out of range (the model has {})", at(), meta.num_experts));
        }
        for (j, e) in c.experts.iter().enumerate() {
            if c.experts[..j].contains(e) {
                return Err(format!("{}: expert {e} chosen twice", at()));
            }
        }
        if !c.weights.is_empty() && c.weights.len() != c.experts.len() {
            return Err(format!("{}: {} weights for {} experts", at(), c.weights.len(), c.experts.len()));
        }
        if let Some(w) = c.weights.iter().find(|w| !w.is_finite()) {
            return Err(format!("{}: weight {w} is not finite", at()));
        }
    }
    let layers = meta.layer_ids.len();
    for (i, f) in token.ahead.iter().enumerate() {
        let at = || format!("`ahead` entry {i}");
        if f.at.is_some_and(|a| a >= f.layer) || f.layer >= layers {
            let made = f.at.map_or("the token's start".to_owned(), |a| format!("MoE layer {a}"));
            return Err(format!(
                "{}: an estimate made at {made} for MoE layer {} (the trace has {layers}; the layer \
                 estimated must come after the one it is made at)",
                at(),
                f.layer
            ));
        }
        if f.experts.len() != f.probs.len() || f.experts.is_empty() {
            return Err(format!("{}: {} experts but {} probs", at(), f.experts.len(), f.probs.len()));
        }
        if let Some(&e) = f.experts.iter().find(|&&e| e as usize >= meta.num_experts) {
            return Err(format!("{}: expert {e} out of range (the model has {})", at(), meta.num_experts));
        }
        if let Some(p) = f.probs.iter().find(|p| !(p.is_finite() && (0.0..=1.0).contains(*p))) {
            return Err(format!("{}: probability {p} is not between 0 and 1", at()));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
