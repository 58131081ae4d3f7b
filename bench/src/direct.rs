//! O_DIRECT file I/O: aligned buffers, opening with the flag where the file system allows it,
//! and a streaming writer.
//!
//! Reads go around the page cache so that the disk probe measures the disk. Writes do too, for
//! two reasons: on the VMs this was developed on buffered writeback reached about a quarter of the
//! disk's O_DIRECT write speed, and a checkpoint written through the page cache would sit there
//! and make the first reads of it look like memory.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use stevedore_engine::io::{AlignedBuf, ALIGN};

/// A zeroed [`AlignedBuf`] of at least `len` bytes (the engine's own aligned buffer type).
pub fn aligned(len: usize) -> Result<AlignedBuf, String> {
    AlignedBuf::zeroed(len).map_err(|e| e.to_string())
}

/// Opens `path` with `options` plus O_DIRECT where the file system allows it, else without; the
/// flag says which.
fn open_maybe_direct(path: &Path, options: &OpenOptions) -> Result<(File, bool), String> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        match options.clone().custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(format!("{}: cannot open: {e}", path.display())),
        }
    }
    let f = options.open(path).map_err(|e| format!("{}: cannot open: {e}", path.display()))?;
    Ok((f, false))
}

pub fn open_read(path: &Path) -> Result<(File, bool), String> {
    open_maybe_direct(path, OpenOptions::new().read(true))
}

/// Reads bytes `[start, end)` of `f` widened to [`ALIGN`] boundaries (as O_DIRECT requires) into
/// `buf`, and returns how many bytes came from the file.
pub fn read_aligned(
    f: &File,
    path: &Path,
    buf: &mut AlignedBuf,
    start: u64,
    end: u64,
) -> Result<u64, String> {
    let a = ALIGN as u64;
    let (from, to) = (start / a * a, end.div_ceil(a) * a);
    let want = (to - from) as usize;
    if want > buf.len() {
        return Err(format!(
            "{}: a {want}-byte read does not fit the {}-byte buffer",
            path.display(),
            buf.len()
        ));
    }
    let out = &mut buf.as_mut_slice()[..want];
    let mut done = 0;
    while done < want {
        match f.read_at(&mut out[done..], from + done as u64) {
            Ok(0) => break, // end of file inside the last aligned block
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{}: read at {} failed: {e}", path.display(), from + done as u64)),
        }
    }
    if (done as u64) < end - from {
        return Err(format!("{}: file ends before byte {end}", path.display()));
    }
    Ok(done as u64)
}

/// Writes a file front to back through an aligned staging buffer, with O_DIRECT where allowed.
pub struct DirectWriter {
    file: File,
    path: PathBuf,
    buf: AlignedBuf,
    filled: usize,
    written: u64,
    pub direct: bool,
}

impl DirectWriter {
    /// Creates (or truncates) `path`; `buffer_bytes` is the size of each write.
    pub fn create(path: &Path, buffer_bytes: usize) -> Result<DirectWriter, String> {
        let (file, direct) =
            open_maybe_direct(path, OpenOptions::new().write(true).create(true).truncate(true))?;
        Ok(DirectWriter {
            file,
            path: path.to_owned(),
            buf: aligned(buffer_bytes)?,
            filled: 0,
            written: 0,
            direct,
        })
    }

    pub fn write(&mut self, mut data: &[u8]) -> Result<(), String> {
        while !data.is_empty() {
            let n = (self.buf.len() - self.filled).min(data.len());
            self.buf.as_mut_slice()[self.filled..self.filled + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == self.buf.len() {
                self.flush(self.filled)?;
            }
        }
        Ok(())
    }

    /// Writes the first `len` bytes of the buffer (a multiple of [`ALIGN`]) at the file's end.
    fn flush(&mut self, len: usize) -> Result<(), String> {
        self.file
            .write_all_at(&self.buf.as_slice()[..len], self.written)
            .map_err(|e| format!("{}: write at {} failed: {e}", self.path.display(), self.written))?;
        self.written += self.filled as u64;
        self.filled = 0;
        Ok(())
    }

    /// Writes what is left (padded to [`ALIGN`], then cut back to the exact length) and syncs.
    pub fn finish(mut self) -> Result<u64, String> {
        if self.filled > 0 {
            let padded = self.filled.next_multiple_of(ALIGN);
            self.buf.as_mut_slice()[self.filled..padded].fill(0);
            self.flush(padded)?;
        }
        let err = |e: std::io::Error| format!("{}: cannot finish: {e}", self.path.display());
        self.file.set_len(self.written).map_err(err)?;
        self.file.sync_all().map_err(err)?;
        Ok(self.written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_produces_the_exact_bytes() {
        let dir = crate::TempDir::new("direct-writer").unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3 * ALIGN + 1234).map(|i| (i * 31 % 256) as u8).collect();
        let mut w = DirectWriter::create(&path, 2 * ALIGN).unwrap();
        for piece in data.chunks(1000) {
            w.write(piece).unwrap();
        }
        assert_eq!(w.finish().unwrap(), data.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    #[test]
    fn aligned_reads_cover_unaligned_ranges() {
        let dir = crate::TempDir::new("aligned-read").unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3 * ALIGN + 100).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let (f, _) = open_read(&path).unwrap();
        let mut buf = aligned(6 * ALIGN).unwrap();
        // Ends in the file's last partial block: the short read is fine.
        let n = read_aligned(&f, &path, &mut buf, 5000, data.len() as u64).unwrap();
        assert_eq!(n, (data.len() - ALIGN) as u64);
        assert_eq!(&buf.as_slice()[..n as usize], &data[ALIGN..]);
        let err = read_aligned(&f, &path, &mut buf, 10, data.len() as u64 + 5000).unwrap_err();
        assert!(err.contains("file ends before byte"), "{err}");
        let err = read_aligned(&f, &path, &mut buf, 0, 7 * ALIGN as u64).unwrap_err();
        assert!(err.contains("does not fit"), "{err}");
    }
}
