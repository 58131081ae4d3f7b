//! AVX2 + FMA element-wise kernels, and a vector `exp` for softmax and SiLU (a libm call per
//! element costs more than the rest of those kernels together).
//!
//! Every function here is a safe `#[target_feature]` function: calling it from code without the
//! features is `unsafe`, and the caller's `SAFETY` comment points at the CPU check.

use std::arch::x86_64::*;

use super::hsum256;
use crate::{scalar, DType};

const LANES: usize = 8;

#[inline]
#[target_feature(enable = "avx")]
fn load(s: &[f32]) -> __m256 {
    assert!(s.len() >= LANES);
    // SAFETY: 8 readable floats (asserted); the load is unaligned.
    unsafe { _mm256_loadu_ps(s.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx")]
fn store(s: &mut [f32], v: __m256) {
    assert!(s.len() >= LANES);
    // SAFETY: 8 writable floats (asserted); the store is unaligned.
    unsafe { _mm256_storeu_ps(s.as_mut_ptr(), v) }
}

#[inline]
#[target_feature(enable = "avx")]
fn load_bytes(s: &[u8]) -> __m128i {
    assert!(s.len() >= 16);
    // SAFETY: 16 readable bytes (asserted); the load is unaligned.
    unsafe { _mm_loadu_si128(s.as_ptr() as *const __m128i) }
}

/// Dot product over the common length (like `zip`).
#[target_feature(enable = "avx2,fma")]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    // Four accumulators hide the FMA latency.
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut ca = a.chunks_exact(4 * LANES);
    let mut cb = b.chunks_exact(4 * LANES);
    for (va, vb) in (&mut ca).zip(&mut cb) {
        for (k, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(load(&va[k * LANES..]), load(&vb[k * LANES..]), *acc);
        }
    }
    let mut ra = ca.remainder().chunks_exact(LANES);
    let mut rb = cb.remainder().chunks_exact(LANES);
    for (va, vb) in (&mut ra).zip(&mut rb) {
        acc[0] = _mm256_fmadd_ps(load(va), load(vb), acc[0]);
    }
    let tail: f32 = ra.remainder().iter().zip(rb.remainder()).map(|(x, y)| x * y).sum();
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    hsum256(s) + tail
}

/// `y += alpha * x` over the common length.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    let a = _mm256_set1_ps(alpha);
    let mut yc = y.chunks_exact_mut(LANES);
    let mut xc = x.chunks_exact(LANES);
    for (yv, xv) in (&mut yc).zip(&mut xc) {
        store(yv, _mm256_fmadd_ps(a, load(xv), load(yv)));
    }
    for (yv, xv) in yc.into_remainder().iter_mut().zip(xc.remainder()) {
        *yv += alpha * xv;
    }
}

/// RMSNorm of each `w.len()` row, in place (same row split as the reference).
#[target_feature(enable = "avx2,fma")]
pub(crate) fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    for row in x.chunks_mut(w.len()) {
        let ms = dot(row, row) / w.len() as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        let vinv = _mm256_set1_ps(inv);
        let mut rc = row.chunks_exact_mut(LANES);
        let mut wc = w.chunks_exact(LANES);
        for (v, g) in (&mut rc).zip(&mut wc) {
            store(v, _mm256_mul_ps(_mm256_mul_ps(load(v), vinv), load(g)));
        }
        for (v, g) in rc.into_remainder().iter_mut().zip(wc.remainder()) {
            *v = *v * inv * g;
        }
    }
}

/// Softmax in place.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn softmax(x: &mut [f32]) {
    let max = hmax(x);
    let vmax = _mm256_set1_ps(max);
    let mut acc = _mm256_setzero_ps();
    let mut xc = x.chunks_exact_mut(LANES);
    for c in &mut xc {
        let e = exp(_mm256_sub_ps(load(c), vmax));
        store(c, e);
        acc = _mm256_add_ps(acc, e);
    }
    let tail = xc.into_remainder();
    if !tail.is_empty() {
        // Padded with -inf, whose exp is 0 and adds nothing to the sum.
        let mut lanes = [f32::NEG_INFINITY; LANES];
        lanes[..tail.len()].copy_from_slice(tail);
        let e = exp(_mm256_sub_ps(load(&lanes), vmax));
        store(&mut lanes, e);
        tail.copy_from_slice(&lanes[..tail.len()]);
        acc = _mm256_add_ps(acc, e);
    }
    let sum = hsum256(acc);
    let vsum = _mm256_set1_ps(sum);
    let mut xc = x.chunks_exact_mut(LANES);
    for c in &mut xc {
        store(c, _mm256_div_ps(load(c), vsum));
    }
    for v in xc.into_remainder() {
        *v /= sum;
    }
}

/// Largest element, ignoring NaN like `f32::max` (`-inf` for an empty slice).
#[target_feature(enable = "avx2,fma")]
fn hmax(x: &[f32]) -> f32 {
    let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut xc = x.chunks_exact(LANES);
    for c in &mut xc {
        // max_ps returns its second operand when either is NaN: keep `m` on NaN.
        m = _mm256_max_ps(load(c), m);
    }
    let mut lanes = [0.0f32; LANES];
    store(&mut lanes, m);
    lanes.iter().chain(xc.remainder()).copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `gate[i] = silu(gate[i]) * up[i]` over the common length.
#[target_feature(enable = "avx2,fma")]
pub(crate) fn silu_mul(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let mut gc = gate[..n].chunks_exact_mut(LANES);
    let mut uc = up[..n].chunks_exact(LANES);
    for (g, u) in (&mut gc).zip(&mut uc) {
        store(g, silu_mul8(load(g), load(u)));
    }
    let (g, u) = (gc.into_remainder(), uc.remainder());
    if !g.is_empty() {
        // Padded with zeros; the padding is discarded.
        let (mut gl, mut ul) = ([0.0f32; LANES], [0.0f32; LANES]);
        gl[..g.len()].copy_from_slice(g);
        ul[..u.len()].copy_from_slice(u);
        let s = silu_mul8(load(&gl), load(&ul));
        store(&mut gl, s);
        g.copy_from_slice(&gl[..g.len()]);
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn silu_mul8(g: __m256, u: __m256) -> __m256 {
    let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), g));
    _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0), e)), u)
}

/// Converts little-endian `dtype` elements to f32 (`data.len() == out.len() * size`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn to_f32(dtype: DType, data: &[u8], out: &mut [f32]) {
    let done = match dtype {
        // Plain little-endian floats: the scalar loop is a copy the compiler vectorises.
        // Block formats: the caller dequantizes them on the scalar path.
        DType::F32 | DType::Q8_0 | DType::Q4_0 => 0,
        DType::BF16 => {
            for (o, d) in out.chunks_exact_mut(LANES).zip(data.chunks_exact(2 * LANES)) {
                let wide = _mm256_cvtepu16_epi32(load_bytes(d));
                store(o, _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide)));
            }
            out.len() / LANES * LANES
        }
        DType::F16 => {
            for (o, d) in out.chunks_exact_mut(LANES).zip(data.chunks_exact(2 * LANES)) {
                store(o, _mm256_cvtph_ps(load_bytes(d)));
            }
            out.len() / LANES * LANES
        }
    };
    let size = dtype.size();
    scalar::to_f32(dtype, &data[done * size..], &mut out[done..]);
}

/// `e^x` per lane, with relative error below 2^-23 (measured 1.38 x 2^-24) for normal results; results
/// below the smallest normal (x < -87.3) are computed by gradual underflow, `exp(x >= 88.73)` is
/// `inf`, `exp(-inf)` is 0 and NaN stays NaN.
///
/// The method is Cephes' `expf`: `e^x = 2^n * e^r` with `n = round(x / ln 2)`, `r = x - n ln 2`
/// in two parts (so `r` is nearly exact), and a degree-7 polynomial for `e^r` on
/// `|r| <= ln(2) / 2`.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn exp(x: __m256) -> __m256 {
    // Clamp so that n stays in [-150, 128]; past the ends the result is 0 or inf anyway.
    // (max_ps returns the second operand when the first is NaN; NaN is restored below.)
    let xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-104.0)), _mm256_set1_ps(89.0));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        xc,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    // ln 2 = 0.693_359_375 (exact in f32, so n * it is exact for |n| <= 150) - 2.121_944_4e-4.
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), xc);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
    // 2^n as 2^(n/2) * 2^(n - n/2): both factors are normal floats for every n in range, and
    // the products underflow gradually or overflow to inf as the true result does.
    let ni = _mm256_cvtps_epi32(n);
    let n1 = _mm256_srai_epi32::<1>(ni);
    let n2 = _mm256_sub_epi32(ni, n1);
    let bias = _mm256_set1_epi32(127);
    let s1 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n1, bias)));
    let s2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n2, bias)));
    let e = _mm256_mul_ps(_mm256_mul_ps(y, s1), s2);
    _mm256_blendv_ps(e, x, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x))
}
