//! x86-64 SIMD kernels. Every function here is compiled for a target feature set the build
//! does not assume; callers check [`crate::Isa::is_available`] first.

pub(crate) mod avx2;
pub(crate) mod avx512;
pub(crate) mod elementwise;
pub(crate) mod quant;

use std::arch::x86_64::*;

/// Sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx")]
pub(crate) fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Requests the cache lines of column block `b` (`block_bytes` bytes at `b * block_bytes` in a
/// row) of the `rows` rows two tiles on: `2 * rows` rows further, the rows that follow in memory.
/// A decode matvec's rows are a few KiB, too short for the hardware prefetcher to ramp up on, so
/// the lines a later tile needs are asked for while this one computes (2 MiB bf16 matvecs on 2
/// AVX2 cores: 12 GB/s without, 19-20 with). Each 64-byte line is asked for by the block it
/// starts in. Only for tiles that stream their rows once (decode): in prefill's L2-resident
/// panels it costs speed.
#[inline]
#[target_feature(enable = "sse")]
pub(crate) fn prefetch_ahead(w: *const u8, ws: usize, b: usize, block_bytes: usize, rows: usize) {
    let (start, end) = (b * block_bytes, (b + 1) * block_bytes);
    for r in 0..rows {
        let row = w.wrapping_add((2 * rows + r) * ws);
        for at in (start.next_multiple_of(64)..end).step_by(64) {
            // `wrapping_add`: past the last tile the address lies outside the weights, and a
            // prefetch never faults or reads anything architecturally.
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(at) as *const i8);
        }
    }
}
