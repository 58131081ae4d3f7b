//! AVX-512F matmul micro-kernels. A block is 32 columns: one 64-byte cache line of a bf16/f16
//! row (two of an f32 row), widened into two 16-lane f32 vectors.
//!
//! bf16 is widened exactly by integer ops: the low half of each 32-bit lane shifted up gives the
//! even element, the high half masked gives the odd one (x comes permuted to match, see
//! `XLayout::EvenOdd`). AVX512_BF16's `vdpbf16ps` is not used: it needs x as bf16, so keeping
//! f32 accuracy means splitting x into three bf16 terms (three dot-products per weight vector),
//! and on Zen 4 that decode GEMV ran no faster than this path (both about 20 GB/s on a
//! 14336x4096 matrix, bound by memory, not instructions).
//!
//! Tile shapes (rows x tokens): 8x1 for decode (8 rows of cache lines in flight; 4 and 16
//! measured slower), 8x2, and 4x3 / 4x4 for prefill. A 4x4 tile keeps 16 accumulators, 8 x
//! vectors, a widened weight pair and the bf16 mask in registers and reaches about 47 GMAC/s on
//! one Zen 4 core, 80% of its measured FMA peak of 58 GMAC/s (5x4 was no faster; 6x4, 3x8 and
//! 2x8 were slower).
//!
//! The kernels also enable AVX512VL. Without it the 256-bit ops of the final horizontal sums
//! cannot address zmm16-31, so LLVM keeps the accumulators in zmm0-15 and spills and shuffles
//! them inside the loop (16 extra moves per block in the 4x4 tile; the 8x2 tile spilled).

use std::arch::x86_64::*;

use super::prefetch_ahead;
use crate::matmul::{Micro, TileArgs, XLayout};
use crate::DType;

/// Rows per tile by token count (see `Micro::tall`).
const TALL: [usize; 4] = [8, 8, 4, 4];

const BLOCK: usize = 32;

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
        /// The CPU must support AVX-512F.
        unsafe fn $name(rows: usize, tokens: usize, args: &mut TileArgs) {
            // SAFETY: the caller guarantees AVX-512F.
            unsafe {
                match (rows, tokens) {
                    (8, 1) => tile::<$d, 8, 1>(args),
                    (8, 2) => tile::<$d, 8, 2>(args),
                    (4, 3) => tile::<$d, 4, 3>(args),
                    (4, 4) => tile::<$d, 4, 4>(args),
                    (1, 1) => tile::<$d, 1, 1>(args),
                    (1, 2) => tile::<$d, 1, 2>(args),
                    (1, 3) => tile::<$d, 1, 3>(args),
                    (1, 4) => tile::<$d, 1, 4>(args),
                    _ => unreachable!("avx512 matmul has no {rows}x{tokens} tile"),
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
/// (first 16, last 16).
///
/// # Safety
/// `p` must point to `block_bytes(D)` readable bytes (any alignment).
#[inline]
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn load_block<const D: u8>(p: *const u8) -> (__m512, __m512) {
    // SAFETY (all arms): the caller guarantees `block_bytes(D)` readable bytes at `p`; the loads
    // are unaligned loads.
    unsafe {
        match D {
            BF16 => {
                let v = _mm512_loadu_si512(p as *const __m512i);
                let even = _mm512_slli_epi32::<16>(v);
                let odd = _mm512_and_si512(v, _mm512_set1_epi32(0xFFFF_0000u32 as i32));
                (_mm512_castsi512_ps(even), _mm512_castsi512_ps(odd))
            }
            F16 => {
                let lo = _mm256_loadu_si256(p as *const __m256i);
                let hi = _mm256_loadu_si256(p.add(32) as *const __m256i);
                (_mm512_cvtph_ps(lo), _mm512_cvtph_ps(hi))
            }
            _ => (_mm512_loadu_ps(p as *const f32), _mm512_loadu_ps(p.add(64) as *const f32)),
        }
    }
}

/// `R` weight rows x `T` tokens over `args.blocks` blocks; see [`TileArgs`].
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f,avx512vl")]
#[allow(clippy::needless_range_loop)] // r and t index several arrays at once
unsafe fn tile<const D: u8, const R: usize, const T: usize>(args: &mut TileArgs) {
    let (ws, xs, blocks) = (args.w_stride, args.x_stride, args.blocks);
    assert!(blocks >= 1);
    assert!(args.w.len() >= (R - 1) * ws + blocks * block_bytes(D), "avx512 tile: weight rows too short");
    assert!(args.x.len() >= (T - 1) * xs + blocks * BLOCK, "avx512 tile: x rows too short");
    assert!(args.sums.len() >= R * T);
    let (w, x) = (args.w.as_ptr(), args.x.as_ptr());
    let segment = args.segment.max(1);
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    for s0 in (0..blocks).step_by(segment) {
        for b in s0..(s0 + segment).min(blocks) {
            // x for every token first, then one weight row at a time: each widened row is used
            // as soon as it is loaded, which keeps register pressure to R*T + 2*T + 2 vectors.
            let mut x_lo = [_mm512_setzero_ps(); T];
            let mut x_hi = [_mm512_setzero_ps(); T];
            for t in 0..T {
                // SAFETY: token t < T, block b < blocks: in bounds by the length assert above.
                unsafe {
                    let p = x.add(t * xs + b * BLOCK);
                    x_lo[t] = _mm512_loadu_ps(p);
                    x_hi[t] = _mm512_loadu_ps(p.add(16));
                }
            }
            if args.streaming {
                prefetch_ahead(w, ws, b, block_bytes(D), R);
            }
            for r in 0..R {
                // SAFETY: row r < R, block b < blocks: in bounds by the length assert above.
                let (lo, hi) = unsafe { load_block::<D>(w.add(r * ws + b * block_bytes(D))) };
                for t in 0..T {
                    acc[r][t] = _mm512_fmadd_ps(lo, x_lo[t], acc[r][t]);
                    acc[r][t] = _mm512_fmadd_ps(hi, x_hi[t], acc[r][t]);
                }
            }
        }
        // End of a segment: reduce, and add to the sums of the earlier segments.
        for r in 0..R {
            for t in 0..T {
                let s = _mm512_reduce_add_ps(acc[r][t]);
                let sum = &mut args.sums[r * T + t];
                *sum = if s0 == 0 { s } else { *sum + s };
                acc[r][t] = _mm512_setzero_ps();
            }
        }
    }
}
