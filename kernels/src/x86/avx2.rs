//! AVX2 + FMA + F16C matmul micro-kernels: the same scheme as `avx512.rs` with 16-column blocks
//! (one 32-byte half line of a bf16/f16 row) widened into two 8-lane f32 vectors.
//!
//! With 16 vector registers, decode uses 4-row tiles (4 accumulators, 8 widened weight vectors,
//! 2 x vectors), 2 tokens 4 rows, and 3-4 tokens 2 rows (8 accumulators, 4 + 2).

use std::arch::x86_64::*;

use super::{hsum256, prefetch_ahead};
use crate::matmul::{Micro, TileArgs, XLayout};
use crate::DType;

/// Rows per tile by token count (see `Micro::tall`).
const TALL: [usize; 4] = [4, 4, 2, 2];

const BLOCK: usize = 16;

const BF16: u8 = 0;
const F16: u8 = 1;
const F32: u8 = 2;

pub(crate) fn micro(dtype: DType) -> Micro {
    let tile = match dtype {
        DType::BF16 => tile_bf16 as unsafe fn(usize, usize, &mut TileArgs),
        DType::F16 => tile_f16,
        DType::F32 => tile_f32,
        DType::Q8_0 | DType::Q4_0 => unreachable!("block formats have their own driver"),
    };
    let x_layout = if dtype == DType::BF16 { XLayout::EvenOdd } else { XLayout::Plain };
    Micro { block: BLOCK, x_layout, tall: &TALL, tile }
}

/// Instantiates the tile shapes `micro` declares and picks one at run time.
macro_rules! dispatch {
    ($name:ident, $d:expr) => {
        /// # Safety
        /// The CPU must support AVX2, FMA and F16C.
        unsafe fn $name(rows: usize, tokens: usize, args: &mut TileArgs) {
            // SAFETY: the caller guarantees AVX2, FMA and F16C.
            unsafe {
                match (rows, tokens) {
                    (4, 1) => tile::<$d, 4, 1>(args),
                    (4, 2) => tile::<$d, 4, 2>(args),
                    (2, 3) => tile::<$d, 2, 3>(args),
                    (2, 4) => tile::<$d, 2, 4>(args),
                    (1, 1) => tile::<$d, 1, 1>(args),
                    (1, 2) => tile::<$d, 1, 2>(args),
                    (1, 3) => tile::<$d, 1, 3>(args),
                    (1, 4) => tile::<$d, 1, 4>(args),
                    _ => unreachable!("avx2 matmul has no {rows}x{tokens} tile"),
                }
            }
        }
    };
}

dispatch!(tile_bf16, BF16);
dispatch!(tile_f16, F16);
dispatch!(tile_f32, F32);

/// Bytes of one block of a weight row of dtype `D`.
const fn block_bytes(d: u8) -> usize {
    if d == F32 {
        BLOCK * 4
    } else {
        BLOCK * 2
    }
}

/// One block of a weight row as two f32 vectors: for bf16 (even, odd) elements, otherwise
/// (first 8, last 8).
///
/// # Safety
/// `p` must point to `block_bytes(D)` readable bytes (any alignment).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_block<const D: u8>(p: *const u8) -> (__m256, __m256) {
    // SAFETY (all arms): the caller guarantees `block_bytes(D)` readable bytes at `p`; the loads
    // are unaligned loads.
    unsafe {
        match D {
            BF16 => {
                let v = _mm256_loadu_si256(p as *const __m256i);
                let even = _mm256_slli_epi32::<16>(v);
                let odd = _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF_0000u32 as i32));
                (_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd))
            }
            F16 => {
                let lo = _mm_loadu_si128(p as *const __m128i);
                let hi = _mm_loadu_si128(p.add(16) as *const __m128i);
                (_mm256_cvtph_ps(lo), _mm256_cvtph_ps(hi))
            }
            _ => (_mm256_loadu_ps(p as *const f32), _mm256_loadu_ps(p.add(32) as *const f32)),
        }
    }
}

/// `R` weight rows x `T` tokens over `args.blocks` blocks; see [`TileArgs`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // r and t index several arrays at once
unsafe fn tile<const D: u8, const R: usize, const T: usize>(args: &mut TileArgs) {
    let (ws, xs, blocks) = (args.w_stride, args.x_stride, args.blocks);
    assert!(blocks >= 1);
    assert!(args.w.len() >= (R - 1) * ws + blocks * block_bytes(D), "avx2 tile: weight rows too short");
    assert!(args.x.len() >= (T - 1) * xs + blocks * BLOCK, "avx2 tile: x rows too short");
    assert!(args.sums.len() >= R * T);
    let (w, x) = (args.w.as_ptr(), args.x.as_ptr());
    let segment = args.segment.max(1);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for s0 in (0..blocks).step_by(segment) {
        for b in s0..(s0 + segment).min(blocks) {
            // x for every token first, then one weight row at a time: each widened row is used
            // as soon as it is loaded, which keeps register pressure to R*T + 2*T + 2 vectors.
            let mut x_lo = [_mm256_setzero_ps(); T];
            let mut x_hi = [_mm256_setzero_ps(); T];
            for t in 0..T {
                // SAFETY: token t < T, block b < blocks: in bounds by the length assert above.
                unsafe {
                    let p = x.add(t * xs + b * BLOCK);
                    x_lo[t] = _mm256_loadu_ps(p);
                    x_hi[t] = _mm256_loadu_ps(p.add(8));
                }
            }
            if args.streaming {
                prefetch_ahead(w, ws, b, block_bytes(D), R);
            }
            for r in 0..R {
                // SAFETY: row r < R, block b < blocks: in bounds by the length assert above.
                let (lo, hi) = unsafe { load_block::<D>(w.add(r * ws + b * block_bytes(D))) };
                for t in 0..T {
                    acc[r][t] = _mm256_fmadd_ps(lo, x_lo[t], acc[r][t]);
                    acc[r][t] = _mm256_fmadd_ps(hi, x_hi[t], acc[r][t]);
                }
            }
        }
        // End of a segment: reduce, and add to the sums of the earlier segments.
        for r in 0..R {
            for t in 0..T {
                let s = hsum256(acc[r][t]);
                let sum = &mut args.sums[r * T + t];
                *sum = if s0 == 0 { s } else { *sum + s };
                acc[r][t] = _mm256_setzero_ps();
            }
        }
    }
}
