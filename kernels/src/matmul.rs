//! The matmul driver, shared by every SIMD path.
//!
//! `out[t, r] = sum_c x[t, c] * w[r, c]` is cut three ways:
//! - **threads**: output rows are split into chunks, one rayon task each, and tokens too when
//!   there are too few rows to go round (small problems stay on the calling thread, where a
//!   fork-join would cost more than the work);
//! - **cache blocks**: with more tokens than one tile holds (prefill), columns are cut into
//!   chunks whose x for one tile's tokens fits in L1 ([`X_TILE_BYTES`]), and rows into panels
//!   whose weights for one chunk fit in L2 ([`PANEL_BYTES`]); every token block then passes over
//!   a panel read once from memory. Decode streams whole rows instead;
//! - **tiles**: a panel is covered by tiles of `rows x tokens`, each computed by an ISA's
//!   micro-kernel ([`Micro`]) that loads and converts a block of each weight row once and uses it
//!   for every token of the tile. Decode (one token) uses tall tiles: more rows in flight keep
//!   more memory reads outstanding (8 rows measured faster than 4 or 16 on Zen 4).
//!
//! Micro-kernels cover whole SIMD blocks of columns; the driver adds the few columns left over
//! (`cols % block`) with scalar code.

use std::borrow::Cow;
use std::ops::Range;

use rayon::prelude::*;

use crate::{read_f32, scalar, Isa, Weight};

/// Weight bytes per panel (rows x column chunk): a quarter of Zen 4's 1 MiB L2, so that a panel
/// read once from memory serves every token block from L2.
const PANEL_BYTES: usize = 256 * 1024;

/// Bytes of x one tile's tokens may occupy within a column chunk: half of Zen 4's 32 KiB L1D,
/// leaving the rest to the weight rows streaming through.
const X_TILE_BYTES: usize = 16 * 1024;

/// Most `rows * tokens` of any tile shape.
const MAX_TILE: usize = 32;

/// Below this many multiply-adds a matmul runs on the calling thread: about 30 us of one core,
/// several times the cost of waking rayon's workers.
const PARALLEL_MIN_MACS: usize = 1 << 20;

/// Chunks per rayon thread: more than one so that a core slowed by other work gets fewer.
const CHUNKS_PER_THREAD: usize = 4;

/// How a matmul uses threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threading {
    /// Split across rayon's pool when the matmul is large enough to gain from it.
    Auto,
    /// Stay on the calling thread (for callers that parallelise at a coarser grain).
    Single,
    /// Always split across rayon's pool, however small (tests and benchmarks).
    Parallel,
}

/// How [`crate::matmul_with`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulOptions {
    pub isa: Isa,
    pub threading: Threading,
}

impl Default for MatmulOptions {
    /// The best path the CPU has, on all cores when worth it.
    fn default() -> Self {
        MatmulOptions { isa: Isa::detect(), threading: Threading::Auto }
    }
}

/// How a micro-kernel wants the activations laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum XLayout {
    /// As given: token `t` is `x[t * cols..][..cols]`.
    Plain,
    /// Within each block of columns, the even-indexed elements first, then the odd ones. A bf16
    /// kernel then widens a block of weights with one shift (even elements) and one mask (odd
    /// elements) instead of lane-crossing shuffles; x is permuted once per call instead.
    EvenOdd,
}

/// The operands of one tile: `rows` weight rows from `w` (row `i` starts at byte
/// `i * w_stride`) against `tokens` rows of x (token `t` starts at `x[t * x_stride]`), over the
/// first `blocks` blocks of columns. `sums[i * tokens + t]` receives row `i` . token `t`.
///
/// The kernel reduces its vector accumulators to a scalar every `segment` blocks and adds the
/// segments' sums left to right (`((s0 + s1) + s2) + ...`): the same association the driver
/// uses when it cuts the columns into chunks of `segment` blocks for prefill, so a dot product
/// rounds the same way whatever the number of tokens (see [`Micro::segment`]).
pub(crate) struct TileArgs<'a> {
    pub w: &'a [u8],
    pub w_stride: usize,
    pub x: &'a [f32],
    pub x_stride: usize,
    pub blocks: usize,
    pub segment: usize,
    /// Whether the tile's rows are streamed from memory once (few tokens: decode), so the
    /// kernel prefetches the rows ahead; with many tokens a panel of rows is read from L2 by
    /// every token block, and prefetching ahead there cost 30-45% of the prefill's speed.
    pub streaming: bool,
    pub sums: &'a mut [f32],
}

/// One ISA's micro-kernels for one weight dtype.
#[derive(Clone, Copy)]
pub(crate) struct Micro {
    /// Columns per SIMD block.
    pub block: usize,
    pub x_layout: XLayout,
    /// Rows per tile by token count: a tile of `t` tokens has `tall[t - 1]` rows (or 1, for
    /// the rows left over at the end of a panel). `tall.len()` is the most tokens per tile.
    pub tall: &'static [usize],
    /// Computes one tile of shape `(rows, tokens)`, which must be `(tall[tokens - 1], tokens)` or
    /// `(1, tokens)`. Panics if `args` is too short for the shape.
    ///
    /// # Safety
    /// The CPU must support the ISA the kernel was compiled for.
    pub tile: unsafe fn(rows: usize, tokens: usize, args: &mut TileArgs),
}

impl Micro {
    /// Row chunks and panels are multiples of this, so that only the last one has rows left
    /// over for 1-row tiles.
    fn row_align(&self) -> usize {
        self.tall.iter().copied().max().unwrap_or(1)
    }

    /// Blocks of columns per reduction segment: the column chunk of prefill, whose x for one
    /// tile's tokens fits in L1 ([`X_TILE_BYTES`]). Decode streams whole rows but reduces at
    /// the same boundaries, so that every output element is summed in the same order whatever
    /// the number of tokens: a token's logits do not depend on which other tokens share its
    /// batch (the engine's "batched equals alone" invariant).
    pub(crate) fn segment(&self) -> usize {
        (X_TILE_BYTES / (self.tall.len() * self.block * size_of::<f32>())).max(1)
    }
}

/// Checks the operand lengths and returns the number of tokens.
fn tokens(x: &[f32], w: &Weight, out: &[f32]) -> usize {
    assert!(w.cols > 0 || x.is_empty(), "matmul: weight has no columns but x has {} elements", x.len());
    let n = x.len().checked_div(w.cols).unwrap_or(0);
    assert_eq!(x.len(), n * w.cols, "matmul: x length {} is not a multiple of cols {}", x.len(), w.cols);
    assert_eq!(out.len(), n * w.rows, "matmul: out length {} != {n} tokens x {} rows", out.len(), w.rows);
    assert_eq!(
        w.data.len(),
        w.rows * w.row_bytes(),
        "matmul: {}x{} {} weight has {} bytes",
        w.rows,
        w.cols,
        w.dtype.name(),
        w.data.len()
    );
    n
}

/// See [`crate::matmul_with`].
pub(crate) fn matmul_with(opts: MatmulOptions, x: &[f32], w: &Weight, out: &mut [f32]) {
    matmul_many_with(opts, x, &mut [(*w, out)])
}

/// See [`crate::matmul_many`]: every `(w, out)` against the same `x`, in one parallel job.
pub(crate) fn matmul_many_with(opts: MatmulOptions, x: &[f32], parts: &mut [(Weight, &mut [f32])]) {
    let Some(n) = parts.iter().map(|(w, out)| tokens(x, w, out)).reduce(|a, b| {
        assert_eq!(a, b, "matmul_many: the weights disagree on the number of tokens");
        a
    }) else {
        return;
    };
    opts.isa.assert_available();
    if parts.iter().any(|(w, _)| w.dtype.is_block()) {
        // Block formats have their own driver (one parallel job for all of them); plain weights
        // of the same call keep theirs.
        let (mut blocks, mut plain): (Vec<_>, Vec<_>) =
            parts.iter_mut().map(|(w, out)| (*w, &mut **out)).partition(|(w, _)| w.dtype.is_block());
        crate::quant::matmul_many(opts, x, &mut blocks, n);
        if !plain.is_empty() {
            matmul_many_with(opts, x, &mut plain);
        }
        return;
    }
    if opts.isa == Isa::Scalar {
        for (w, out) in parts.iter_mut() {
            scalar::matmul(x, w, out, n);
        }
        return;
    }
    let micro = |w: &Weight| match opts.isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => crate::x86::avx2::micro(w.dtype),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => crate::x86::avx512::micro(w.dtype),
        isa => unreachable!("{isa:?} passed assert_available on a CPU without it"),
    };
    if n == 0 {
        return;
    }
    let weights: Vec<Weight> = parts.iter().map(|(w, _)| *w).collect();
    let jobs: Vec<Job> = weights.iter().map(|w| Job::new(micro(w), x, w)).collect();
    run_jobs(opts.threading, &jobs, parts, n);
}

/// One weight of a call, prepared for its tiles: what [`run_jobs`] needs of it.
pub(crate) trait TileJob: Sync {
    fn shape(&self) -> WorkShape;
    /// Computes `out[t, r]` for rows `rows` and tokens `tokens`.
    fn compute(&self, rows: Range<usize>, tokens: Range<usize>, out: &mut Out);
}

/// Runs `jobs` (one per entry of `parts`, whose outputs they write) over `n` tokens: split
/// among the threads by [`split_work`], or all on the calling thread.
pub(crate) fn run_jobs<J: TileJob>(
    threading: Threading,
    jobs: &[J],
    parts: &mut [(Weight, &mut [f32])],
    n: usize,
) {
    let shapes: Vec<WorkShape> = jobs.iter().map(TileJob::shape).collect();
    let Some(work) = split_work(threading, &shapes, n) else {
        for ((job, shape), (_, out)) in jobs.iter().zip(&shapes).zip(parts.iter_mut()) {
            job.compute(0..shape.rows, 0..n, &mut Out::Whole(out));
        }
        return;
    };
    let shared: Vec<SharedOut> = parts.iter_mut().map(|(_, out)| SharedOut::new(out)).collect();
    work.into_par_iter().for_each(|(j, rows, tokens)| {
        jobs[j].compute(rows, tokens, &mut Out::Shared(&shared[j]));
    });
}

/// What [`split_work`] needs of one weight of a call.
pub(crate) struct WorkShape {
    pub rows: usize,
    pub cols: usize,
    /// Row chunks are multiples of this (the tallest tile).
    pub row_align: usize,
    /// Most tokens per tile.
    pub max_tokens: usize,
}

/// The parallel tasks of a call over `weights` and `n` tokens, each `(weight, rows, tokens)`;
/// `None` when the call should stay on the calling thread (too small for a fork-join, or
/// `Threading::Single`). Each weight's rows are cut into chunks of about the same number of
/// multiply-adds, and tokens too where a weight has too few rows to go round.
fn split_work(threading: Threading, weights: &[WorkShape], n: usize) -> Option<Vec<Work>> {
    let threads = rayon::current_num_threads();
    let macs: usize = weights.iter().map(|w| w.rows * w.cols * n).sum();
    let parallel = match threading {
        Threading::Single => false,
        Threading::Parallel => true,
        Threading::Auto => threads > 1 && macs >= PARALLEL_MIN_MACS,
    };
    if !parallel {
        return None;
    }
    let tasks = threads * CHUNKS_PER_THREAD;
    let mut work: Vec<Work> = Vec::new();
    for (j, w) in weights.iter().enumerate().filter(|(_, w)| w.rows > 0) {
        let share = (w.rows * w.cols * n * tasks).div_ceil(macs.max(1)).max(1);
        let row_chunk = w.rows.div_ceil(share).next_multiple_of(w.row_align);
        let row_chunks = w.rows.div_ceil(row_chunk);
        let token_chunks = share.div_ceil(row_chunks).min(n.div_ceil(w.max_tokens));
        let token_chunk = n.div_ceil(token_chunks).next_multiple_of(w.max_tokens);
        for rc in 0..row_chunks {
            for tc in 0..n.div_ceil(token_chunk) {
                let rows = rc * row_chunk..((rc + 1) * row_chunk).min(w.rows);
                work.push((j, rows, tc * token_chunk..((tc + 1) * token_chunk).min(n)));
            }
        }
    }
    Some(work)
}

/// One parallel task: (weight of the call, its rows, tokens).
pub(crate) type Work = (usize, Range<usize>, Range<usize>);

/// One matmul call, prepared.
struct Job<'a> {
    micro: Micro,
    w: &'a Weight<'a>,
    /// Activations as given (for the scalar column tail).
    x: &'a [f32],
    /// Activations in the micro-kernel's layout, `x_stride` apart.
    xk: Cow<'a, [f32]>,
    x_stride: usize,
    /// Whole SIMD blocks per row; columns from `blocks * block` on are the scalar tail.
    blocks: usize,
}

impl TileJob for Job<'_> {
    fn shape(&self) -> WorkShape {
        let (rows, cols) = (self.w.rows, self.w.cols);
        WorkShape { rows, cols, row_align: self.micro.row_align(), max_tokens: self.micro.tall.len() }
    }

    fn compute(&self, rows: Range<usize>, tokens: Range<usize>, out: &mut Out) {
        Job::compute(self, rows, tokens, out)
    }
}

impl<'a> Job<'a> {
    fn new(micro: Micro, x: &'a [f32], w: &'a Weight<'a>) -> Self {
        let blocks = w.cols / micro.block;
        let (xk, x_stride) = match micro.x_layout {
            XLayout::Plain => (Cow::Borrowed(x), w.cols),
            XLayout::EvenOdd => (Cow::Owned(even_odd(x, w.cols, micro.block)), blocks * micro.block),
        };
        Job { micro, w, x, xk, x_stride, blocks }
    }

    /// Computes `out[t, r]` for rows `range` and tokens `tokens`.
    fn compute(&self, range: Range<usize>, tokens: Range<usize>, out: &mut Out) {
        let m = &self.micro;
        let max_tokens = m.tall.len();
        // Column chunk, in blocks. When all tokens fit one tile, each weight is used once:
        // stream whole rows (long sequential reads suit the prefetcher). Otherwise cut the
        // columns so that a tile's tokens of x stay in L1 while the panel's rows pass over them.
        let streaming = tokens.len() <= max_tokens;
        let chunk = if streaming { self.blocks.max(1) } else { m.segment() };
        let align = m.row_align();
        let chunk_bytes = chunk * m.block * self.w.dtype.size();
        let panel = (PANEL_BYTES / chunk_bytes / align * align).max(align);
        for p0 in range.clone().step_by(panel) {
            let p1 = (p0 + panel).min(range.end);
            // With no whole block (cols < block) this is one empty chunk, for the column tail.
            for k0 in (0..self.blocks.max(1)).step_by(chunk) {
                let ks = k0..(k0 + chunk).min(self.blocks);
                for t0 in tokens.clone().step_by(max_tokens) {
                    let count = max_tokens.min(tokens.end - t0);
                    let tall = m.tall[count - 1];
                    let mut r = p0;
                    while r < p1 {
                        let rows = if p1 - r >= tall { tall } else { 1 };
                        self.tile(r, rows, (t0, count), ks.clone(), streaming, out);
                        r += rows;
                    }
                }
            }
        }
    }

    /// Rows `r0..r0 + rows` against tokens `t0..t0 + tokens` over column blocks `ks`: the first
    /// chunk is stored to `out`, later ones are added, and the last one adds the scalar column
    /// tail, so that `out = ((s0 + s1) + ...) + tail` as the tile kernels sum their segments.
    fn tile(
        &self,
        r0: usize,
        rows: usize,
        (t0, tokens): (usize, usize),
        ks: Range<usize>,
        streaming: bool,
        out: &mut Out,
    ) {
        let (cols, total_rows, block) = (self.w.cols, self.w.rows, self.micro.block);
        let row_bytes = cols * self.w.dtype.size();
        let mut sums = [0.0f32; MAX_TILE];
        let sums = &mut sums[..rows * tokens];
        if !ks.is_empty() {
            let mut args = TileArgs {
                w: &self.w.data
                    [r0 * row_bytes + ks.start * block * self.w.dtype.size()..(r0 + rows) * row_bytes],
                w_stride: row_bytes,
                x: &self.xk[t0 * self.x_stride + ks.start * block..(t0 + tokens) * self.x_stride],
                x_stride: self.x_stride,
                blocks: ks.len(),
                segment: self.micro.segment(),
                streaming,
                sums,
            };
            // SAFETY: `matmul_with` checked that the CPU supports the micro-kernel's ISA, and
            // `(rows, tokens)` is one of the shapes `Micro::tile` accepts.
            unsafe { (self.micro.tile)(rows, tokens, &mut args) };
        }
        let (first, last) = (ks.start == 0, ks.end >= self.blocks);
        let body = self.blocks * block;
        for i in 0..rows {
            let r = r0 + i;
            for t in 0..tokens {
                let at = (t0 + t) * total_rows + r;
                let s = sums[i * tokens + t];
                let mut v = match (first, ks.is_empty()) {
                    (_, true) => 0.0,
                    (true, false) => s,
                    (false, false) => out.get(at) + s,
                };
                if last && body < cols {
                    let xt = &self.x[(t0 + t) * cols..(t0 + t + 1) * cols];
                    let tail: f32 =
                        (body..cols).map(|c| xt[c] * read_f32(self.w.dtype, self.w.data, r * cols + c)).sum();
                    v = if ks.is_empty() { tail } else { v + tail };
                }
                out.set(at, v);
            }
        }
    }
}

/// `x` (tokens of `cols`) with each whole block of `block` columns reordered even elements
/// first, then odd; the column tail is dropped (the driver reads it from `x`).
fn even_odd(x: &[f32], cols: usize, block: usize) -> Vec<f32> {
    let body = cols / block * block;
    let mut out = Vec::with_capacity(x.len() / cols.max(1) * body);
    for token in x.chunks_exact(cols) {
        for b in token[..body].chunks_exact(block) {
            out.extend(b.iter().step_by(2));
            out.extend(b.iter().skip(1).step_by(2));
        }
    }
    out
}

/// Where tiles write: the caller's slice, or the same slice shared by parallel tasks.
pub(crate) enum Out<'a, 'b> {
    Whole(&'a mut [f32]),
    Shared(&'a SharedOut<'b>),
}

impl Out<'_, '_> {
    #[inline]
    pub(crate) fn set(&mut self, i: usize, v: f32) {
        match self {
            Out::Whole(out) => out[i] = v,
            // SAFETY: a task only touches `out[t, r]` for its own rows and tokens, and the tasks'
            // (rows x tokens) blocks are disjoint.
            Out::Shared(out) => unsafe { out.write(i, v) },
        }
    }

    #[inline]
    fn get(&self, i: usize) -> f32 {
        match self {
            Out::Whole(out) => out[i],
            // SAFETY: as for `set`.
            Out::Shared(out) => unsafe { out.read(i) },
        }
    }
}

/// The output slice shared by tasks that write disjoint elements of it. A task's rows are
/// strided in `out` (`out[t * rows + r]`), so the slice cannot be split into chunks.
pub(crate) struct SharedOut<'a> {
    ptr: *mut f32,
    len: usize,
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: `SharedOut` is only written through `write`, whose contract makes the writes of
// different threads disjoint; f32 has no drop or interior state.
unsafe impl Send for SharedOut<'_> {}
// SAFETY: as for `Send`.
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    pub(crate) fn new(out: &'a mut [f32]) -> Self {
        SharedOut { ptr: out.as_mut_ptr(), len: out.len(), _out: std::marker::PhantomData }
    }

    /// # Safety
    /// No other thread may access element `i` while the `SharedOut` lives.
    #[inline]
    unsafe fn read(&self, i: usize) -> f32 {
        assert!(i < self.len, "matmul output index {i} out of {}", self.len);
        // SAFETY: `i` is in bounds of the borrowed slice, and the caller guarantees exclusive
        // access to element `i`.
        unsafe { self.ptr.add(i).read() }
    }

    /// # Safety
    /// No other thread may access element `i` while the `SharedOut` lives.
    #[inline]
    unsafe fn write(&self, i: usize, v: f32) {
        assert!(i < self.len, "matmul output index {i} out of {}", self.len);
        // SAFETY: `i` is in bounds of the borrowed slice, and the caller guarantees exclusive
        // access to element `i`.
        unsafe { self.ptr.add(i).write(v) }
    }
}
