//! Block-quantized weights: ggml's `q8_0` and `q4_0` (see [`DType::Q8_0`], [`DType::Q4_0`]).
//!
//! Quantization follows ggml's reference functions (`quantize_row_q8_0_ref`,
//! `quantize_row_q4_0_ref`) so that a tensor quantized here has the bytes llama.cpp would
//! write. A matrix product against quantized weights works as llama.cpp's CPU backend does:
//! each activation row is quantized to `q8_0` once, and each weight block's dot product with
//! it is an integer sum scaled by the two blocks' scales (`sum += d_w * d_x * sum_i(qw_i *
//! qx_i)`), block by block from the left. A token's result depends on its own row only, so
//! batched equals alone.

use half::f16;
use rayon::prelude::*;

use crate::{DType, Isa, MatmulOptions, Threading, Weight};

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

/// The dot product of one weight row (whole blocks of `dtype`) with one activation row
/// quantized to q8_0, block by block from the left.
type RowDot = fn(dtype: DType, w: &[u8], x: &[u8]) -> f32;

/// The reference: plain integer loops.
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

/// Below this many multiply-adds a product stays on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 16;

/// `out[t, r] = sum_c x[t, c] * w[r, c]` for a block-format `w`: activations quantized to
/// q8_0 per row, then integer block dot products (see the module documentation).
pub(crate) fn matmul(opts: MatmulOptions, x: &[f32], w: &Weight, out: &mut [f32], n: usize) {
    debug_assert!(w.dtype.is_block());
    let dot: RowDot = match opts.isa {
        Isa::Scalar => dot_scalar,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => dot_scalar,
        #[allow(unreachable_patterns)]
        isa => unreachable!("{isa:?} passed assert_available on a CPU without it"),
    };
    let xq: Vec<u8> = x.chunks_exact(w.cols).flat_map(|row| quantize(DType::Q8_0, row)).collect();
    let (wb, xb) = (w.row_bytes(), DType::Q8_0.bytes(w.cols).expect("whole blocks"));
    let row = |r: usize, t: usize| dot(w.dtype, &w.data[r * wb..(r + 1) * wb], &xq[t * xb..(t + 1) * xb]);
    let parallel = match opts.threading {
        Threading::Single => false,
        Threading::Parallel => true,
        Threading::Auto => rayon::current_num_threads() > 1 && w.rows * w.cols * n >= PARALLEL_MIN_MACS,
    };
    // Output is token-major (`out[t * rows + r]`); each task takes one token's rows.
    if parallel {
        out.par_chunks_mut(w.rows.max(1)).enumerate().for_each(|(t, o)| {
            o.par_chunks_mut(64).enumerate().for_each(|(c, o)| {
                for (i, v) in o.iter_mut().enumerate() {
                    *v = row(c * 64 + i, t);
                }
            })
        });
    } else {
        for (t, o) in out.chunks_mut(w.rows.max(1)).enumerate() {
            for (r, v) in o.iter_mut().enumerate() {
                *v = row(r, t);
            }
        }
    }
}
