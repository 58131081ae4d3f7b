//! Positioned reads of exact byte ranges from checkpoint shard files.
//!
//! Reads go through `O_DIRECT` where the file system allows it, so that every expert load is a
//! real disk read: through the OS page cache a second run, or a benchmark right after the files
//! were written, would read from RAM and hide the very cost the expert cache exists to avoid.
//! `O_DIRECT` needs the buffer address, the file offset and the length aligned to the device's
//! logical block size; we use [`ALIGN`] (4096, the largest in common use) and read the aligned
//! range enclosing the wanted bytes (a [`Span`]) into an [`AlignedBuf`].
//!
//! Where `O_DIRECT` is refused (`EINVAL` when opening or reading), the reader falls back to
//! buffered reads for that file and says so: one `warn!` in the log, and
//! [`ShardReader::direct_io`] turns false so that reports carry it.

use std::alloc::{self, Layout};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

/// Alignment of `O_DIRECT` buffers, offsets and lengths.
pub const ALIGN: usize = 4096;

/// A transparent huge page on x86-64 and most aarch64 kernels.
const HUGE_PAGE: usize = 2 << 20;

#[derive(Clone, Debug, thiserror::Error)]
pub enum IoError {
    #[error("{}: cannot open: {msg}", path.display())]
    Open { path: PathBuf, msg: String },
    #[error("{}: reading bytes {start}..{end}: {msg}", path.display())]
    Read { path: PathBuf, start: u64, end: u64, msg: String },
    #[error("cannot allocate an aligned buffer of {bytes} bytes")]
    Alloc { bytes: usize },
    #[error("{what}: the reader thread panicked (a bug; the read is reported failed)")]
    Panicked { what: String },
}

/// A zero-initialised heap buffer whose address and length are multiples of [`ALIGN`], as
/// `O_DIRECT` requires. Owns its allocation like a `Vec<u8>`.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively, as `Vec<u8>` does; shared references only
// hand out `&[u8]`, so sending or sharing it between threads is as safe as for `Vec<u8>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: see `Send` above; there is no interior mutability.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes rounded up to a multiple of [`ALIGN`] (one block at least).
    /// Zeroed rather than uninitialised because a read may leave alignment padding untouched and
    /// the whole buffer is handed out as `&[u8]`; large zeroed allocations come straight from
    /// fresh pages, so this costs little.
    pub fn zeroed(len: usize) -> Result<Self, IoError> {
        let size = len.max(1).checked_next_multiple_of(ALIGN).ok_or(IoError::Alloc { bytes: len })?;
        let layout = Self::layout(size).ok_or(IoError::Alloc { bytes: size })?;
        // SAFETY: `layout` has a non-zero size (at least ALIGN bytes).
        let ptr = NonNull::new(unsafe { alloc::alloc(layout) }).ok_or(IoError::Alloc { bytes: size })?;
        if layout.align() == HUGE_PAGE {
            // Transparent huge pages where the system gives them on request (the usual
            // `madvise` setting): a decode streams each expert once per token, and with 4 KiB
            // pages every 4 KiB of weights costs a TLB miss. Only a hint; failure changes nothing.
            // SAFETY: the range is the allocation just made, owned by us.
            unsafe { libc::madvise(ptr.as_ptr().cast(), size, libc::MADV_HUGEPAGE) };
        }
        // SAFETY: `ptr` points to `size` writable bytes just allocated; zeroing them (after the
        // hint, so that the pages are faulted in huge where possible) initialises them.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, size) };
        Ok(AlignedBuf { ptr, len: size })
    }

    /// The layout of a buffer of `size` bytes: aligned to a huge page from one huge page on
    /// (so that the huge-page hint can take effect), else to [`ALIGN`].
    fn layout(size: usize) -> Option<Layout> {
        let align = if size >= HUGE_PAGE { HUGE_PAGE } else { ALIGN };
        Layout::from_size_align(size, align).ok()
    }

    /// Bytes allocated (a multiple of [`ALIGN`]).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised (zeroed, then written) bytes owned by `self`,
        // and the borrow of `self` keeps them alive and unaliased by any `&mut`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Self::layout(self.len).expect("the layout was valid when allocated");
        // SAFETY: `ptr` was returned by `alloc` with exactly this layout (`len` is the rounded
        // size passed there, and `layout` depends on it alone).
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// The block-aligned file range enclosing `len` bytes at file offset `start + lead`: what an
/// `O_DIRECT` read has to cover to deliver those bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// File offset of the first block (a multiple of [`ALIGN`]).
    pub start: u64,
    /// Bytes between `start` and the first wanted byte.
    pub lead: usize,
    /// Wanted bytes.
    pub len: usize,
    /// `lead + len` rounded up to a multiple of [`ALIGN`]: the buffer space the span needs.
    pub padded: usize,
}

impl Span {
    pub fn enclosing(offset: u64, len: usize) -> Span {
        let start = offset - offset % ALIGN as u64;
        let lead = (offset - start) as usize;
        Span { start, lead, len, padded: (lead + len).next_multiple_of(ALIGN) }
    }

    /// File offset of the first wanted byte.
    pub fn offset(&self) -> u64 {
        self.start + self.lead as u64
    }

    /// File offset one past the last wanted byte.
    pub fn end(&self) -> u64 {
        self.offset() + self.len as u64
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoOptions {
    /// Never use `O_DIRECT` (to compare with it, or where the page cache is wanted).
    pub force_buffered: bool,
}

struct ShardFile {
    path: PathBuf,
    buffered: File,
    /// The same file opened with `O_DIRECT`, when the file system accepted that.
    direct: Option<File>,
    /// Set when a direct read was refused with `EINVAL`; buffered reads from then on.
    direct_failed: AtomicBool,
}

/// Why one read attempt stopped short.
enum Failure {
    /// The kernel refused `O_DIRECT` for this read (`EINVAL`): retry buffered.
    Unsupported(std::io::Error),
    /// The file ended before the wanted bytes did.
    Eof,
    Os(std::io::Error),
}

/// Open shard files of one checkpoint, read by index. Reads take `&self` and may run from any
/// thread (they are `pread`s).
pub struct ShardReader {
    files: Vec<ShardFile>,
    warned: AtomicBool,
}

impl ShardReader {
    pub fn open(paths: &[PathBuf], opts: IoOptions) -> Result<Self, IoError> {
        let mut reader =
            ShardReader { files: Vec::with_capacity(paths.len()), warned: AtomicBool::new(false) };
        for path in paths {
            let open_err = |e: std::io::Error| IoError::Open { path: path.clone(), msg: e.to_string() };
            let buffered = File::open(path).map_err(open_err)?;
            let direct = if opts.force_buffered {
                None
            } else {
                match open_direct(path) {
                    Ok(f) => Some(f),
                    Err(e) if is_unsupported(&e) => {
                        reader.note_fallback(path, &e.to_string());
                        None
                    }
                    Err(e) => return Err(open_err(e)),
                }
            };
            reader.files.push(ShardFile {
                path: path.clone(),
                buffered,
                direct,
                direct_failed: AtomicBool::new(false),
            });
        }
        Ok(reader)
    }

    /// Whether every file is read with `O_DIRECT` (false once any read fell back to buffered).
    pub fn direct_io(&self) -> bool {
        self.files.iter().all(|f| f.direct.is_some() && !f.direct_failed.load(Ordering::Relaxed))
    }

    pub fn path(&self, shard: usize) -> Option<&Path> {
        self.files.get(shard).map(|f| f.path.as_path())
    }

    /// Reads the bytes of `span` from file `shard` so that `dst[span.lead..span.lead + span.len]`
    /// holds them. `dst` must be `span.padded` bytes long and [`ALIGN`]-aligned (a slice of an
    /// [`AlignedBuf`] at a multiple of `ALIGN`) for `O_DIRECT`; bytes outside the wanted range
    /// may or may not be written. Returns the bytes transferred from the file, padding included.
    pub fn read_into(&self, shard: usize, span: Span, dst: &mut [u8]) -> Result<u64, IoError> {
        let Some(file) = self.files.get(shard) else {
            return Err(IoError::Read {
                path: PathBuf::from(format!("<shard {shard}>")),
                start: span.offset(),
                end: span.end(),
                msg: format!("no such shard (the reader has {})", self.files.len()),
            });
        };
        if dst.len() != span.padded {
            return Err(self.error(
                file,
                span,
                format!("buffer is {} bytes, the span needs {}", dst.len(), span.padded),
            ));
        }
        if let Some(direct) = file.direct.as_ref().filter(|_| !file.direct_failed.load(Ordering::Relaxed)) {
            match read_direct(direct, span, dst) {
                Ok(n) => return Ok(n),
                Err(Failure::Unsupported(e)) => {
                    file.direct_failed.store(true, Ordering::Relaxed);
                    self.note_fallback(&file.path, &format!("direct read refused: {e}"));
                }
                Err(failure) => return Err(self.failure(file, span, failure)),
            }
        }
        read_buffered(&file.buffered, span.offset(), &mut dst[span.lead..span.lead + span.len])
            .map_err(|failure| self.failure(file, span, failure))
    }

    fn note_fallback(&self, path: &Path, reason: &str) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "{}: O_DIRECT is not available ({reason}); reading through the page cache, which can \
                 hide the cost of disk reads",
                path.display()
            );
        }
    }

    fn error(&self, file: &ShardFile, span: Span, msg: String) -> IoError {
        IoError::Read { path: file.path.clone(), start: span.offset(), end: span.end(), msg }
    }

    fn failure(&self, file: &ShardFile, span: Span, failure: Failure) -> IoError {
        let msg = match failure {
            Failure::Eof => {
                let len = match file.buffered.metadata() {
                    Ok(m) => format!("{} bytes", m.len()),
                    Err(e) => format!("unknown length: {e}"),
                };
                format!("the file ends first ({len}): it is truncated or changed since it was indexed")
            }
            Failure::Unsupported(e) | Failure::Os(e) => e.to_string(),
        };
        self.error(file, span, msg)
    }
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path)
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> std::io::Result<File> {
    Err(std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// `EINVAL` is how Linux refuses `O_DIRECT` (at open on file systems without it, at read for
/// a misaligned request); some file systems answer `EOPNOTSUPP`.
fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EOPNOTSUPP))
}

/// Reads `span` block by block through an `O_DIRECT` file into `dst` (`span.padded` bytes).
/// Every request starts on a block boundary: after a short read we re-read from the block that
/// holds the first missing byte. A read that makes no progress means the file ended.
fn read_direct(file: &File, span: Span, dst: &mut [u8]) -> Result<u64, Failure> {
    let need = span.lead + span.len;
    let (mut done, mut transferred) = (0usize, 0u64);
    while done < need {
        let pos = done - done % ALIGN;
        match file.read_at(&mut dst[pos..], span.start + pos as u64) {
            Ok(n) if pos + n > done => {
                done = pos + n;
                transferred += n as u64;
            }
            Ok(_) => return Err(Failure::Eof),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_unsupported(&e) => return Err(Failure::Unsupported(e)),
            Err(e) => return Err(Failure::Os(e)),
        }
    }
    Ok(transferred)
}

/// Reads exactly `dst.len()` bytes at `offset`, looping over short reads and `EINTR`.
fn read_buffered(file: &File, offset: u64, dst: &mut [u8]) -> Result<u64, Failure> {
    let mut done = 0;
    while done < dst.len() {
        match file.read_at(&mut dst[done..], offset + done as u64) {
            Ok(0) => return Err(Failure::Eof),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Failure::Os(e)),
        }
    }
    Ok(done as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `len` bytes whose byte `i` is a function of `i`, in a fresh temp dir.
    fn patterned_file(len: usize) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard.bin");
        let bytes: Vec<u8> = (0..len).map(|i| (i.wrapping_mul(2654435761) >> 7) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        (dir, path, bytes)
    }

    fn read(reader: &ShardReader, offset: u64, len: usize) -> Result<Vec<u8>, IoError> {
        let span = Span::enclosing(offset, len);
        let mut buf = AlignedBuf::zeroed(span.padded)?;
        reader.read_into(0, span, buf.as_mut_slice())?;
        Ok(buf.as_slice()[span.lead..span.lead + len].to_vec())
    }

    #[test]
    fn aligned_buffers_are_aligned_and_zeroed() {
        for len in [0, 1, 4095, 4096, 4097, 1 << 20] {
            let buf = AlignedBuf::zeroed(len).unwrap();
            assert_eq!(buf.as_slice().as_ptr() as usize % ALIGN, 0);
            assert_eq!(buf.len(), len.max(1).next_multiple_of(ALIGN));
            assert!(buf.as_slice().iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn span_encloses_the_range_in_whole_blocks() {
        let s = Span::enclosing(5000, 100);
        assert_eq!(s, Span { start: 4096, lead: 904, len: 100, padded: 4096 });
        let s = Span::enclosing(8192, 4097);
        assert_eq!((s.start, s.lead, s.padded, s.end()), (8192, 0, 8192, 12289));
    }

    #[test]
    fn reads_exact_ranges_direct_and_buffered() {
        let (_dir, path, bytes) = patterned_file(3 * ALIGN + 1234);
        for force_buffered in [false, true] {
            let reader =
                ShardReader::open(std::slice::from_ref(&path), IoOptions { force_buffered }).unwrap();
            // Unaligned starts and ends, a range touching the file's unaligned end, one byte.
            for (offset, len) in
                [(0, 10), (100, 5000), (4096, 4096), (3 * 4096, 1234), (3 * 4096 + 1233, 1), (7, 3 * 4096)]
            {
                let got = read(&reader, offset as u64, len).unwrap();
                assert_eq!(
                    got,
                    bytes[offset..offset + len],
                    "offset {offset} len {len} buffered {force_buffered}"
                );
            }
            if force_buffered {
                assert!(!reader.direct_io());
            }
        }
    }

    #[test]
    fn read_past_the_end_names_file_and_range() {
        let (_dir, path, _) = patterned_file(2 * ALIGN + 10);
        for force_buffered in [false, true] {
            let reader =
                ShardReader::open(std::slice::from_ref(&path), IoOptions { force_buffered }).unwrap();
            let err = read(&reader, 4000, 5000).unwrap_err().to_string();
            assert!(err.contains("shard.bin") && err.contains("4000..9000"), "{err}");
            assert!(err.contains("truncated") && err.contains("8202 bytes"), "{err}");
        }
    }

    /// A misaligned buffer makes the kernel refuse the direct read with EINVAL: the reader must
    /// fall back to buffered reads, still deliver the bytes, and report `direct_io: false`.
    #[test]
    fn refused_direct_read_falls_back_to_buffered() {
        let (_dir, path, bytes) = patterned_file(2 * ALIGN);
        let reader = ShardReader::open(&[path], IoOptions::default()).unwrap();
        if !reader.direct_io() {
            eprintln!("O_DIRECT unavailable on this file system; the fallback happened at open");
        }
        let span = Span::enclosing(4096, 100);
        let mut buf = AlignedBuf::zeroed(2 * ALIGN).unwrap();
        let misaligned = &mut buf.as_mut_slice()[1..1 + span.padded];
        reader.read_into(0, span, misaligned).unwrap();
        assert_eq!(misaligned[..100], bytes[4096..4196]);
        assert!(!reader.direct_io());
        assert_eq!(read(&reader, 10, 20).unwrap(), bytes[10..30]);
    }

    #[test]
    fn missing_file_is_an_open_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            ShardReader::open(&[dir.path().join("nope.safetensors")], IoOptions::default()).err().unwrap();
        assert!(err.to_string().contains("nope.safetensors: cannot open"), "{err}");
    }
}
