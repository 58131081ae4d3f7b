//! Block-quantized weights: ggml's `q8_0` and `q4_0` (see [`DType::Q8_0`], [`DType::Q4_0`]).
//!
//! Quantization follows ggml's reference functions (`quantize_row_q8_0_ref`,
//! `quantize_row_q4_0_ref`) so that a tensor quantized here has the bytes llama.cpp would
//! write. A matrix product against quantized weights works as llama.cpp's CPU backend does:
//! each activation row is quantized to `q8_0` once, and each weight block's dot product with
//! it is an integer sum scaled by the two blocks' scales (`sum += d_w * d_x * sum_i(qw_i *
//! qx_i)`), block by block from the left.
//!
//! The driver ([`matmul_many`]) cuts the rows of every weight of a call into chunks for rayon
//! (tokens too when there are few rows), and covers each chunk with tiles of rows x tokens
//! computed by a path's kernels ([`QTiles`]: the scalar reference here, AVX2 in
//! `x86::quant`). Decode streams each row once; prefill passes every token tile over a panel of
//! rows kept in L2. A tile computes each (row, token) dot product over the whole row in block
//! order with the same operations whatever the tile's shape, so a token's result depends on
//! its own row only: batched equals alone, and threading changes nothing.

use std::ops::Range;

use half::f16;

use crate::matmul::{run_jobs, Out, TileJob, WorkShape};
use crate::{DType, Isa, MatmulOptions, Weight};

/// Elements per quantization block.
pub const QK: usize = 32;

/// Quantizes `src` (a whole number of blocks) to `dtype`'s bytes, as ggml does; a plain
/// dtype is converted (rounded to nearest). Panics if `src.len()` is not whole blocks.
pub fn quantize(dtype: DType, src: &[f32]) -> Vec<u8> {
    let bytes = dtype.bytes(src.len()).unwrap_or_else(|| {
        panic!("quantize: {} values are not whole {} blocks of {}", src.len(), dtype.name(), dtype.block())
    });
    let mut out = Vec::with_capacity(bytes);
    match dtype {
        DType::F32 => src.iter().for_each(|v| out.extend(v.to_le_bytes())),
        DType::F16 => src.iter().for_each(|v| out.extend(f16::from_f32(*v).to_bits().to_le_bytes())),
        DType::BF16 => src.iter().for_each(|v| out.extend(half::bf16::from_f32(*v).to_bits().to_le_bytes())),
        DType::Q8_0 => src.chunks_exact(QK).for_each(|b| q8_0_block(b, &mut out)),
        DType::Q4_0 => src.chunks_exact(QK).for_each(|b| q4_0_block(b, &mut out)),
    }
    out
}

/// `out.len()` elements of `dtype` from `data`, as f32.
pub fn dequantize(dtype: DType, data: &[u8], out: &mut [f32]) {
    crate::to_f32(dtype, data, out)
}

/// ggml's `quantize_row_q8_0_ref` for one block: `d = max|x| / 127`, `q = round(x / d)`.
fn q8_0_block(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(f16::from_f32(d).to_bits().to_le_bytes());
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

/// ggml's `quantize_row_q4_0_ref` for one block: the value of largest magnitude `max` (with
/// its sign) maps to -8: `d = max / -8`, `q = min(15, trunc(x / d + 8.5))`.
fn q4_0_block(x: &[f32], out: &mut Vec<u8>) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(f16::from_f32(d).to_bits().to_le_bytes());
    let q = |v: f32| ((v * id + 8.5) as u8).min(15);
    out.extend((0..QK / 2).map(|j| q(x[j]) | (q(x[j + QK / 2]) << 4)));
}

fn scale(block: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32()
}

/// Element `j` of one block of `dtype`, dequantized.
pub(crate) fn block_value(dtype: DType, block: &[u8], j: usize) -> f32 {
    let d = scale(block);
    match dtype {
        DType::Q8_0 => d * block[2 + j] as i8 as f32,
        DType::Q4_0 => {
            let byte = block[2 + j % (QK / 2)];
            let q = if j < QK / 2 { byte & 0x0F } else { byte >> 4 };
            d * (q as i32 - 8) as f32
        }
        _ => unreachable!("{} is not a block format", dtype.name()),
    }
}

/// Dequantizes whole blocks of `data` into `out`.
pub(crate) fn to_f32(dtype: DType, data: &[u8], out: &mut [f32]) {
    let b = dtype.block_bytes();
    for (o, block) in out.chunks_exact_mut(QK).zip(data.chunks_exact(b)) {
        for (j, v) in o.iter_mut().enumerate() {
            *v = block_value(dtype, block, j);
        }
    }
}

/// The reference dot product of one weight row (whole blocks of `dtype`) with one activation
/// row quantized to q8_0: plain integer loops, blocks summed from the left.
pub(crate) fn dot_scalar(dtype: DType, w: &[u8], x: &[u8]) -> f32 {
    let (wb, xb) = (dtype.block_bytes(), DType::Q8_0.block_bytes());
    let mut sum = 0.0f32;
    for (wblk, xblk) in w.chunks_exact(wb).zip(x.chunks_exact(xb)) {
        let xq = |j: usize| xblk[2 + j] as i8 as i32;
        let dot: i32 = match dtype {
            DType::Q8_0 => (0..QK).map(|j| wblk[2 + j] as i8 as i32 * xq(j)).sum(),
            DType::Q4_0 => (0..QK / 2)
                .map(|j| {
                    let byte = wblk[2 + j];
                    ((byte & 0x0F) as i32 - 8) * xq(j) + ((byte >> 4) as i32 - 8) * xq(j + QK / 2)
                })
                .sum(),
            _ => unreachable!("{} is not a block format", dtype.name()),
        };
        sum += dot as f32 * (scale(wblk) * scale(xblk));
    }
    sum
}

/// Activation rows (`cols` each) quantized to q8_0, one after the other, on `isa`'s path (every
/// path gives the reference's bytes).
pub(crate) fn quantize_rows(isa: Isa, x: &[f32], cols: usize) -> Vec<u8> {
    assert_eq!(x.len() % cols.max(1), 0, "quantize_rows: {} values are not rows of {cols}", x.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            isa.assert_available();
            let mut out = vec![0u8; DType::Q8_0.bytes(x.len()).expect("quantize_rows: whole blocks")];
            // SAFETY: both paths need AVX2, FMA and F16C, which `assert_available` checked.
            unsafe { crate::x86::quant::quantize_q8_0(x, &mut out) };
            out
        }
        _ => quantize(DType::Q8_0, x),
    }
}

/// The operands of one tile: `rows` weight rows from `w` (row `i` starts at byte
/// `i * w_stride`) against `tokens` activation rows quantized to q8_0 (token `t` starts at byte
/// `t * x_stride` of `x`), over `blocks` blocks. `sums[i * tokens + t]` receives row `i` .
/// token `t`, the whole row's dot product.
pub(crate) struct QTile<'a> {
    pub w: &'a [u8],
    pub w_stride: usize,
    pub x: &'a [u8],
    pub x_stride: usize,
    pub blocks: usize,
    /// Whether the rows are streamed from memory once (decode): the kernel prefetches the rows
    /// of the tiles ahead.
    pub streaming: bool,
    pub sums: &'a mut [f32],
}

/// One path's tile kernels for one weight format.
#[derive(Clone, Copy)]
pub(crate) struct QTiles {
    /// Rows per tile by token count: a tile of `t` tokens has `tall[t - 1]` rows, or 1 for the
    /// rows left at the end of a range. `tall.len()` is the most tokens per tile.
    pub tall: &'static [usize],
    /// Computes one tile of shape `(tall[tokens - 1], tokens)` or `(1, tokens)`. Panics if
    /// `args` is too short for the shape.
    ///
    /// # Safety
    /// The CPU must support the ISA the kernel was compiled for.
    pub tile: unsafe fn(rows: usize, tokens: usize, args: &mut QTile),
}

impl QTiles {
    fn row_align(&self) -> usize {
        self.tall.iter().copied().max().unwrap_or(1)
    }
}

/// The reference as tiles of one row and one token.
fn scalar_tiles(dtype: DType) -> QTiles {
    fn tile<const Q4W: bool>(rows: usize, tokens: usize, args: &mut QTile) {
        assert_eq!((rows, tokens), (1, 1), "scalar quantized matmul has no {rows}x{tokens} tile");
        let dtype = if Q4W { DType::Q4_0 } else { DType::Q8_0 };
        let (wb, xb) = (args.blocks * dtype.block_bytes(), args.blocks * DType::Q8_0.block_bytes());
        args.sums[0] = dot_scalar(dtype, &args.w[..wb], &args.x[..xb]);
    }
    let tile = match dtype {
        DType::Q8_0 => tile::<false> as unsafe fn(usize, usize, &mut QTile),
        DType::Q4_0 => tile::<true>,
        _ => unreachable!("{} is not a block format", dtype.name()),
    };
    QTiles { tall: &[1], tile }
}

/// Weight bytes of a row panel in prefill: a quarter of a 1 MiB L2, so that the rows read from
/// memory for the first tokens serve every later token tile from L2.
const PANEL_BYTES: usize = 256 * 1024;

/// `out[t, r] = sum_c x[t, c] * w[r, c]` for every `(w, out)` of `parts` (block-format weights
/// of one column count, `n` tokens), in one parallel job: activations quantized to q8_0 per row
/// once, then integer block dot products (see the module documentation).
///
/// Threads split the rows of all the weights into chunks of about equal work, and the tokens
/// too where a weight has too few rows to go round; small products stay on the calling thread.
/// Each (row, token) dot product is one kernel call over the whole row, in block order, so its
/// value does not depend on the split or on the other tokens.
pub(crate) fn matmul_many(opts: MatmulOptions, x: &[f32], parts: &mut [(Weight, &mut [f32])], n: usize) {
    let Some(cols) = parts.first().map(|(w, _)| w.cols) else { return };
    if n == 0 {
        return;
    }
    opts.isa.assert_available();
    let xq = quantize_rows(opts.isa, x, cols);
    let tiles = |w: &Weight| {
        debug_assert!(w.dtype.is_block() && w.cols == cols);
        match opts.isa {
            Isa::Scalar => scalar_tiles(w.dtype),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 => crate::x86::quant::tiles(w.dtype),
            #[allow(unreachable_patterns)]
            isa => unreachable!("{isa:?} passed assert_available on a CPU without it"),
        }
    };
    let weights: Vec<Weight> = parts.iter().map(|(w, _)| *w).collect();
    let jobs: Vec<Job> = weights.iter().map(|w| Job { tiles: tiles(w), w, xq: &xq }).collect();
    // The same split as plain weights' (and the same size below which a call stays on the
    // calling thread).
    run_jobs(opts.threading, &jobs, parts, n);
}

/// One weight of a call, prepared.
struct Job<'a> {
    tiles: QTiles,
    w: &'a Weight<'a>,
    /// The activations quantized to q8_0, one row per token.
    xq: &'a [u8],
}

impl TileJob for Job<'_> {
    fn shape(&self) -> WorkShape {
        let (rows, cols) = (self.w.rows, self.w.cols);
        WorkShape { rows, cols, row_align: self.tiles.row_align(), max_tokens: self.tiles.tall.len() }
    }

    fn compute(&self, rows: Range<usize>, tokens: Range<usize>, out: &mut Out) {
        Job::compute(self, rows, tokens, out)
    }
}

impl Job<'_> {
    /// Computes `out[t, r]` for rows `range` and tokens `tokens`. Decode (all tokens in one
    /// tile) streams the rows once; prefill passes every token tile over a panel of rows that
    /// stays in L2.
    fn compute(&self, range: Range<usize>, tokens: Range<usize>, out: &mut Out) {
        let max_tokens = self.tiles.tall.len();
        let streaming = tokens.len() <= max_tokens;
        let align = self.tiles.row_align();
        let panel = match streaming {
            true => range.len().max(1),
            false => (PANEL_BYTES / self.w.row_bytes().max(1) / align * align).max(align),
        };
        for p0 in range.clone().step_by(panel) {
            let p1 = (p0 + panel).min(range.end);
            for t0 in tokens.clone().step_by(max_tokens) {
                let count = max_tokens.min(tokens.end - t0);
                let tall = self.tiles.tall[count - 1];
                let mut r = p0;
                while r < p1 {
                    let rows = if p1 - r >= tall { tall } else { 1 };
                    self.tile(r, rows, (t0, count), streaming, out);
                    r += rows;
                }
            }
        }
    }

    /// Rows `r0..r0 + rows` against tokens `t0..t0 + tokens`, written to `out`.
    fn tile(&self, r0: usize, rows: usize, (t0, tokens): (usize, usize), streaming: bool, out: &mut Out) {
        let (wb, xb) = (self.w.row_bytes(), DType::Q8_0.bytes(self.w.cols).expect("whole blocks"));
        let mut sums = [0.0f32; MAX_TILE];
        let mut args = QTile {
            w: &self.w.data[r0 * wb..(r0 + rows) * wb],
            w_stride: wb,
            x: &self.xq[t0 * xb..(t0 + tokens) * xb],
            x_stride: xb,
            blocks: self.w.cols / QK,
            streaming,
            sums: &mut sums[..rows * tokens],
        };
        // SAFETY: `matmul_many` checked that the CPU supports the kernels' ISA, and
        // `(rows, tokens)` is one of the shapes `QTiles::tile` accepts.
        unsafe { (self.tiles.tile)(rows, tokens, &mut args) };
        for i in 0..rows {
            for t in 0..tokens {
                out.set((t0 + t) * self.w.rows + r0 + i, sums[i * tokens + t]);
            }
        }
    }
}

/// Most `rows * tokens` of any tile shape.
const MAX_TILE: usize = 16;
