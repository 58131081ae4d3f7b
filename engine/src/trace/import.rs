//! Importers for the public routing traces in `../shared/traces` (see its README): FLAME-MoE
//! CSVs, Mixtral-8x7B CSV and JSONL, Qwen1.5-MoE CSV. Each becomes a [`Trace`]; [`load`] reads
//! any supported file, detecting its format from its first non-comment line.
//!
//! Shared conventions: lines starting with `#` are comments; `meta.layer_ids` lists the decoder
//! layers that appear in the file (for Qwen's partial trace, only those five); tokens keep the
//! order in which their first row appears.
//!
//! No file format implies a model: the number of routed experts comes from what the user
//! declares (`--model DIR`, `--experts N`: [`Declared`]), else from the file's header comment
//! (`num_experts: 64`, or prose such as "64 routed experts"), else it is inferred from the data
//! (the largest id + 1), and [`Imported::experts_from`] says which. An id at or beyond the
//! count is an error naming its line; a count declared one way and written another is an
//! error. The top-k is the number of `e0, e1, ...` columns (the longest record in JSONL), and
//! the MoE layers are those the file routes. The model's name is the header comment's first
//! phrase, else the file's name.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use super::{
    format, validate_meta, validate_token, LayerChoice, Phase, TokenRouting, Trace, TraceError, TraceMeta,
};

/// The file formats [`load`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// stevedore's own JSONL (`docs/traces.md`).
    Stevedore,
    /// FLAME-MoE-290M: `[seq,]pos,token_id,layer,e0..e5,w0..w5`.
    FlameCsv,
    /// Mixtral-8x7B: `phase,pos,layer,e0,e1,w0,w1`.
    MixtralCsv,
    /// Mixtral-8x7B: one JSON object per (token, layer) with `experts` and `gating_probs`.
    MixtralJsonl,
    /// Qwen1.5-MoE-A2.7B: `phase,pos,slot,layer,e0..e3,w0..w3`.
    QwenCsv,
}

/// What the user says of the model behind a trace (`--model DIR`, `--experts N`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Declared {
    pub num_experts: Option<usize>,
    /// The router's top-k, when a checkpoint says it.
    pub top_k: Option<usize>,
    /// The decoder layers that are MoE layers, when a checkpoint says so.
    pub moe_layers: Option<Vec<u32>>,
    /// Where it was said, for messages: `--model tests/fixtures/mixtral`, `--experts 8`.
    pub source: String,
}

impl Declared {
    /// Nothing declared.
    pub fn none() -> Self {
        Self::default()
    }
}

/// Where an imported trace's number of experts came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpertsFrom {
    /// What the user declared (its source).
    Declared(String),
    /// The file's own header (a stevedore trace's, or a CSV's comment).
    Header,
    /// The largest expert id in the data, plus one.
    Inferred,
}

impl std::fmt::Display for ExpertsFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpertsFrom::Declared(source) => write!(f, "from {source}"),
            ExpertsFrom::Header => f.write_str("from the file's header"),
            ExpertsFrom::Inferred => f.write_str("inferred from the largest expert id in the file"),
        }
    }
}

/// A trace read from a file, and how its shape was decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Imported {
    pub trace: Trace,
    pub experts_from: ExpertsFrom,
}

impl Imported {
    /// One line for the user: the file, its shape, and where the expert count came from.
    pub fn describe(&self, path: &Path) -> String {
        let m = &self.trace.meta;
        format!(
            "{}: {} ({} tokens, {} MoE layers, {} experts {}, top-{})",
            path.display(),
            m.model,
            self.trace.tokens.len(),
            m.layer_ids.len(),
            m.num_experts,
            self.experts_from,
            m.top_k
        )
    }
}

/// Reads a trace in any supported format, with nothing declared about its model.
pub fn load(path: &Path) -> Result<Trace, TraceError> {
    Ok(load_with(path, &Declared::none())?.trace)
}

/// Reads a trace in any supported format against what `declared` says of its model.
pub fn load_with(path: &Path, declared: &Declared) -> Result<Imported, TraceError> {
    import(path, detect(path)?, declared)
}

/// Reads `path` as `format` against what `declared` says of its model.
pub fn import(path: &Path, format: Format, declared: &Declared) -> Result<Imported, TraceError> {
    let header = Header::read(path)?;
    let parsed = match format {
        Format::Stevedore => {
            let trace = format::read(path)?;
            check_declared(path, &trace.meta, declared)?;
            return Ok(Imported { trace, experts_from: ExpertsFrom::Header });
        }
        Format::FlameCsv => flame(path)?,
        Format::MixtralCsv => mixtral_csv(path)?,
        Format::MixtralJsonl => mixtral_jsonl(path)?,
        Format::QwenCsv => qwen(path)?,
    };
    let imported = parsed.assemble(path, &header, declared)?;
    let trace = &imported.trace;
    validate_meta(&trace.meta).map_err(|msg| TraceError::file(path, msg))?;
    for t in &trace.tokens {
        validate_token(&trace.meta, t)
            .map_err(|msg| TraceError::file(path, format!("token seq {} pos {}: {msg}", t.seq, t.pos)))?;
    }
    Ok(imported)
}

/// A stevedore trace's header against what the user declared.
fn check_declared(path: &Path, meta: &TraceMeta, declared: &Declared) -> Result<(), TraceError> {
    let src = &declared.source;
    if let Some(n) = declared.num_experts.filter(|&n| n != meta.num_experts) {
        return Err(TraceError::file(
            path,
            format!("the trace's header says {} routed experts, but {src} has {n}", meta.num_experts),
        ));
    }
    if let Some(k) = declared.top_k.filter(|&k| k != meta.top_k) {
        return Err(TraceError::file(
            path,
            format!("the trace's header says top-{}, but {src} routes top-{k}", meta.top_k),
        ));
    }
    if let Some(moe) = &declared.moe_layers {
        if let Some(l) = meta.layer_ids.iter().find(|l| !moe.contains(l)) {
            return Err(TraceError::file(
                path,
                format!("the trace routes decoder layer {l}, which is not an MoE layer of {src}"),
            ));
        }
    }
    Ok(())
}

/// What a file's leading comment lines say: the model's name (the first comment's first
/// phrase) and the number of routed experts, when written.
#[derive(Debug, Default)]
struct Header {
    model: Option<String>,
    num_experts: Option<(usize, usize)>,
}

impl Header {
    fn read(path: &Path) -> Result<Self, TraceError> {
        let file = File::open(path).map_err(|e| TraceError::io(path, e))?;
        let mut h = Header::default();
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| TraceError::io(path, e))?;
            let t = line.trim();
            if t.is_empty() {
                continue;
            }
            let Some(text) = t.strip_prefix('#') else { break };
            if h.model.is_none() {
                let name = text.split([';', '(', ',']).next().unwrap_or("").trim();
                h.model = (!name.is_empty()).then(|| name.to_owned());
            }
            if let Some(n) = experts_in(text) {
                match h.num_experts {
                    Some((m, at)) if m != n => {
                        return Err(TraceError::line(
                            path,
                            i + 1,
                            format!("the header says {n} routed experts here but {m} on line {at}"),
                        ))
                    }
                    _ => h.num_experts = Some((n, i + 1)),
                }
            }
        }
        Ok(h)
    }
}

/// The number of routed experts a comment states: `num_experts: 64`, `num_experts=64`, or prose
/// such as "64 routed experts" or "8 experts".
fn experts_in(text: &str) -> Option<usize> {
    let words: Vec<&str> =
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| !w.is_empty()).collect();
    for (i, w) in words.iter().enumerate() {
        let next = |j: usize| words.get(i + j).copied().unwrap_or("");
        if w.eq_ignore_ascii_case("num_experts") {
            if let Ok(n) = next(1).parse() {
                return Some(n);
            }
        }
        if let Ok(n) = w.parse::<usize>() {
            let noun = if next(1).eq_ignore_ascii_case("routed") { next(2) } else { next(1) };
            if noun.eq_ignore_ascii_case("experts") {
                return Some(n);
            }
        }
    }
    None
}

/// Tells the format of `path` from its first line that is neither blank nor a `#` comment.
pub fn detect(path: &Path) -> Result<Format, TraceError> {
    let file = File::open(path).map_err(|e| TraceError::io(path, e))?;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| TraceError::io(path, e))?;
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if t.starts_with('{') {
            if t.contains(&format!("\"{}\"", format::FORMAT_NAME)) {
                return Ok(Format::Stevedore);
            }
            if t.contains("\"gating_probs\"") {
                return Ok(Format::MixtralJsonl);
            }
        } else if t.starts_with("phase,pos,slot,layer,") {
            return Ok(Format::QwenCsv);
        } else if t.starts_with("phase,pos,layer,") {
            return Ok(Format::MixtralCsv);
        } else if t.starts_with("seq,pos,token_id,layer,") || t.starts_with("pos,token_id,layer,") {
            return Ok(Format::FlameCsv);
        }
        let start: String = t.chars().take(60).collect();
        return Err(TraceError::line(
            path,
            i + 1,
            format!(
                "unrecognised trace format (starts `{start}`); expected a stevedore trace or a \
                 FLAME, Mixtral or Qwen1.5 trace as described in docs/traces.md"
            ),
        ));
    }
    Err(TraceError::file(path, "empty file: no trace header"))
}

/// One routing record: which token, which decoder layer, what the router chose.
struct Row {
    line: usize,
    token: TokenKey,
    layer: u32,
    /// `None` for a record the collector dropped (experts written as `-1`).
    choice: Option<LayerChoice>,
}

/// Identifies a token within a file; `seq`/`pos` are the values the token will carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct TokenKey {
    decode: bool,
    seq: u64,
    pos: u32,
}

impl TokenKey {
    fn new(phase: Phase, seq: u64, pos: u32) -> Self {
        TokenKey { decode: phase == Phase::Decode, seq, pos }
    }

    fn phase(self) -> Phase {
        if self.decode {
            Phase::Decode
        } else {
            Phase::Prefill
        }
    }
}

/// A file's records before its shape is decided.
struct Parsed {
    top_k: usize,
    rows: Vec<Row>,
    token_ids: HashMap<TokenKey, u32>,
    /// The rows of one decode step ran as one batch (Qwen's vLLM trace).
    decode_steps: bool,
}

impl Parsed {
    /// Decides the number of experts (declared, else the header's, else inferred), checks
    /// every record against it and the declared model, and groups rows into tokens (in order
    /// of first appearance), checking that no (token, layer) appears twice.
    fn assemble(self, path: &Path, header: &Header, declared: &Declared) -> Result<Imported, TraceError> {
        let Parsed { top_k, rows, token_ids, decode_steps } = self;
        let src = &declared.source;
        let largest =
            rows.iter().filter_map(|r| r.choice.as_ref()).flat_map(|c| c.experts.iter().copied()).max();
        let (num_experts, experts_from) = match (declared.num_experts, header.num_experts) {
            (Some(n), Some((m, line))) if n != m => {
                return Err(TraceError::line(
                    path,
                    line,
                    format!("the header says {m} routed experts, but {src} has {n}"),
                ))
            }
            (Some(n), _) => (n, ExpertsFrom::Declared(src.clone())),
            (None, Some((m, _))) => (m, ExpertsFrom::Header),
            (None, None) => (largest.map_or(1, |e| e as usize + 1), ExpertsFrom::Inferred),
        };
        if let Some(k) = declared.top_k.filter(|&k| k != top_k) {
            return Err(TraceError::file(
                path,
                format!("the trace records {top_k} experts per token and layer, but {src} routes top-{k}"),
            ));
        }
        let counted = || format!("the model has {num_experts} routed experts ({experts_from})");
        let layer_ids: Vec<u32> = rows.iter().map(|r| r.layer).collect::<BTreeSet<_>>().into_iter().collect();
        let layer_index: HashMap<u32, usize> = layer_ids.iter().enumerate().map(|(i, &l)| (l, i)).collect();
        let mut index: HashMap<TokenKey, usize> = HashMap::new();
        let mut tokens: Vec<TokenRouting> = Vec::new();
        let mut seen: Vec<Vec<bool>> = Vec::new();
        for row in rows {
            if let Some(moe) = &declared.moe_layers {
                if !moe.contains(&row.layer) {
                    return Err(TraceError::line(
                        path,
                        row.line,
                        format!("layer {} is not an MoE layer of {src}", row.layer),
                    ));
                }
            }
            let t = *index.entry(row.token).or_insert_with(|| {
                tokens.push(TokenRouting {
                    seq: row.token.seq,
                    pos: row.token.pos,
                    step: None,
                    token_id: token_ids.get(&row.token).copied(),
                    phase: row.token.phase(),
                    layers: vec![None; layer_ids.len()],
                    ahead: Vec::new(),
                    horizon: None,
                });
                seen.push(vec![false; layer_ids.len()]);
                tokens.len() - 1
            });
            let l = layer_index[&row.layer];
            if std::mem::replace(&mut seen[t][l], true) {
                return Err(TraceError::line(
                    path,
                    row.line,
                    format!("second record for layer {} of this token", row.layer),
                ));
            }
            if let Some(c) = &row.choice {
                if let Some(&e) = c.experts.iter().find(|&&e| e as usize >= num_experts) {
                    return Err(TraceError::line(
                        path,
                        row.line,
                        format!("expert {e} out of range: {}", counted()),
                    ));
                }
            }
            tokens[t].layers[l] = row.choice;
        }
        if tokens.is_empty() {
            return Err(TraceError::file(path, "no routing records"));
        }
        if decode_steps {
            for t in tokens.iter_mut().filter(|t| t.phase == Phase::Decode) {
                t.step = Some(t.pos as u64);
            }
        }
        let model = header.model.clone().unwrap_or_else(|| {
            path.file_stem().map_or_else(|| "unknown".into(), |s| s.to_string_lossy().into_owned())
        });
        let meta = TraceMeta { model, num_experts, top_k, layer_ids };
        Ok(Imported { trace: Trace { meta, tokens }, experts_from })
    }
}

/// A comma-separated file with a header row naming its columns.
struct Csv {
    columns: Vec<String>,
    /// `(line number, fields)` of every data row.
    rows: Vec<(usize, Vec<String>)>,
}

impl Csv {
    fn read(path: &Path) -> Result<Self, TraceError> {
        let file = File::open(path).map_err(|e| TraceError::io(path, e))?;
        let mut columns: Option<Vec<String>> = None;
        let mut rows = Vec::new();
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| TraceError::io(path, e))?;
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let fields: Vec<String> = t.split(',').map(|f| f.trim().to_owned()).collect();
            match &columns {
                None => columns = Some(fields),
                Some(c) if fields.len() != c.len() => {
                    return Err(TraceError::line(
                        path,
                        i + 1,
                        format!("{} fields, but the header has {} columns", fields.len(), c.len()),
                    ))
                }
                Some(_) => rows.push((i + 1, fields)),
            }
        }
        let columns = columns.ok_or_else(|| TraceError::file(path, "empty file: no CSV header"))?;
        Ok(Csv { columns, rows })
    }

    fn column(&self, path: &Path, name: &str) -> Result<usize, TraceError> {
        self.columns.iter().position(|c| c == name).ok_or_else(|| {
            TraceError::file(
                path,
                format!("CSV header has no `{name}` column (columns: {})", self.columns.join(",")),
            )
        })
    }

    /// Indices of the `e0, e1, ...` and `w0, w1, ...` columns; their count is the trace's top-k.
    fn choice_columns(&self, path: &Path) -> Result<(Vec<usize>, Vec<usize>), TraceError> {
        let mut experts = Vec::new();
        let mut weights = Vec::new();
        while let Some(c) = self.columns.iter().position(|c| *c == format!("e{}", experts.len())) {
            experts.push(c);
        }
        for i in 0..experts.len() {
            weights.push(self.column(path, &format!("w{i}"))?);
        }
        if experts.is_empty() {
            return Err(TraceError::file(path, "CSV header has no expert columns `e0, e1, ...`"));
        }
        Ok((experts, weights))
    }
}

fn parse<T: std::str::FromStr>(path: &Path, line: usize, column: &str, value: &str) -> Result<T, TraceError> {
    value.parse().map_err(|_| {
        TraceError::line(path, line, format!("column `{column}`: `{value}` is not a valid number"))
    })
}

/// Reads the chosen experts and weights of one row; `-1` experts mark a dropped record.
fn choice(
    path: &Path,
    line: usize,
    fields: &[String],
    (ecols, wcols): &(Vec<usize>, Vec<usize>),
) -> Result<Option<LayerChoice>, TraceError> {
    let mut experts = Vec::with_capacity(ecols.len());
    let mut dropped = false;
    for (i, &c) in ecols.iter().enumerate() {
        let e: i64 = parse(path, line, &format!("e{i}"), &fields[c])?;
        match e {
            -1 => dropped = true,
            0..=0xffff_ffff => experts.push(e as u32),
            _ => return Err(TraceError::line(path, line, format!("column `e{i}`: expert {e} is negative"))),
        }
    }
    if dropped {
        return Ok(None);
    }
    let weights = (wcols.iter().enumerate())
        .map(|(i, &c)| parse(path, line, &format!("w{i}"), &fields[c]))
        .collect::<Result<_, _>>()?;
    Ok(Some(LayerChoice { experts, weights }))
}

fn phase(path: &Path, line: usize, value: &str) -> Result<Phase, TraceError> {
    match value {
        "prefill" => Ok(Phase::Prefill),
        "decode" => Ok(Phase::Decode),
        v => Err(TraceError::line(
            path,
            line,
            format!("column `phase`: `{v}` is neither `prefill` nor `decode`"),
        )),
    }
}

/// FLAME-MoE-290M's columns (any per-token CSV of this shape): `[seq,]pos,token_id,layer,e0..,w0..`, teacher-forced
/// text, so every token is `prefill` and its id is known. Without a `seq` column all rows are
/// sequence 0.
fn flame(path: &Path) -> Result<Parsed, TraceError> {
    let csv = Csv::read(path)?;
    let seq_col = csv.columns.iter().position(|c| c == "seq");
    let (pos_col, tok_col, layer_col) =
        (csv.column(path, "pos")?, csv.column(path, "token_id")?, csv.column(path, "layer")?);
    let cols = csv.choice_columns(path)?;
    let mut rows = Vec::with_capacity(csv.rows.len());
    let mut token_ids = HashMap::new();
    for (line, f) in &csv.rows {
        let seq = match seq_col {
            Some(c) => parse(path, *line, "seq", &f[c])?,
            None => 0,
        };
        let token = TokenKey::new(Phase::Prefill, seq, parse(path, *line, "pos", &f[pos_col])?);
        let id: u32 = parse(path, *line, "token_id", &f[tok_col])?;
        if *token_ids.entry(token).or_insert(id) != id {
            return Err(TraceError::line(
                path,
                *line,
                format!("token_id {id} differs from this token's other rows"),
            ));
        }
        let layer = parse(path, *line, "layer", &f[layer_col])?;
        rows.push(Row { line: *line, token, layer, choice: choice(path, *line, f, &cols)? });
    }
    Ok(Parsed { top_k: cols.0.len(), rows, token_ids, decode_steps: false })
}

/// Mixtral-8x7B's CSV columns: `phase,pos,layer,e0,e1,..,w0,w1,..`, one sequence. Prefill `pos` is the
/// prompt position; decode `pos` is the step, stored as position `prompt length + step`.
fn mixtral_csv(path: &Path) -> Result<Parsed, TraceError> {
    let csv = Csv::read(path)?;
    let (phase_col, pos_col, layer_col) =
        (csv.column(path, "phase")?, csv.column(path, "pos")?, csv.column(path, "layer")?);
    let cols = csv.choice_columns(path)?;
    let mut parsed = Vec::with_capacity(csv.rows.len());
    let mut prompt_len = 0u32;
    for (line, f) in &csv.rows {
        let ph = phase(path, *line, &f[phase_col])?;
        let pos: u32 = parse(path, *line, "pos", &f[pos_col])?;
        // Decode positions follow the prompt, so both must leave room for the sum.
        if pos >= u32::MAX / 2 {
            return Err(TraceError::line(path, *line, format!("`pos` {pos} is too large")));
        }
        if ph == Phase::Prefill {
            prompt_len = prompt_len.max(pos + 1);
        }
        parsed.push((
            *line,
            ph,
            pos,
            parse(path, *line, "layer", &f[layer_col])?,
            choice(path, *line, f, &cols)?,
        ));
    }
    let rows = (parsed.into_iter())
        .map(|(line, phase, pos, layer, choice)| {
            let pos = if phase == Phase::Decode { prompt_len + pos } else { pos };
            Row { line, token: TokenKey::new(phase, 0, pos), layer, choice }
        })
        .collect();
    Ok(Parsed { top_k: cols.0.len(), rows, token_ids: HashMap::new(), decode_steps: false })
}

/// Qwen1.5-MoE-A2.7B's CSV columns: `phase,pos,slot,layer,e0..,w0..`, 25 prompts
/// batched. Prefill rows index the concatenation of all prompts (boundaries were not recorded):
/// they become sequence 0 at position `pos`. Decode rows become sequence `slot` at position
/// `pos` (the decode step), and the rows of one decode step one `step`: vLLM ran them as one
/// batch. Slots are batch slots, not request ids: they are re-packed as requests finish, so a
/// slot's later tokens may belong to another request.
fn qwen(path: &Path) -> Result<Parsed, TraceError> {
    let csv = Csv::read(path)?;
    let (phase_col, pos_col, slot_col, layer_col) = (
        csv.column(path, "phase")?,
        csv.column(path, "pos")?,
        csv.column(path, "slot")?,
        csv.column(path, "layer")?,
    );
    let cols = csv.choice_columns(path)?;
    let mut rows = Vec::with_capacity(csv.rows.len());
    for (line, f) in &csv.rows {
        let ph = phase(path, *line, &f[phase_col])?;
        let pos = parse(path, *line, "pos", &f[pos_col])?;
        let slot: i64 = parse(path, *line, "slot", &f[slot_col])?;
        let seq = match (ph, u32::try_from(slot)) {
            (Phase::Prefill, _) => 0,
            (Phase::Decode, Ok(s)) => s,
            (Phase::Decode, Err(_)) => {
                return Err(TraceError::line(
                    path,
                    *line,
                    format!("column `slot`: decode row with slot {slot}"),
                ))
            }
        };
        let layer = parse(path, *line, "layer", &f[layer_col])?;
        rows.push(Row {
            line: *line,
            token: TokenKey::new(ph, seq as u64, pos),
            layer,
            choice: choice(path, *line, f, &cols)?,
        });
    }
    // The decode rows of one step ran as one batch in vLLM: replay them as one step.
    Ok(Parsed { top_k: cols.0.len(), rows, token_ids: HashMap::new(), decode_steps: true })
}

#[derive(serde::Deserialize)]
struct JsonRecord {
    problem_id: u32,
    layer: u32,
    experts: Vec<i64>,
    gating_probs: Vec<f32>,
}

/// Mixtral-8x7B JSONL: one object per (token, layer) with `problem_id`, `layer`, `experts`,
/// `gating_probs` (other fields ignored). Each problem is one prefill sequence. The collector
/// dropped some records and numbered each layer's records on its own, so a layer's stream is
/// exact but alignment across layers is not: token `i` of a layer is that layer's `i`-th
/// record, and layers with fewer records than the longest lack their last tokens.
fn mixtral_jsonl(path: &Path) -> Result<Parsed, TraceError> {
    let file = File::open(path).map_err(|e| TraceError::io(path, e))?;
    // Records so far per (problem, layer): the next record's token index.
    let mut counts: HashMap<(u32, u32), u32> = HashMap::new();
    let mut rows = Vec::new();
    let mut top_k = 0;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| TraceError::io(path, e))?;
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let r: JsonRecord =
            serde_json::from_str(t).map_err(|e| TraceError::line(path, n, format!("bad record: {e}")))?;
        if r.experts.len() != r.gating_probs.len() || r.experts.is_empty() {
            return Err(TraceError::line(
                path,
                n,
                format!("{} experts but {} gating_probs", r.experts.len(), r.gating_probs.len()),
            ));
        }
        let experts = (r.experts.iter())
            .map(|&e| {
                u32::try_from(e).map_err(|_| TraceError::line(path, n, format!("expert {e} is negative")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        top_k = top_k.max(experts.len());
        let count = counts.entry((r.problem_id, r.layer)).or_insert(0);
        let token = TokenKey::new(Phase::Prefill, r.problem_id as u64, *count);
        *count += 1;
        rows.push(Row {
            line: n,
            token,
            layer: r.layer,
            choice: Some(LayerChoice { experts, weights: r.gating_probs }),
        });
    }
    // Group so that each problem's tokens are in position order, problems in order of first
    // appearance (records come layer by layer, so first appearance alone would not do that).
    let mut problems: Vec<u64> = Vec::new();
    for r in &rows {
        if !problems.contains(&r.token.seq) {
            problems.push(r.token.seq);
        }
    }
    rows.sort_by_key(|r| (problems.iter().position(|&p| p == r.token.seq), r.token.pos, r.layer));
    Ok(Parsed { top_k, rows, token_ids: HashMap::new(), decode_steps: false })
}
