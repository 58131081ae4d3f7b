//! Benchmarks for stevedore.
//!
//! - `benches/matmul.rs`: criterion micro-benchmarks of the matmul kernels.
//! - `src/bin/e2e.rs`: the end-to-end expert-streaming benchmark. It writes a random checkpoint
//!   of a few GB ([`checkpoint`]), measures what the machine can do ([`probe`]), runs the real
//!   `stevedore` binary at several host-cache budgets ([`runner`]) and compares the decode speed
//!   with what memory and disk allow ([`report`]).
//! - `src/bin/batch.rs`: the batching benchmark. On the same checkpoint it runs 1, 4, 16 and 64
//!   concurrent sequences through `stevedore generate --batch` ([`runner`]) and reports generated
//!   tokens/s and bytes read per generated token against one sequence ([`batch`]).
//!
//! [`setup`] holds what both binaries share: shape flags, the binary's path, the checkpoint
//! directory and its cleanup.

use std::path::{Path, PathBuf};

pub mod batch;
pub mod checkpoint;
pub mod direct;
pub mod load;
pub mod probe;
pub mod report;
pub mod runner;
pub mod setup;

/// A directory under the system temp dir, removed on drop unless [`TempDir::keep`] was called.
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    pub fn new(prefix: &str) -> Result<TempDir, String> {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!("stevedore-{prefix}-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path).map_err(|e| format!("{}: cannot create: {e}", path.display()))?;
        Ok(TempDir { path, keep: false })
    }

    /// Wraps an existing directory chosen by the user; it is kept.
    pub fn existing(path: PathBuf) -> TempDir {
        TempDir { path, keep: true }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
