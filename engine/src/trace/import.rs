//! Importers for the public routing traces in `../shared/traces` (see its README): FLAME-MoE
//! CSVs, Mixtral-8x7B CSV and JSONL, Qwen1.5-MoE CSV. Each becomes a [`Trace`]; [`load`] reads
//! any supported file, detecting its format from its first non-comment line.
//!
//! Shared conventions: lines starting with `#` are comments; `meta.layer_ids` lists the decoder
//! layers that appear in the file (for Qwen's partial trace, only those five); tokens keep the
//! order in which their first row appears.

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

/// Reads a trace in any supported format.
pub fn load(path: &Path) -> Result<Trace, TraceError> {
    import(path, detect(path)?)
}

/// Reads `path` as `format`.
pub fn import(path: &Path, format: Format) -> Result<Trace, TraceError> {
    let trace = match format {
        Format::Stevedore => return format::read(path),
        Format::FlameCsv => flame(path)?,
        Format::MixtralCsv => mixtral_csv(path)?,
        Format::MixtralJsonl => mixtral_jsonl(path)?,
        Format::QwenCsv => qwen(path)?,
    };
    validate_meta(&trace.meta).map_err(|msg| TraceError::file(path, msg))?;
    for t in &trace.tokens {
        validate_token(&trace.meta, t)
            .map_err(|msg| TraceError::file(path, format!("token seq {} pos {}: {msg}", t.seq, t.pos)))?;
    }
    Ok(trace)
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

/// Groups rows into tokens (in order of first appearance) and checks that no (token, layer)
/// appears twice.
fn assemble(
    path: &Path,
    model: &str,
    num_experts: usize,
    top_k: usize,
    rows: Vec<Row>,
    token_ids: &HashMap<TokenKey, u32>,
) -> Result<Trace, TraceError> {
    let layer_ids: Vec<u32> = rows.iter().map(|r| r.layer).collect::<BTreeSet<_>>().into_iter().collect();
    let layer_index: HashMap<u32, usize> = layer_ids.iter().enumerate().map(|(i, &l)| (l, i)).collect();
    let mut index: HashMap<TokenKey, usize> = HashMap::new();
    let mut tokens: Vec<TokenRouting> = Vec::new();
    let mut seen: Vec<Vec<bool>> = Vec::new();
    for row in rows {
        let t = *index.entry(row.token).or_insert_with(|| {
            tokens.push(TokenRouting {
                seq: row.token.seq,
                pos: row.token.pos,
                step: None,
                token_id: token_ids.get(&row.token).copied(),
                phase: row.token.phase(),
                layers: vec![None; layer_ids.len()],
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
                    format!("expert {e} out of range: {model} has {num_experts} routed experts"),
                ));
            }
        }
        tokens[t].layers[l] = row.choice;
    }
    if tokens.is_empty() {
        return Err(TraceError::file(path, "no routing records"));
    }
    Ok(Trace { meta: TraceMeta { model: model.into(), num_experts, top_k, layer_ids }, tokens })
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

/// FLAME-MoE-290M (64 routed experts): `[seq,]pos,token_id,layer,e0..e5,w0..w5`, teacher-forced
/// text, so every token is `prefill` and its id is known. Without a `seq` column all rows are
/// sequence 0.
fn flame(path: &Path) -> Result<Trace, TraceError> {
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
    assemble(path, "FLAME-MoE-290M", 64, cols.0.len(), rows, &token_ids)
}

/// Mixtral-8x7B (8 experts): `phase,pos,layer,e0,e1,w0,w1`, one sequence. Prefill `pos` is the
/// prompt position; decode `pos` is the step, stored as position `prompt length + step`.
fn mixtral_csv(path: &Path) -> Result<Trace, TraceError> {
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
    assemble(path, "Mixtral-8x7B", 8, cols.0.len(), rows, &HashMap::new())
}

/// Qwen1.5-MoE-A2.7B (60 routed experts): `phase,pos,slot,layer,e0..e3,w0..w3`, 25 prompts
/// batched. Prefill rows index the concatenation of all prompts (boundaries were not recorded):
/// they become sequence 0 at position `pos`. Decode rows become sequence `slot` at position
/// `pos` (the decode step), and the rows of one decode step one `step`: vLLM ran them as one
/// batch. Slots are batch slots, not request ids: they are re-packed as requests finish, so a
/// slot's later tokens may belong to another request.
fn qwen(path: &Path) -> Result<Trace, TraceError> {
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
    let mut trace = assemble(path, "Qwen1.5-MoE-A2.7B", 60, cols.0.len(), rows, &HashMap::new())?;
    // The decode rows of one step ran as one batch in vLLM: replay them as one step.
    for t in trace.tokens.iter_mut().filter(|t| t.phase == Phase::Decode) {
        t.step = Some(t.pos as u64);
    }
    Ok(trace)
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
fn mixtral_jsonl(path: &Path) -> Result<Trace, TraceError> {
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
    assemble(path, "Mixtral-8x7B", 8, top_k, rows, &HashMap::new())
}
