//! Element-wise kernels on every path against f64 loops. Each test states its bound in units of
//! `U = 2^-24` (the relative error of one f32 rounding).

use half::{bf16, f16};

use super::{encode_unaligned, Rng, DTYPES, U};
use crate::elementwise::{axpy, dot, rms_norm, silu_mul, softmax, to_f32};
use crate::{DType, Isa};

/// Lengths around every SIMD width (8, 32) and their tails.
const LENS: [usize; 10] = [0, 1, 7, 8, 9, 31, 32, 33, 100, 1027];

#[test]
fn to_f32_is_exact_on_unaligned_bytes() {
    let mut rng = Rng::new(1);
    for isa in Isa::available() {
        for dtype in DTYPES {
            for n in LENS {
                let (buf, vals) = encode_unaligned(dtype, &rng.vec(n));
                let mut out = vec![f32::NAN; n];
                to_f32(isa, dtype, &buf[1..], &mut out);
                assert_eq!(out, vals, "{isa:?} {dtype:?} n={n}");
            }
        }
    }
}

/// Infinities, signed zeros, subnormals and NaN convert bit for bit (NaN stays NaN).
#[test]
fn to_f32_special_values() {
    let bf: Vec<u16> = vec![0x0000, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x807F, 0x7FC0, 0x3F80, 0xC2F7, 0x0080];
    let hf: Vec<u16> = vec![0x0000, 0x8000, 0x7C00, 0xFC00, 0x0001, 0x83FF, 0x7E00, 0x3C00, 0xD5E0, 0x0400];
    for isa in Isa::available() {
        for (dtype, bits) in [(DType::BF16, &bf), (DType::F16, &hf)] {
            let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
            let mut out = vec![0.0; bits.len()];
            to_f32(isa, dtype, &bytes, &mut out);
            for (&b, &got) in bits.iter().zip(&out) {
                let want = match dtype {
                    DType::BF16 => bf16::from_bits(b).to_f32(),
                    _ => f16::from_bits(b).to_f32(),
                };
                assert!(
                    got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                    "{isa:?} {dtype:?} {b:#06x}: got {got}, want {want}"
                );
            }
        }
    }
}

/// Bound: `(n + 16) U sum |a b|`, the worst case of summing n products in any order.
#[test]
fn dot_matches_f64() {
    let mut rng = Rng::new(2);
    for isa in Isa::available() {
        for n in LENS {
            let (a, b) = (rng.vec(n), rng.vec(n + 3));
            let got = dot(isa, &a, &b) as f64;
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let abs: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64 * *y as f64).abs()).sum();
            assert!((got - exact).abs() <= (n + 16) as f64 * U * abs, "{isa:?} n={n}: {got} vs {exact}");
        }
    }
}

/// Bound: `2 U (|y| + |alpha x|)` per element (a multiply and an add, or one FMA).
#[test]
fn axpy_matches_f64() {
    let mut rng = Rng::new(3);
    for isa in Isa::available() {
        for n in LENS {
            let (x, y0) = (rng.vec(n), rng.vec(n));
            let alpha = rng.f32() * 3.0;
            let mut y = y0.clone();
            axpy(isa, alpha, &x, &mut y);
            for i in 0..n {
                let ax = alpha as f64 * x[i] as f64;
                let exact = y0[i] as f64 + ax;
                let bound = 2.0 * U * (y0[i].abs() as f64 + ax.abs());
                assert!((y[i] as f64 - exact).abs() <= bound, "{isa:?} n={n} i={i}");
            }
        }
    }
}

/// Bound: `(n + 24) U |exact|` per element: the mean of squares (positive terms) is within
/// `(n + 16) U`, the square root halves that, and the reciprocal and two products add 4 U.
#[test]
fn rms_norm_matches_f64() {
    let mut rng = Rng::new(4);
    for isa in Isa::available() {
        for dim in [1, 7, 9, 33, 100] {
            let w = rng.vec(dim);
            let x0: Vec<f32> = rng.vec(3 * dim).iter().map(|v| v * 4.0).collect();
            let mut x = x0.clone();
            rms_norm(isa, &mut x, &w, 1e-5);
            for (row0, row) in x0.chunks(dim).zip(x.chunks(dim)) {
                let ms = row0.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / dim as f64;
                let inv = 1.0 / (ms + 1e-5f32 as f64).sqrt();
                for i in 0..dim {
                    let exact = row0[i] as f64 * inv * w[i] as f64;
                    let bound = (dim + 24) as f64 * U * exact.abs();
                    assert!((row[i] as f64 - exact).abs() <= bound, "{isa:?} dim={dim} i={i}");
                }
            }
        }
    }
}

/// LayerNorm against an f64 loop: within `(2n + 32) U` of the result's scale (the mean and the
/// variance each sum `n` terms; centring cancels, so the bound is on `|w| + |b|`, not on the
/// result).
#[test]
fn layer_norm_matches_f64() {
    let mut rng = Rng::new(5);
    for dim in [1, 7, 33, 100] {
        let (w, b) = (rng.vec(dim), rng.vec(dim));
        let x0: Vec<f32> = rng.vec(3 * dim).iter().map(|v| v * 4.0 + 1.5).collect();
        let mut x = x0.clone();
        crate::layer_norm(&mut x, &w, &b, 1e-5);
        for (row0, row) in x0.chunks(dim).zip(x.chunks(dim)) {
            let mean = row0.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
            let var = row0.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
            let inv = 1.0 / (var + 1e-5f32 as f64).sqrt();
            for i in 0..dim {
                let exact = (row0[i] as f64 - mean) * inv * w[i] as f64 + b[i] as f64;
                let bound = (2 * dim + 32) as f64 * U * (w[i].abs() as f64 * 4.0 + b[i].abs() as f64 + 1e-3);
                assert!((row[i] as f64 - exact).abs() <= bound, "dim={dim} i={i}: {} vs {exact}", row[i]);
            }
        }
    }
}

/// The vector exp against f64: relative error within `2 U` (measured: 1.38 U) for normal
/// results, within one subnormal step below, and the special values exactly.
#[cfg(target_arch = "x86_64")]
#[test]
fn vector_exp_matches_f64() {
    use std::arch::x86_64::{_mm256_loadu_ps, _mm256_storeu_ps};
    if !Isa::Avx2.is_available() {
        return;
    }
    let exp8 = |x: [f32; 8]| {
        let mut out = [0.0f32; 8];
        // SAFETY: the CPU has AVX2 and FMA (checked above); both arrays hold 8 floats.
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr(), crate::x86::elementwise::exp(_mm256_loadu_ps(x.as_ptr())))
        };
        out
    };
    let mut xs: Vec<f32> = (0..200_000).map(|i| -104.5 + i as f32 * (194.0 / 200_000.0)).collect();
    xs.extend([0.0, -0.0, 1e-30, -1e-30, 0.5 * std::f32::consts::LN_2, 88.72, -87.33, -103.9]);
    for chunk in xs.chunks_exact(8) {
        let got = exp8(chunk.try_into().unwrap());
        for (&x, &g) in chunk.iter().zip(&got) {
            let exact = (x as f64).exp();
            let err = (g as f64 - exact).abs();
            let ok = if exact > f32::MAX as f64 {
                g == f32::INFINITY
            } else {
                err <= 2.0 * U * exact || err <= f32::from_bits(1) as f64
            };
            assert!(ok, "exp({x}) = {g}, exact {exact}");
        }
    }
    let special = exp8([f32::NEG_INFINITY, f32::INFINITY, f32::NAN, 89.0, -104.0, -200.0, 1000.0, 0.0]);
    assert_eq!(special[..2], [0.0, f32::INFINITY]);
    assert!(special[2].is_nan());
    assert_eq!(special[3..], [f32::INFINITY, 0.0, 0.0, f32::INFINITY, 1.0]);
}

/// Bound: `(n + 24) U` relative per element: `exp` within 2 U, the sum of n positive terms
/// within `(n + 16) U`, the division U. The reference subtracts the max in f32 as the kernels do,
/// so the rounding of the exponent itself (not kernel error) is not counted.
#[test]
fn softmax_matches_f64() {
    let mut rng = Rng::new(6);
    for isa in Isa::available() {
        for n in LENS.into_iter().filter(|&n| n > 0) {
            let mut x0: Vec<f32> = rng.vec(n).iter().map(|v| v * 12.0).collect();
            // A masked position (as in causal attention) must get exactly 0.
            if n > 2 {
                x0[n / 2] = f32::NEG_INFINITY;
            }
            let mut x = x0.clone();
            softmax(isa, &mut x);
            let max = x0.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f64> = x0.iter().map(|v| ((v - max) as f64).exp()).collect();
            let sum: f64 = e.iter().sum();
            for i in 0..n {
                let exact = e[i] / sum;
                let bound = (n + 24) as f64 * U * exact;
                assert!((x[i] as f64 - exact).abs() <= bound, "{isa:?} n={n} i={i}: {} vs {exact}", x[i]);
            }
        }
    }
}

/// Bound: `10 U |exact|` plus 1e-30 absolute per element (exp 2 U, then an add, a division and
/// a product; far negative gates underflow to a signed zero instead of a value below 1e-30).
#[test]
fn silu_mul_matches_f64() {
    let mut rng = Rng::new(7);
    for isa in Isa::available() {
        for n in LENS {
            let mut g0: Vec<f32> = rng.vec(n).iter().map(|v| v * 20.0).collect();
            if n > 3 {
                g0[1] = -120.0;
                g0[2] = 95.0;
            }
            let u = rng.vec(n + 2);
            let mut g = g0.clone();
            silu_mul(isa, &mut g, &u);
            for i in 0..n {
                let gi = g0[i] as f64;
                let exact = gi / (1.0 + (-gi).exp()) * u[i] as f64;
                let bound = 10.0 * U * exact.abs() + 1e-30;
                assert!((g[i] as f64 - exact).abs() <= bound, "{isa:?} n={n} i={i}: {} vs {exact}", g[i]);
            }
        }
    }
}

/// The public functions run the detected path with the same results.
#[test]
fn public_functions_match_forced_detected_path() {
    let mut rng = Rng::new(8);
    let (a, b) = (rng.vec(77), rng.vec(77));
    let isa = Isa::detect();
    assert_eq!(crate::dot(&a, &b), dot(isa, &a, &b));
    let (mut y1, mut y2) = (b.clone(), b.clone());
    crate::axpy(0.5, &a, &mut y1);
    axpy(isa, 0.5, &a, &mut y2);
    assert_eq!(y1, y2);
    let (mut s1, mut s2) = (a.clone(), a.clone());
    crate::softmax(&mut s1);
    softmax(isa, &mut s2);
    assert_eq!(s1, s2);
    let (mut g1, mut g2) = (a.clone(), a.clone());
    crate::silu_mul(&mut g1, &b);
    silu_mul(isa, &mut g2, &b);
    assert_eq!(g1, g2);
    let (mut r1, mut r2) = (a.clone(), a.clone());
    crate::rms_norm(&mut r1, &b[..11], 1e-6);
    rms_norm(isa, &mut r2, &b[..11], 1e-6);
    assert_eq!(r1, r2);
}
