//! AVX2 kernels for block-format weights: q8_0 x q8_0 and q4_0 x q8_0 tiles of rows x tokens,
//! and the quantization of an activation row to q8_0.
//!
//! A block's integer dot product is computed as llama.cpp's AVX2 `ggml_vec_dot_q8_0_q8_0` does:
//! `_mm256_maddubs_epi16` multiplies unsigned by signed bytes and adds pairs to i16,
//! `_mm256_madd_epi16` against ones adds pairs again to eight i32 lanes, which are converted to
//! f32 and multiplied-added with the product of the two blocks' scales into an 8-lane
//! accumulator, reduced once at the end of the row. The lanes hold exact integers (each at most
//! 4 * 128 * 127 in magnitude), so the only rounding is in the scale product, the FMAs and the
//! final reduction.
//!
//! - q8_0 weights: `maddubs(|w|, sign(x, w))`, the sign trick with the weight as the unsigned
//!   side: `|w|` of -128 is 128 as an unsigned byte, so every weight byte is exact (the
//!   activation, from our quantizer, is never -128). Pairs sum to at most 2 * 128 * 127, below
//!   i16's saturation.
//! - q4_0 weights: the nibbles `q` (0..=15) are already unsigned: `maddubs(q, x)` minus
//!   `maddubs(8, x)`, the second computed once per activation block and shared by the tile's
//!   rows. Same i32 lanes as `(q - 8) * x`, one subtraction per row instead of a sign trick.
//!
//! A tile of `R` rows x `T` tokens loads each activation block once for its `R` rows and each
//! weight block once for its `T` tokens. Every (row, token) accumulator sees the same operations
//! in the same order whatever `R` and `T`, so a token's result does not depend on the tile that
//! computed it (batched equals alone).
//!
//! The AVX-512 path runs this code too: no AVX-512 (or VNNI) quantized kernel exists, because
//! the development machine has no AVX-512 to test one on.

use std::arch::x86_64::*;

use super::hsum256;
use crate::quant::{QTile, QTiles};
use crate::{DType, QK};

/// Rows per tile by token count (see `QTiles::tall`): decode runs 4 rows at a time (4
/// accumulators), 2 tokens 4 rows, 3-4 tokens 2 rows (6-8 accumulators).
const TALL: [usize; 4] = [4, 4, 2, 2];

/// Bytes of a q8_0 block (the activations' format, and q8_0 weights').
const Q8: usize = 2 + QK;
/// Bytes of a q4_0 block.
const Q4: usize = 2 + QK / 2;

pub(crate) fn tiles(dtype: DType) -> QTiles {
    let tile = match dtype {
        DType::Q8_0 => tile_q8_0 as unsafe fn(usize, usize, &mut QTile),
        DType::Q4_0 => tile_q4_0,
        _ => unreachable!("{} is not a block format", dtype.name()),
    };
    QTiles { tall: &TALL, tile }
}

/// Instantiates the tile shapes `TALL` declares (and their 1-row variants) and picks one.
macro_rules! dispatch {
    ($name:ident, $q4:expr) => {
        /// # Safety
        /// The CPU must support AVX2, FMA and F16C.
        unsafe fn $name(rows: usize, tokens: usize, args: &mut QTile) {
            // SAFETY: the caller guarantees AVX2, FMA and F16C.
            unsafe {
                match (rows, tokens) {
                    (4, 1) => tile::<$q4, 4, 1>(args),
                    (4, 2) => tile::<$q4, 4, 2>(args),
                    (2, 3) => tile::<$q4, 2, 3>(args),
                    (2, 4) => tile::<$q4, 2, 4>(args),
                    (1, 1) => tile::<$q4, 1, 1>(args),
                    (1, 2) => tile::<$q4, 1, 2>(args),
                    (1, 3) => tile::<$q4, 1, 3>(args),
                    (1, 4) => tile::<$q4, 1, 4>(args),
                    _ => unreachable!("avx2 quantized matmul has no {rows}x{tokens} tile"),
                }
            }
        }
    };
}

dispatch!(tile_q8_0, false);
dispatch!(tile_q4_0, true);

/// The f16 scale at `p` (unaligned), converted with F16C and broadcast to 8 lanes.
///
/// # Safety
/// `p` must point to 2 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 2 readable bytes; `read_unaligned` needs no alignment.
    let bits = unsafe { p.cast::<u16>().read_unaligned() };
    _mm256_cvtph_ps(_mm_set1_epi16(bits as i16))
}

/// `R` weight rows x `T` tokens of q8_0 activations over `args.blocks` blocks; `Q4` selects
/// q4_0 weights (else q8_0). See [`QTile`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // r and t index several arrays at once
unsafe fn tile<const Q4W: bool, const R: usize, const T: usize>(args: &mut QTile) {
    let wb = if Q4W { Q4 } else { Q8 };
    let (ws, xs, blocks) = (args.w_stride, args.x_stride, args.blocks);
    assert!(args.w.len() >= (R - 1) * ws + blocks * wb, "avx2 quantized tile: weight rows too short");
    assert!(args.x.len() >= (T - 1) * xs + blocks * Q8, "avx2 quantized tile: x rows too short");
    assert!(args.sums.len() >= R * T);
    let (w, x) = (args.w.as_ptr(), args.x.as_ptr());
    let ones = _mm256_set1_epi16(1);
    let nibble_shift = _mm256_setr_epi64x(0, 0, 4, 4);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for b in 0..blocks {
        // Every token's activation block (and for q4_0 its `8 * x` pair sums) first, then one
        // weight row at a time, used by every token as soon as it is loaded.
        let mut xq = [_mm256_setzero_si256(); T];
        let mut xd = [_mm256_setzero_ps(); T];
        let mut bias = [_mm256_setzero_si256(); T];
        for t in 0..T {
            // SAFETY: token t < T, block b < blocks: in bounds by the length assert above.
            unsafe {
                let p = x.add(t * xs + b * Q8);
                xd[t] = scale(p);
                xq[t] = _mm256_loadu_si256(p.add(2) as *const __m256i);
            }
            if Q4W {
                bias[t] = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(8), xq[t]), ones);
            }
        }
        if args.streaming {
            // Two tiles on, as `prefetch_ahead` does for plain weights; one request per row and
            // block (a 64-byte line holds 1.9 q8_0 or 3.6 q4_0 blocks; the repeats are cheap,
            // where working out which block starts a line cost a loop per row).
            for r in 0..R {
                let at = w.wrapping_add((2 * R + r) * ws + b * wb);
                // `wrapping_add`: past the last tile the address lies outside the weights, and a
                // prefetch never faults or reads anything architecturally.
                _mm_prefetch::<_MM_HINT_T0>(at as *const i8);
            }
        }
        for r in 0..R {
            // SAFETY: row r < R, block b < blocks: in bounds by the length assert above.
            let p = unsafe { w.add(r * ws + b * wb) };
            // SAFETY: as above, the block's 2 scale bytes.
            let wd = unsafe { scale(p) };
            if Q4W {
                // SAFETY: as above, the block's 16 bytes of nibbles.
                let packed = unsafe { _mm_loadu_si128(p.add(2) as *const __m128i) };
                // Weights 0..16 (low nibbles) in the low half, 16..32 (high nibbles) above: the
                // 16 bytes in both halves, the upper half shifted right by 4, then masked.
                let both = _mm256_broadcastsi128_si256(packed);
                let q = _mm256_and_si256(_mm256_srlv_epi64(both, nibble_shift), _mm256_set1_epi8(0x0F));
                for t in 0..T {
                    let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xq[t]), ones);
                    let dot = _mm256_sub_epi32(dot, bias[t]);
                    let d = _mm256_mul_ps(wd, xd[t]);
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), d, acc[r][t]);
                }
            } else {
                // SAFETY: as above, the block's 32 signed bytes.
                let q = unsafe { _mm256_loadu_si256(p.add(2) as *const __m256i) };
                let magnitude = _mm256_sign_epi8(q, q);
                for t in 0..T {
                    let signed = _mm256_sign_epi8(xq[t], q);
                    let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, signed), ones);
                    let d = _mm256_mul_ps(wd, xd[t]);
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), d, acc[r][t]);
                }
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            args.sums[r * T + t] = hsum256(acc[r][t]);
        }
    }
}

/// Quantizes `x` (whole blocks) to q8_0 into `out` (34 bytes a block), bit for bit as the
/// reference [`crate::quantize`] does: `d = max|x| / 127`, `q = round(x * (1 / d))` with ties
/// away from zero (`f32::round`; not `_mm256_round_ps`'s ties to even), `d` stored as f16
/// rounded to nearest even.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    assert_eq!(x.len() % QK, 0, "quantize_q8_0: {} values are not whole blocks", x.len());
    assert_eq!(out.len(), x.len() / QK * Q8, "quantize_q8_0: output of {} bytes", out.len());
    let sign = _mm256_set1_ps(-0.0);
    // The largest f32 below 0.5: `trunc(v + copysign(it, v))` rounds half away from zero
    // without rounding 0.49999997 up.
    let half = _mm256_set1_ps(0.499_999_97);
    // `packs` interleaves 128-bit lanes: this puts the 32 bytes back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (src, dst) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q8)) {
        // SAFETY: `src` is 32 f32 (chunks_exact); unaligned loads.
        let v = unsafe { [0, 8, 16, 24].map(|i| _mm256_loadu_ps(src.as_ptr().add(i))) };
        let m = v.iter().fold(_mm256_setzero_ps(), |m, &v| _mm256_max_ps(m, _mm256_andnot_ps(sign, v)));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let bits = _mm_extract_epi16::<0>(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(d))) as u16;
        dst[..2].copy_from_slice(&bits.to_le_bytes());
        let id = _mm256_set1_ps(id);
        let q = v.map(|v| {
            let p = _mm256_mul_ps(v, id);
            let p = _mm256_add_ps(p, _mm256_or_ps(_mm256_and_ps(p, sign), half));
            _mm256_cvttps_epi32(p)
        });
        let bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        let bytes = _mm256_permutevar8x32_epi32(bytes, order);
        // SAFETY: `dst` is 34 bytes (chunks_exact), 32 of them from offset 2; unaligned store.
        unsafe { _mm256_storeu_si256(dst.as_mut_ptr().add(2) as *mut __m256i, bytes) };
    }
}
