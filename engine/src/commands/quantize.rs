//! `stevedore quantize`: writes low-bit copies of every routed expert beside the checkpoint
//! (see [`stevedore_models::quantized`] for the files and what loading checks).
//!
//! The data file is written under a temporary name, synced, and renamed into place; the index
//! follows the same way, last. A run killed at any moment leaves either the previous copies
//! (their index and file intact: the new file's layout is the same for the same model and
//! format, and a different one fails the index's checks) or the new ones, plus at most a
//! `.tmp` file that nothing reads.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use stevedore_kernels::DType;
use stevedore_models::quantized::{dense_matrices, Copies, LowBitIndex, LowBitTensor, EXPERT_ALIGN};
use stevedore_models::{Model, LOW_BIT_FORMATS};

use super::CliError;
use crate::size::human;

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Model directory (config.json, safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Formats to write, comma-separated: `q8_0` (8.5 bits per weight), `q4_0` (4.5).
    #[arg(long, value_delimiter = ',', required = true, value_parser = parse_format)]
    pub format: Vec<DType>,
    /// Also write copies of the dense matrices (attention, dense and shared MLPs, embeddings,
    /// LM head; not the routers): a fully quantized model, like a llama.cpp Q8_0/Q4_0 GGUF,
    /// used with `precision.dense`.
    #[arg(long)]
    pub all: bool,
    /// Replace copies that exist already.
    #[arg(long)]
    pub force: bool,
}

fn parse_format(s: &str) -> Result<DType, String> {
    match DType::parse(s) {
        Some(f) if LOW_BIT_FORMATS.contains(&f) => Ok(f),
        _ => Err(format!("`{s}` is not a low-bit format: q8_0 or q4_0")),
    }
}

pub fn run(args: &QuantizeArgs) -> Result<(), CliError> {
    let model = super::load_model(&args.model)?;
    let mut sets = vec![Copies::Experts];
    if args.all {
        sets.push(Copies::Dense);
    }
    let dir = &args.model;
    // Refuse before writing anything.
    if !args.force {
        for (&format, &copies) in args.format.iter().flat_map(|f| sets.iter().map(move |c| (f, c))) {
            let paths = [copies.index_path(dir, format), dir.join(copies.data_file_name(format))];
            if let Some(existing) = paths.iter().find(|p| p.exists()) {
                return Err(format!("{} exists; give --force to replace it", existing.display()).into());
            }
        }
    }
    for &format in &args.format {
        for &copies in &sets {
            let groups = match copies {
                Copies::Experts => plan_experts(&model, format)?,
                Copies::Dense => plan_dense(&model, format)?,
            };
            let t = std::time::Instant::now();
            let written = write_copies(&model, format, dir, copies, groups)?;
            eprintln!(
                "{} {}: {} tensors, {} in {:.1}s ({})",
                format.name().to_ascii_lowercase(),
                copies.data_file_name(format).split('.').next().unwrap_or_default(),
                written.tensors,
                human(written.bytes),
                t.elapsed().as_secs_f64(),
                dir.join(copies.data_file_name(format)).display()
            );
        }
    }
    Ok(())
}

/// One tensor to write: its name, shape, and bytes in the new format.
struct Planned {
    name: String,
    rows: usize,
    cols: usize,
    /// Offset in the data section, and length.
    at: u64,
    len: u64,
}

struct Written {
    tensors: usize,
    bytes: u64,
}

/// The bytes of a `[rows, cols]` matrix in `format`, or an error naming the tensor when its
/// rows are not whole blocks.
fn matrix_bytes(model: &Model, name: &str, [rows, cols]: [usize; 2], format: DType) -> Result<u64, CliError> {
    let row = format.bytes(cols).ok_or_else(|| {
        format!(
            "{}: tensor `{name}` has rows of {cols} values, not whole {} blocks of {}",
            model.index.dir.display(),
            format.name(),
            format.block()
        )
    })?;
    Ok((row * rows) as u64)
}

/// Places `groups` (each a list of names and shapes) one after another, each group starting on
/// an [`EXPERT_ALIGN`] boundary of the data section; returns the groups and the section's end.
fn place(model: &Model, format: DType, groups: Vec<Vec<(String, [usize; 2])>>) -> Result<Plan, CliError> {
    let mut at = 0u64;
    let mut placed = Vec::with_capacity(groups.len());
    for group in groups {
        at = at.next_multiple_of(EXPERT_ALIGN);
        let mut tensors = Vec::with_capacity(group.len());
        for (name, shape) in group {
            let len = matrix_bytes(model, &name, shape, format)?;
            tensors.push(Planned { name, rows: shape[0], cols: shape[1], at, len });
            at += len;
        }
        placed.push(tensors);
    }
    Ok((placed, at))
}

/// Groups of tensors placed, and the data section's length.
type Plan = (Vec<Vec<Planned>>, u64);

/// Every routed expert's three tensors together (one read fetches an expert), in layer order.
fn plan_experts(model: &Model, format: DType) -> Result<Plan, CliError> {
    let cfg = &model.config;
    let shapes = stevedore_models::names::expert_tensor_shapes(cfg);
    let mut groups = Vec::new();
    for &layer in model.layers.moe_layers() {
        for e in 0..cfg.num_experts {
            let names = stevedore_models::names::expert_tensor_names(cfg.arch, layer.0, e);
            groups.push(names.into_iter().zip(shapes).collect());
        }
    }
    place(model, format, groups)
}

/// Every dense matrix, each on its own.
fn plan_dense(model: &Model, format: DType) -> Result<Plan, CliError> {
    place(model, format, dense_matrices(model).into_iter().map(|m| vec![m]).collect())
}

/// The safetensors header for `experts` (data section of `end` bytes): each tensor as `U8`
/// `[rows, row bytes]`, gaps as padding tensors, the whole header padded with spaces so that
/// the data section starts on an [`EXPERT_ALIGN`] boundary of the file.
fn header(groups: &[Vec<Planned>], end: u64, format: DType) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    let meta =
        serde_json::json!({"format": format.name().to_ascii_lowercase(), "written_by": "stevedore quantize"});
    map.insert("__metadata__".into(), meta);
    let mut cursor = 0u64;
    let mut pads = 0;
    let mut pad_to = |map: &mut serde_json::Map<String, serde_json::Value>, to: u64, cursor: &mut u64| {
        if to > *cursor {
            let v =
                serde_json::json!({"dtype": "U8", "shape": [to - *cursor], "data_offsets": [*cursor, to]});
            map.insert(format!("__pad.{pads}"), v);
            pads += 1;
            *cursor = to;
        }
    };
    for t in groups.iter().flatten() {
        pad_to(&mut map, t.at, &mut cursor);
        let row = t.len / t.rows as u64;
        let v =
            serde_json::json!({"dtype": "U8", "shape": [t.rows, row], "data_offsets": [t.at, t.at + t.len]});
        map.insert(t.name.clone(), v);
        cursor = t.at + t.len;
    }
    pad_to(&mut map, end, &mut cursor);
    let mut text = serde_json::to_vec(&map).expect("a JSON map serialises");
    let total = (8 + text.len() as u64).next_multiple_of(EXPERT_ALIGN);
    text.resize((total - 8) as usize, b' ');
    text
}

fn write_copies(
    model: &Model,
    format: DType,
    dir: &Path,
    copies: Copies,
    plan: Plan,
) -> Result<Written, CliError> {
    let (groups, end) = plan;
    let head = header(&groups, end, format);
    let data_start = 8 + head.len() as u64;
    let name = copies.data_file_name(format);
    let (data, tmp) = (dir.join(&name), dir.join(format!("{name}.tmp")));
    let io = |path: &Path, e: std::io::Error| -> CliError { format!("{}: {e}", path.display()).into() };

    let file = File::create(&tmp).map_err(|e| io(&tmp, e))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(&(head.len() as u64).to_le_bytes()).map_err(|e| io(&tmp, e))?;
    out.write_all(&head).map_err(|e| io(&tmp, e))?;
    let tensors: usize = groups.iter().map(Vec::len).sum();
    let bar = ProgressBar::with_draw_target(Some(tensors as u64), ProgressDrawTarget::stderr_with_hz(4));
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} tensors  {msg}  ETA {eta}")
            .expect("a valid template"),
    );
    bar.set_message(format!("quantizing to {}", format.name().to_ascii_lowercase()));
    // Tensors are quantized in parallel a batch at a time and written in order, so memory
    // holds one batch of quantized tensors.
    let mut cursor = 0u64;
    let all: Vec<&Planned> = groups.iter().flatten().collect();
    for batch in all.chunks(rayon::current_num_threads().max(1) * 4) {
        let quantized: Vec<Result<Vec<u8>, CliError>> =
            batch.par_iter().map(|t| quantize_tensor(model, t, format)).collect();
        for (t, bytes) in batch.iter().zip(quantized) {
            let b = bytes?;
            debug_assert_eq!(b.len() as u64, t.len);
            write_zeros(&mut out, t.at - cursor).map_err(|e| io(&tmp, e))?;
            out.write_all(&b).map_err(|e| io(&tmp, e))?;
            cursor = t.at + t.len;
            bar.inc(1);
        }
    }
    write_zeros(&mut out, end - cursor).map_err(|e| io(&tmp, e))?;
    let file = out.into_inner().map_err(|e| io(&tmp, e.into_error()))?;
    file.sync_all().map_err(|e| io(&tmp, e))?;
    drop(file);
    bar.finish_and_clear();
    std::fs::rename(&tmp, &data).map_err(|e| io(&data, e))?;
    sync_dir(dir)?;

    let entries: BTreeMap<String, LowBitTensor> = groups
        .iter()
        .flatten()
        .map(|t| {
            let entry = LowBitTensor { offset: data_start + t.at, bytes: t.len, shape: [t.rows, t.cols] };
            (t.name.clone(), entry)
        })
        .collect();
    let index = LowBitIndex {
        format: format.name().to_ascii_lowercase(),
        file: name,
        file_bytes: data_start + end,
        tensors: entries,
    };
    let path = copies.index_path(dir, format);
    let tmp = path.with_extension("json.tmp");
    let mut text = serde_json::to_vec(&index).expect("the index serialises");
    text.push(b'\n');
    let mut f = File::create(&tmp).map_err(|e| io(&tmp, e))?;
    f.write_all(&text).and_then(|_| f.sync_all()).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
    sync_dir(dir)?;
    Ok(Written { tensors, bytes: data_start + end })
}

fn quantize_tensor(model: &Model, t: &Planned, format: DType) -> Result<Vec<u8>, CliError> {
    let src = model.index.get(&t.name, &[t.rows, t.cols])?;
    let mut values = vec![0.0f32; t.rows * t.cols];
    stevedore_kernels::to_f32(src.dtype, src.bytes, &mut values);
    Ok(stevedore_kernels::quantize(format, &values))
}

fn write_zeros(out: &mut impl Write, n: u64) -> std::io::Result<()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    let mut left = n;
    while left > 0 {
        let k = left.min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..k])?;
        left -= k as u64;
    }
    Ok(())
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), CliError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("{}: {e}", dir.display()).into())
}
