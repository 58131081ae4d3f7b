//! Shared helpers for the end-to-end tests: run the real binary, read the committed fixtures and
//! their transformers references, copy a fixture to a temporary directory, and rewrite
//! safetensors files so that each bad-input test states exactly what it corrupts.
//!
//! Every helper panics with a message naming the file when the *fixture* is not what it should
//! be: that is a broken test setup, not a behaviour under test.

// Each test file compiles this module on its own and uses a different part of it.
#![allow(dead_code)]

pub mod http;

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Map, Value};

/// The random-weight fixtures with transformers references.
pub const FIXTURES: [&str; 8] =
    ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe", "phimoe", "deepseek_v3", "deepseek_v2"];

/// The trained tiny model (with tokenizer.json and golden.json).
pub const PYDOC_MOE: &str = "pydoc-moe";

pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// What one run of the binary did.
pub struct Run {
    /// The command line, for failure messages.
    pub cmdline: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `stevedore-e2e ARGS...` (the `stevedore` entry point) with logging off.
pub fn stevedore<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let cmdline = format!(
        "stevedore {}",
        args.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
    );
    let out = Command::new(env!("CARGO_BIN_EXE_stevedore-e2e"))
        .args(&args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmdline}: {e}"));
    Run {
        cmdline,
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "{}\nexit status: {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.cmdline, self.code, self.stdout, self.stderr
        )
    }

    fn assert_no_panic(&self) {
        assert!(!self.stderr.contains("panicked"), "the binary panicked:\n{}", self.describe());
    }

    /// Asserts success and returns stdout.
    pub fn ok(&self) -> &str {
        self.assert_no_panic();
        assert_eq!(self.code, Some(0), "expected success:\n{}", self.describe());
        &self.stdout
    }

    /// Asserts success and parses stdout as the one JSON object `--json` prints.
    pub fn json(&self) -> Value {
        let out = self.ok();
        serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}):\n{}", self.describe()))
    }

    /// Asserts a user error: exit status 1, no panic, stderr starting `error: ` and containing
    /// every one of `needles`. Returns stderr.
    pub fn err(&self, needles: &[&str]) -> &str {
        // Shown with `--nocapture`, to read the messages users would see.
        eprintln!("{}\n  -> {}", self.cmdline, self.stderr.trim_end());
        self.assert_no_panic();
        assert_eq!(self.code, Some(1), "expected exit status 1:\n{}", self.describe());
        assert!(self.stderr.starts_with("error: "), "stderr must start with `error: `:\n{}", self.describe());
        for n in needles {
            assert!(self.stderr.contains(n), "stderr does not mention {n:?}:\n{}", self.describe());
        }
        &self.stderr
    }
}

/// `generate --json` on `dir` with `--prompt-ids` and the extra `flags`; returns the JSON.
pub fn generate_ids(dir: &Path, prompt_ids: &[u64], max_new_tokens: u64, flags: &[&str]) -> Value {
    let ids = prompt_ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let mut args: Vec<std::ffi::OsString> = vec!["generate".into(), "--model".into(), dir.into()];
    args.extend([
        "--prompt-ids".into(),
        ids.into(),
        "--max-new-tokens".into(),
        max_new_tokens.to_string().into(),
    ]);
    args.extend(flags.iter().map(Into::into));
    args.push("--json".into());
    stevedore(args).json()
}

/// `inspect --json` on `dir` with the extra `flags`.
pub fn inspect(dir: &Path, flags: &[&str]) -> Value {
    let mut args: Vec<std::ffi::OsString> =
        vec!["inspect".into(), "--model".into(), dir.into(), "--json".into()];
    args.extend(flags.iter().map(Into::into));
    stevedore(args).json()
}

/// A JSON array of non-negative integers as a `Vec<u64>`.
pub fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array of ids, got {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap_or_else(|| panic!("expected an id, got {x}")))
        .collect()
}

/// `v[key]` as a u64, naming the key when it is missing.
pub fn u64_at(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("`{key}` is not a non-negative integer in {v}"))
}

/// One prompt of a fixture's `reference.json` with transformers' greedy continuation.
pub struct Case {
    pub prompt: Option<String>,
    pub prompt_ids: Vec<u64>,
    pub generated_ids: Vec<u64>,
}

pub struct Reference {
    pub max_new_tokens: u64,
    pub cases: Vec<Case>,
}

pub fn reference(fixture: &str) -> Reference {
    let path = fixture_dir(fixture).join("reference.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let cases = v["cases"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no `cases` array", path.display()))
        .iter()
        .map(|c| Case {
            prompt: c["prompt"].as_str().map(str::to_owned),
            prompt_ids: ids(&c["prompt_ids"]),
            generated_ids: ids(&c["generated_ids"]),
        })
        .collect();
    Reference { max_new_tokens: u64_at(&v, "max_new_tokens"), cases }
}

/// A copy of fixture `name` (its files, not its reference) in a fresh temporary directory.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let src = fixture_dir(name);
    let tmp = tempfile::tempdir().expect("cannot create a temporary directory");
    for entry in fs::read_dir(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display())) {
        let entry = entry.expect("reading a fixture directory");
        if entry.file_name() != "reference.json" {
            let to = tmp.path().join(entry.file_name());
            fs::copy(entry.path(), &to)
                .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", entry.path().display(), to.display()));
        }
    }
    tmp
}

/// Safetensors files in `dir` (shards or the single file), sorted by name.
pub fn safetensors_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("reading a fixture directory").path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    v.sort();
    v
}

/// Bytes per element of a safetensors dtype name.
pub fn dtype_size(dtype: &str) -> usize {
    match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "BF16" | "F16" | "I16" | "U16" => 2,
        "F32" | "I32" | "U32" => 4,
        "F64" | "I64" | "U64" => 8,
        other => panic!("unknown safetensors dtype {other}"),
    }
}

/// A safetensors file taken apart: the JSON header (tensor name -> `{dtype, shape,
/// data_offsets}`, plus `__metadata__`) and the data section after it. Tests edit either and
/// write it back, so that a corruption is one readable line.
pub struct SafeTensors {
    pub header: Map<String, Value>,
    pub data: Vec<u8>,
}

impl SafeTensors {
    pub fn read(path: &Path) -> Self {
        let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&bytes[8..8 + n])
            .unwrap_or_else(|e| panic!("{}: header is not JSON: {e}", path.display()));
        let Value::Object(header) = header else { panic!("{}: header is not an object", path.display()) };
        SafeTensors { header, data: bytes[8 + n..].to_vec() }
    }

    /// The file: 8-byte little-endian header length, the header JSON padded with spaces to a
    /// multiple of 8 (as the safetensors writer does), then the data.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut json = serde_json::to_vec(&self.header).unwrap();
        json.resize(json.len().next_multiple_of(8), b' ');
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&json);
        out.extend_from_slice(&self.data);
        out
    }

    pub fn write(&self, path: &Path) {
        fs::write(path, self.to_bytes()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    fn entry(&self, name: &str) -> &Value {
        self.header.get(name).unwrap_or_else(|| panic!("no tensor `{name}` in the header"))
    }

    /// Tensor names (not `__metadata__`) in data order.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.header.keys().filter(|k| *k != "__metadata__").cloned().collect();
        v.sort_by_key(|n| self.offsets(n).0);
        v
    }

    pub fn offsets(&self, name: &str) -> (u64, u64) {
        let o = ids(&self.entry(name)["data_offsets"]);
        (o[0], o[1])
    }

    pub fn set_offsets(&mut self, name: &str, start: u64, end: u64) {
        self.header.get_mut(name).unwrap()["data_offsets"] = serde_json::json!([start, end]);
    }

    pub fn shape(&self, name: &str) -> Vec<u64> {
        ids(&self.entry(name)["shape"])
    }

    pub fn dtype(&self, name: &str) -> String {
        self.entry(name)["dtype"].as_str().expect("dtype is a string").to_owned()
    }

    /// Rewrites the data section contiguously in the current offset order, with `changed`
    /// giving a tensor new (dtype, shape) and zeroed bytes of the matching size, and `removed`
    /// dropping one. Offsets are recomputed, so the result is a well-formed file.
    fn relayout(&mut self, changed: Option<(&str, &str, &[u64])>, removed: Option<&str>) {
        let mut data = Vec::with_capacity(self.data.len());
        for name in self.names() {
            if Some(name.as_str()) == removed {
                self.header.remove(&name);
                continue;
            }
            let start = data.len() as u64;
            match changed {
                Some((n, dtype, shape)) if n == name => {
                    let numel: u64 = shape.iter().product();
                    data.resize(data.len() + numel as usize * dtype_size(dtype), 0);
                    let e = self.header.get_mut(&name).unwrap();
                    e["dtype"] = dtype.into();
                    e["shape"] = serde_json::json!(shape);
                }
                _ => {
                    let (s, e) = self.offsets(&name);
                    data.extend_from_slice(&self.data[s as usize..e as usize]);
                }
            }
            self.set_offsets(&name, start, data.len() as u64);
        }
        self.data = data;
    }

    /// Stores `name` as `dtype` with `shape` (zero bytes), keeping the file well-formed.
    pub fn retype(&mut self, name: &str, dtype: &str, shape: &[u64]) {
        self.entry(name);
        self.relayout(Some((name, dtype, shape)), None);
    }

    /// Drops `name` and its bytes, keeping the file well-formed.
    pub fn remove(&mut self, name: &str) {
        self.entry(name);
        self.relayout(None, Some(name));
    }
}

/// Bytes of tensor data in all safetensors files of `dir` (file size minus the 8-byte length
/// and the header).
pub fn payload_bytes(dir: &Path) -> u64 {
    safetensors_files(dir).iter().map(|p| SafeTensors::read(p).data.len() as u64).sum()
}

/// The file-system type of the mount holding `path`, from /proc/self/mountinfo (None if that
/// cannot be read). Used to know whether O_DIRECT must be available.
pub fn fs_type(path: &Path) -> Option<String> {
    let path = fs::canonicalize(path).ok()?;
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        // `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS`
        let mut halves = line.splitn(2, " - ");
        let (left, right) = (halves.next()?, halves.next()?);
        let mount = unescape_mountinfo(left.split(' ').nth(4)?);
        let fstype = right.split(' ').next()?.to_owned();
        if path.starts_with(&mount) && best.as_ref().is_none_or(|(len, _)| mount.len() >= *len) {
            best = Some((mount.len(), fstype));
        }
    }
    best.map(|(_, t)| t)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (b[i], octal) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// File systems on which Linux supports O_DIRECT for regular files.
pub fn supports_direct_io(fstype: &str) -> bool {
    matches!(fstype, "ext4" | "ext3" | "ext2" | "xfs" | "btrfs" | "f2fs")
}
