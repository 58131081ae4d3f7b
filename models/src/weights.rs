//! The safetensors weight index: every tensor of a checkpoint (one file or shards listed by
//! `model.safetensors.index.json`) with its file, absolute byte range, dtype and shape. Dense
//! weights are read in place through a read-only memory map; expert weights are read by the
//! engine from the byte ranges recorded here.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;
use stevedore_kernels::{DType, Weight};

use crate::Error;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

pub struct Shard {
    pub path: PathBuf,
    map: Mmap,
}

impl Shard {
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub shard: usize,
    /// The safetensors dtype name (`BF16`, `F32`, `I64`, ...).
    pub dtype_name: String,
    /// Set when the dtype is one the kernels read.
    pub dtype: Option<DType>,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the first element in the shard file.
    pub offset: u64,
    pub len: u64,
}

/// A tensor's bytes, borrowed from the memory map.
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl<'a> TensorRef<'a> {
    /// The tensor as a `[rows, cols]` matrix (shape must be 2-D).
    pub fn matrix(&self) -> Weight<'a> {
        Weight { dtype: self.dtype, data: self.bytes, rows: self.shape[0], cols: self.shape[1] }
    }

    /// The tensor converted to f32 (for small vectors: norms, biases).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut v = vec![0.0; self.bytes.len() / self.dtype.size()];
        stevedore_kernels::to_f32(self.dtype, self.bytes, &mut v);
        v
    }
}

pub struct WeightIndex {
    pub dir: PathBuf,
    pub shards: Vec<Shard>,
    tensors: HashMap<String, TensorInfo>,
}

fn dtype_from_name(name: &str) -> Option<DType> {
    match name {
        "BF16" => Some(DType::BF16),
        "F16" => Some(DType::F16),
        "F32" => Some(DType::F32),
        _ => None,
    }
}

impl WeightIndex {
    /// Opens the checkpoint in `dir`: `model.safetensors.index.json` and its shards if present,
    /// else `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let index_path = dir.join(INDEX_FILE);
        let mut index = WeightIndex { dir: dir.to_owned(), shards: Vec::new(), tensors: HashMap::new() };
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let map = parse_index(&text).map_err(|msg| Error::Config { path: index_path.clone(), msg })?;
            // Shard file name -> tensors the index places there.
            let mut by_file: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for (tensor, file) in &map {
                by_file.entry(file.as_str()).or_default().push(tensor.as_str());
            }
            for (file, names) in by_file {
                if file.contains('/') || file.contains('\\') || file == ".." {
                    return Err(Error::Config {
                        path: index_path.clone(),
                        msg: format!("shard name `{file}` must be a plain file name"),
                    });
                }
                let shard = index.add_shard(&dir.join(file))?;
                for name in names {
                    match index.tensors.get(name) {
                        Some(info) if info.shard == shard => {}
                        _ => {
                            return Err(Error::Config {
                                path: index_path.clone(),
                                msg: format!(
                                    "tensor `{name}` is listed in `{file}` but that file does not contain it"
                                ),
                            })
                        }
                    }
                }
            }
        } else {
            index.add_shard(&dir.join(SINGLE_FILE))?;
        }
        Ok(index)
    }

    fn add_shard(&mut self, path: &Path) -> Result<usize, Error> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let bad = |msg: String| Error::Safetensors { path: path.to_owned(), msg };
        if meta.is_dir() {
            return Err(bad("is a directory, not a safetensors file".into()));
        }
        if !meta.is_file() {
            return Err(bad("is not a regular file".into()));
        }
        let len = meta.len();
        if len < 8 {
            return Err(bad(format!("file is {len} bytes, too short for a safetensors header")));
        }
        // SAFETY: the map is read-only and every access is bounds-checked against the header
        // validated below. That the file does not change while we run is an assumption, as for
        // every mmap-based loader: truncating a shard under a running process is outside what
        // we can guard against (it would fault, not return wrong data silently).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header_len = u64::from_le_bytes(map[..8].try_into().unwrap());
        if header_len > len - 8 {
            return Err(bad(format!("header length {header_len} extends beyond the file ({len} bytes)")));
        }
        let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| bad(describe(e, len)))?;
        let data_start = 8 + n as u64;
        let shard = self.shards.len();
        for (name, t) in meta.tensors() {
            let (start, end) = t.data_offsets;
            if self.tensors.contains_key(&name) {
                return Err(bad(format!("tensor `{name}` also appears in another shard")));
            }
            let dtype_name = format!("{:?}", t.dtype);
            self.tensors.insert(
                name,
                TensorInfo {
                    shard,
                    dtype: dtype_from_name(&dtype_name),
                    dtype_name,
                    shape: t.shape.clone(),
                    offset: data_start + start as u64,
                    len: (end - start) as u64,
                },
            );
        }
        self.shards.push(Shard { path: path.to_owned(), map });
        Ok(shard)
    }

    /// Reads the dense matrices from their `format` copies (`stevedore quantize --all`): every
    /// tensor the copies' index lists (checked like the safetensors index, and against this
    /// checkpoint's shape) now lies in the copies' file, in `format`. Returns how many.
    pub fn use_dense_copies(&mut self, format: DType) -> Result<usize, Error> {
        let opened = crate::quantized::Opened::open(&self.dir, crate::quantized::Copies::Dense, format)?;
        let shard = self.shards.len();
        let mut replaced = Vec::new();
        for name in opened.names() {
            let info = self.info(name)?;
            let &[rows, cols] = &info.shape[..] else {
                return Err(Error::Tensor {
                    path: opened.index_path.clone(),
                    name: name.to_owned(),
                    msg: format!("has shape {:?} in the checkpoint: not a matrix", info.shape),
                });
            };
            let (offset, len) = opened.entry(name, rows, cols)?;
            let info = TensorInfo {
                shard,
                dtype_name: format.name().to_owned(),
                dtype: Some(format),
                shape: vec![rows, cols],
                offset,
                len,
            };
            replaced.push((name.to_owned(), info));
        }
        let n = replaced.len();
        self.tensors.extend(replaced);
        let crate::quantized::Opened { data, map, .. } = opened;
        self.shards.push(Shard { path: data, map });
        Ok(n)
    }

    /// The whole mapped file of shard `i`.
    pub fn shard_data(&self, i: usize) -> &[u8] {
        &self.shards[i].map
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn info(&self, name: &str) -> Result<&TensorInfo, Error> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor { name: name.to_owned(), dir: self.dir.clone() })
    }

    /// Checks that `name` exists with a float dtype the kernels read and exactly `shape`.
    pub fn check(&self, name: &str, shape: &[usize]) -> Result<(&TensorInfo, DType), Error> {
        let info = self.info(name)?;
        let err = |msg: String| Error::Tensor {
            path: self.shards[info.shard].path.clone(),
            name: name.to_owned(),
            msg,
        };
        let dtype = info.dtype.ok_or_else(|| {
            err(format!("dtype {} is not supported (expected BF16, F16 or F32)", info.dtype_name))
        })?;
        if info.shape != shape {
            return Err(err(format!("shape {:?} does not match the config's {:?}", info.shape, shape)));
        }
        Ok((info, dtype))
    }

    /// The tensor `name`, checked against `shape`, borrowed from the memory map.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<TensorRef<'_>, Error> {
        let (info, dtype) = self.check(name, shape)?;
        let bytes = &self.shards[info.shard].map[info.offset as usize..(info.offset + info.len) as usize];
        Ok(TensorRef { dtype, shape: &info.shape, bytes })
    }

    /// Total bytes of all tensors whose name satisfies `pred`.
    pub fn bytes_where(&self, pred: impl Fn(&str) -> bool) -> u64 {
        self.tensors.iter().filter(|(n, _)| pred(n)).map(|(_, t)| t.len).sum()
    }
}

fn parse_index(text: &str) -> Result<BTreeMap<String, String>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let map = v.get("weight_map").ok_or("missing field `weight_map`")?;
    let obj = map.as_object().ok_or("field `weight_map` must be an object")?;
    obj.iter()
        .map(|(k, v)| match v.as_str() {
            Some(f) => Ok((k.clone(), f.to_owned())),
            None => Err(format!("field `weight_map.{k}` must be a file name")),
        })
        .collect()
}

fn describe(e: safetensors::SafeTensorError, file_len: u64) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => {
            format!("file is truncated or has trailing bytes: the header's tensors do not end at the file's end ({file_len} bytes)")
        }
        E::InvalidOffset(name) => {
            format!("tensor `{name}` has data offsets outside the file or overlapping another tensor")
        }
        E::TensorInvalidInfo => "a tensor's byte length does not match its dtype and shape".into(),
        E::InvalidHeader(e) => format!("header is not valid UTF-8: {e}"),
        E::InvalidHeaderDeserialization(e) => format!("header is not valid safetensors JSON: {e}"),
        E::HeaderTooLarge => "header is larger than safetensors allows".into(),
        E::HeaderTooSmall => "header is too small".into(),
        E::InvalidHeaderLength => format!("header length extends beyond the file ({file_len} bytes)"),
        other => format!("invalid safetensors file: {other}"),
    }
}
