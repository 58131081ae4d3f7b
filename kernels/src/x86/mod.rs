//! x86-64 SIMD kernels. Every function here is compiled for a target feature set the build
//! does not assume; callers check [`crate::Isa::is_available`] first.

pub(crate) mod avx2;
pub(crate) mod avx512;
pub(crate) mod elementwise;

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

/// The bytes of a row to prefetch for the block at byte `at` of `len` bytes: the 64-byte cache
/// lines that start inside it (none when the block lies within a line whose start an earlier
/// block covered).
#[inline]
pub(crate) fn prefetch_ahead_bytes(at: usize, len: usize) -> (usize, usize) {
    let first = at.next_multiple_of(64);
    (first, (at + len).saturating_sub(first))
}
