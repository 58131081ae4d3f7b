//! Low-bit copies of a checkpoint's routed experts (`stevedore quantize` writes them): one
//! safetensors file per format beside the checkpoint, `experts.<format>.safetensors`, and a
//! small index, `experts.<format>.json`, naming for every expert tensor its format, file,
//! absolute byte range and shape. Each expert's three tensors lie together, starting on a
//! 4 KiB boundary, so one `O_DIRECT` read fetches an expert.
//!
//! The index is the commit point: the writer renames it into place last, after the data file
//! is complete and synced, so an index always describes a whole file. Loading checks it like
//! the safetensors index: the file's size, the safetensors header's offsets, every expert's
//! tensors with the model's shapes and the format's byte counts, each range within the file.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use stevedore_kernels::DType;

use crate::experts::{ExpertTensors, TensorLoc};
use crate::{Error, Model};

/// The formats low-bit copies may take.
pub const LOW_BIT_FORMATS: [DType; 2] = [DType::Q8_0, DType::Q4_0];

/// Where an expert's bytes start in a low-bit file.
pub const EXPERT_ALIGN: u64 = 4096;

/// Which weights a set of copies holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copies {
    /// The routed experts (`experts.<format>.*`): what the store reads on a miss.
    Experts,
    /// The dense matrices (`dense.<format>.*`, `quantize --all`): attention, dense and shared
    /// MLPs, embeddings and the LM head; never the routers (kept exact, as llama.cpp keeps
    /// `ffn_gate_inp`) nor MLA's key/value expansion (absorbed at load).
    Dense,
}

impl Copies {
    fn stem(self) -> &'static str {
        match self {
            Copies::Experts => "experts",
            Copies::Dense => "dense",
        }
    }

    /// The index file of `format`'s copies in `dir`.
    pub fn index_path(self, dir: &Path, format: DType) -> PathBuf {
        dir.join(format!("{}.{}.json", self.stem(), format.name().to_ascii_lowercase()))
    }

    /// The data file name of `format`'s copies.
    pub fn data_file_name(self, format: DType) -> String {
        format!("{}.{}.safetensors", self.stem(), format.name().to_ascii_lowercase())
    }
}

/// The index file of `format`'s expert copies in `dir`.
pub fn index_path(dir: &Path, format: DType) -> PathBuf {
    Copies::Experts.index_path(dir, format)
}

/// The data file name of `format`'s expert copies.
pub fn data_file_name(format: DType) -> String {
    Copies::Experts.data_file_name(format)
}

/// The index as written to disk.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LowBitIndex {
    /// `q8_0` or `q4_0`.
    pub format: String,
    /// The data file, a plain name in the checkpoint's directory.
    pub file: String,
    /// Its size: a file of another size is not the one this index describes.
    pub file_bytes: u64,
    pub tensors: BTreeMap<String, LowBitTensor>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LowBitTensor {
    /// Absolute byte offset in the data file.
    pub offset: u64,
    pub bytes: u64,
    /// `[rows, cols]` of the original matrix.
    pub shape: [usize; 2],
}

/// The low-bit copies of a model's experts in one format, checked.
pub struct LowBitExperts {
    pub format: DType,
    /// The data file (the store reads it as one more shard).
    pub path: PathBuf,
    /// Every routed expert's tensors in the data file; their `shard` is the one given to
    /// [`LowBitExperts::open`].
    pub tensors: ExpertTensors,
}

impl LowBitExperts {
    /// The formats whose index exists in `dir` (whether or not it is valid).
    pub fn available(dir: &Path) -> Vec<DType> {
        LOW_BIT_FORMATS.into_iter().filter(|f| index_path(dir, *f).is_file()).collect()
    }

    /// Opens and checks `format`'s copies of `model`'s experts; their tensors say `shard`.
    pub fn open(model: &Model, format: DType, shard: usize) -> Result<Self, Error> {
        let opened = Opened::open(&model.index.dir, Copies::Experts, format)?;
        let cfg = &model.config;
        let shapes = crate::names::expert_tensor_shapes(cfg);
        let mut by_moe = Vec::with_capacity(model.layers.num_moe_layers());
        for &layer in model.layers.moe_layers() {
            let mut experts = Vec::with_capacity(cfg.num_experts);
            for e in 0..cfg.num_experts {
                let names = crate::names::expert_tensor_names(cfg.arch, layer.0, e);
                let mut locs = Vec::with_capacity(3);
                for (name, &[rows, cols]) in names.iter().zip(&shapes) {
                    let (offset, len) = opened.entry(name, rows, cols)?;
                    locs.push(TensorLoc { shard, offset, len, dtype: format, rows, cols });
                }
                experts.push([locs[0], locs[1], locs[2]]);
            }
            by_moe.push(experts);
        }
        let tensors = ExpertTensors::from_locs(cfg.num_experts, by_moe);
        Ok(LowBitExperts { format, path: opened.data, tensors })
    }
}

/// An index and its data file, checked as a whole (format, file name, size, header).
pub(crate) struct Opened {
    pub(crate) index_path: PathBuf,
    pub(crate) data: PathBuf,
    pub(crate) map: Mmap,
    index: LowBitIndex,
    header: BTreeMap<String, u64>,
    format: DType,
}

impl Opened {
    pub(crate) fn open(dir: &Path, copies: Copies, format: DType) -> Result<Self, Error> {
        let path = copies.index_path(dir, format);
        let bad = |msg: String| Error::Config { path: path.clone(), msg };
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => bad(format!(
                "no {} copies of the {}: make them with `stevedore quantize --model {} --format {}{}`",
                format.name(),
                copies.stem(),
                dir.display(),
                format.name().to_ascii_lowercase(),
                if copies == Copies::Dense { " --all" } else { "" }
            )),
            _ => Error::io(&path, e),
        })?;
        let index: LowBitIndex =
            serde_json::from_str(&text).map_err(|e| bad(format!("invalid index: {e}")))?;
        if DType::parse(&index.format) != Some(format) {
            return Err(bad(format!("`format` is `{}`, expected `{}`", index.format, format.name())));
        }
        if index.file.contains('/') || index.file.contains('\\') || index.file == ".." {
            return Err(bad(format!("`file` `{}` must be a plain file name", index.file)));
        }
        let data = dir.join(&index.file);
        let file = File::open(&data).map_err(|e| Error::io(&data, e))?;
        let len = file.metadata().map_err(|e| Error::io(&data, e))?.len();
        let bad_data = |msg: String| Error::Safetensors { path: data.clone(), msg };
        if len != index.file_bytes {
            return Err(bad_data(format!(
                "is {len} bytes but its index {} says {}: not the file the index describes \
                 (quantize again with --force)",
                path.display(),
                index.file_bytes
            )));
        }
        // SAFETY: read-only; the header is parsed after the length check above, and tensor
        // bytes are read only within ranges checked against the file's length (`entry`).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&data, e))?;
        let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| bad_data(format!("{e:?}")))?;
        let data_start = 8 + n as u64;
        let header = meta
            .tensors()
            .into_iter()
            .map(|(name, t)| (name, data_start + t.data_offsets.0 as u64))
            .collect();
        Ok(Opened { index_path: path, data, map, index, header, format })
    }

    /// Names the index lists.
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.index.tensors.keys().map(String::as_str)
    }

    /// Tensor `name` of `[rows, cols]`, checked: (absolute offset, bytes).
    pub(crate) fn entry(&self, name: &str, rows: usize, cols: usize) -> Result<(u64, u64), Error> {
        let (path, format) = (&self.index_path, self.format);
        let tensor_err = |msg: String| Error::Tensor { path: path.clone(), name: name.to_owned(), msg };
        let t = self.index.tensors.get(name).ok_or_else(|| tensor_err("is missing from the index".into()))?;
        if t.shape != [rows, cols] {
            return Err(tensor_err(format!(
                "shape {:?} does not match the model's [{rows}, {cols}]",
                t.shape
            )));
        }
        let want = format
            .bytes(cols)
            .and_then(|r| r.checked_mul(rows))
            .ok_or_else(|| tensor_err(format!("{cols} columns are not whole {} blocks", format.name())))?;
        if t.bytes != want as u64 {
            return Err(tensor_err(format!("holds {} bytes, {} needs {want}", t.bytes, format.name())));
        }
        let len = self.map.len() as u64;
        match t.offset.checked_add(t.bytes) {
            Some(end) if end <= len => {}
            _ => {
                return Err(tensor_err(format!(
                    "bytes {}..+{} are not within {} ({len} bytes)",
                    t.offset,
                    t.bytes,
                    self.data.display()
                )))
            }
        }
        if self.header.get(name) != Some(&t.offset) {
            return Err(tensor_err(format!(
                "the index places it at byte {} but {}'s header does not",
                t.offset,
                self.data.display()
            )));
        }
        Ok((t.offset, t.bytes))
    }
}

/// The dense matrices `quantize --all` writes for `model` (see [`Copies::Dense`]), by name
/// with their `[rows, cols]`: 2-D float tensors that are not routed experts, routers or MLA's
/// key/value expansion, whose rows are whole blocks of [`stevedore_kernels::QK`].
pub fn dense_matrices(model: &Model) -> Vec<(String, [usize; 2])> {
    let cfg = &model.config;
    let routers: std::collections::HashSet<String> =
        model.layers.moe_layers().iter().map(|l| crate::family::moe_names(cfg.arch, l.0).router).collect();
    let mut v: Vec<(String, [usize; 2])> = model
        .index
        .names()
        .filter(|n| !crate::names::is_expert_tensor(n) && !routers.contains(*n) && !n.contains("kv_b_proj"))
        .filter_map(|n| {
            let info = model.index.info(n).ok()?;
            match (info.dtype, &info.shape[..]) {
                (Some(d), &[rows, cols]) if !d.is_block() && cols % stevedore_kernels::QK == 0 => {
                    Some((n.to_owned(), [rows, cols]))
                }
                _ => None,
            }
        })
        .collect();
    v.sort();
    v
}
