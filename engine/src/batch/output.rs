//! The results file: one JSON record a line, appended and made durable (`write` + `fsync`) per
//! finished request, so a line is either whole or absent. Opening it for a job resumes: the keys
//! already answered are read, and a torn last line (a kill during a write) is cut off.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The key a record answers: its `custom_id`, or for a line that had none, `#line N`.
pub fn record_key(v: &Value) -> Option<String> {
    match (v.get("custom_id").and_then(Value::as_str), v.get("line").and_then(Value::as_u64)) {
        (Some(id), _) => Some(id.to_owned()),
        (None, Some(n)) => Some(line_key(n as usize)),
        (None, None) => None,
    }
}

pub fn line_key(line: usize) -> String {
    format!("#line {line}")
}

pub struct Results {
    path: PathBuf,
    file: File,
    /// Keys already answered in the file.
    pub done: HashSet<String>,
    /// Bytes of a torn last line cut off when opening.
    pub repaired_bytes: u64,
}

impl Results {
    /// Opens (or creates) `path` for appending, after reading what it already answers. A last
    /// line without its newline is a torn write: it is cut off (its request runs again). A whole
    /// line that is not a result record is an error: the file is not ours to change.
    pub fn open(path: &Path) -> Result<Results, String> {
        let at = |e: std::io::Error| format!("{}: {e}", path.display());
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.is_dir() {
                return Err(format!("{}: the directory {} does not exist", path.display(), parent.display()));
            }
        }
        let existing = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(at(e)),
        };
        let whole = existing.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut done = HashSet::new();
        for (i, line) in existing[..whole].split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let key = serde_json::from_slice::<Value>(line).ok().as_ref().and_then(record_key).ok_or_else(|| {
                format!(
                    "{}:{}: not a result record of `stevedore batch`; refusing to append to it (give another --output)",
                    path.display(),
                    i + 1
                )
            })?;
            done.insert(key);
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(at)?;
        let repaired_bytes = (existing.len() - whole) as u64;
        if repaired_bytes > 0 {
            file.set_len(whole as u64).map_err(at)?;
            file.sync_data().map_err(at)?;
        }
        Ok(Results { path: path.to_owned(), file, done, repaired_bytes })
    }

    /// Appends `record` as one line and waits until it is on disk.
    pub fn append(&mut self, record: &Value) -> Result<(), String> {
        let mut line = serde_json::to_vec(record).expect("a JSON value serialises");
        line.push(b'\n');
        // One write of the whole line (O_APPEND): a kill leaves it whole or torn at the end,
        // and a torn end is cut off when the job resumes.
        self.file
            .write_all(&line)
            .and_then(|_| self.file.sync_data())
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        if let Some(k) = record_key(record) {
            self.done.insert(k);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn resumes_with_the_keys_answered_and_cuts_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let mut r = Results::open(&path).unwrap();
        r.append(&json!({"custom_id": "a", "response": {}})).unwrap();
        r.append(&json!({"custom_id": null, "line": 7, "error": {}})).unwrap();
        drop(r);
        // A kill mid-write: half a line at the end.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"custom_id": "b", "resp"#).unwrap();
        let r = Results::open(&path).unwrap();
        assert_eq!(r.done, HashSet::from(["a".to_owned(), "#line 7".to_owned()]));
        assert_eq!(r.repaired_bytes, 24);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n') && text.lines().count() == 2, "{text:?}");
    }

    #[test]
    fn refuses_a_file_that_is_not_ours_and_a_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "hello\n").unwrap();
        assert!(Results::open(&path).err().unwrap().contains("out.jsonl:1: not a result record"));
        let missing = dir.path().join("nope/out.jsonl");
        assert!(Results::open(&missing).err().unwrap().contains("does not exist"));
    }
}
