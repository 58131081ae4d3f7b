//! Block formats (q8_0, q4_0): quantization against ggml's bytes and its error bounds, and
//! products against them on every path, shape and threading mode.
//!
//! Bounds (`U = 2^-24`, `nb` blocks per row, `d = max|x| / 127` the f32 scale of a q8_0 block,
//! `d16` the f16 scale stored):
//! - **q8_0 round trip**: `|x - d16 * q| <= d * (1/2 + 254 U) + 127 * |d16 - d|`: half a step
//!   from rounding `x / d` (plus the rounding of `x * (1 / d)`), plus what storing the scale as
//!   f16 moves the largest code.
//! - **q4_0 round trip**: `d = max / -8` for the value of largest magnitude `max`;
//!   `|x - d16 * (q - 8)| <= |d| * (1/2 + 16 U) + 8 * |d16 - d|`, except the values with
//!   `x / d > 7.5` (the sign opposite to `max`), which the 4-bit code clamps to 15 (`7d`): there
//!   `|x - d16 * 7| <= |d| * (1 + 16 U) + 8 * |d16 - d|`.
//! - **SIMD against scalar**: both paths sum the same exact integer dot `D_b` of each block times
//!   the same f32 scale product `s_b = d16_w * d16_x`; only the float accumulation differs
//!   (scalar: one running sum; SIMD: 8 lanes of FMAs, then a 3-level reduction). Each is within
//!   `(nb + 4) U A` of the exact sum, so `|simd - scalar| <= 2 (nb + 4) U A`, where
//!   `A = sum_b s_b * sum_j |qw_j qx_j|`.
//! - **Against an f64 loop on the dequantized weights and the quantized activations**:
//!   `(nb + 4) U A` (kernel rounding only: catches any wrong integer or scale).
//! - **Against an f64 loop on the dequantized weights and the original f32 activations**: the
//!   above plus the activations' quantization error, `sum_b e_b * sum_{c in b} |w_c|` with
//!   `e_b` the q8_0 round-trip bound of activation block `b`.

use super::{Rng, U};
use crate::quant::{dot_scalar, quantize_rows};
use crate::{
    dequantize, matmul_with, quantize, read_f32, to_f32, DType, Isa, KernelError, MatmulOptions, Threading,
    Weight, QK,
};

const BLOCK_DTYPES: [DType; 2] = [DType::Q8_0, DType::Q4_0];

fn f16_scale(block: &[u8]) -> f64 {
    half::f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f64()
}

/// The q8_0 round-trip bound of one block of `x` (see the module doc), from the scale it was
/// quantized with.
fn q8_0_bound(x: &[f32], block: &[u8]) -> f64 {
    let d = (x.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0) as f64;
    d * (0.5 + 254.0 * U) + 127.0 * (f16_scale(block) - d).abs()
}

/// Blocks of varied magnitude: uniform, scaled small and large, with one outlier, all zeros.
fn sample_blocks(rng: &mut Rng) -> Vec<f32> {
    let mut x = Vec::new();
    for scale in [1.0f32, 1e-3, 300.0] {
        x.extend(rng.vec(4 * QK).iter().map(|v| v * scale));
    }
    let mut outlier = rng.vec(QK);
    outlier[7] = 25.0;
    x.extend(outlier);
    x.extend([0.0; QK]);
    x
}

#[test]
fn q8_0_round_trip_within_half_a_step() {
    let x = sample_blocks(&mut Rng::new(1));
    let bytes = quantize(DType::Q8_0, &x);
    assert_eq!(bytes.len(), x.len() / QK * 34);
    let mut back = vec![0.0; x.len()];
    dequantize(DType::Q8_0, &bytes, &mut back);
    for (b, (xs, block)) in x.chunks(QK).zip(bytes.chunks(34)).enumerate() {
        let bound = q8_0_bound(xs, block);
        for (j, &v) in xs.iter().enumerate() {
            let err = (back[b * QK + j] as f64 - v as f64).abs();
            assert!(err <= bound, "block {b} [{j}]: {v} came back as {}, bound {bound}", back[b * QK + j]);
        }
    }
}

#[test]
fn q4_0_round_trip_within_half_a_step_except_the_clamped_code() {
    let x = sample_blocks(&mut Rng::new(2));
    let bytes = quantize(DType::Q4_0, &x);
    assert_eq!(bytes.len(), x.len() / QK * 18);
    let mut back = vec![0.0; x.len()];
    dequantize(DType::Q4_0, &bytes, &mut back);
    for (b, (xs, block)) in x.chunks(QK).zip(bytes.chunks(18)).enumerate() {
        let max = xs.iter().fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = (max / -8.0) as f64;
        let slack = 16.0 * U * d.abs() + 8.0 * (f16_scale(block) - d).abs();
        for (j, &v) in xs.iter().enumerate() {
            let clamped = d != 0.0 && v as f64 / d > 7.5;
            let bound = d.abs() * if clamped { 1.0 } else { 0.5 } + slack;
            let err = (back[b * QK + j] as f64 - v as f64).abs();
            assert!(err <= bound, "block {b} [{j}]: {v} came back as {}, bound {bound}", back[b * QK + j]);
        }
    }
}

/// Blocks worked out by hand from ggml's reference quantizers.
#[test]
fn known_ggml_bytes() {
    // All zeros: q8_0's scale is 0 and every code 0; q4_0's scale is 0 / -8 = -0.0 (f16 0x8000)
    // and every code 8 (0x88 a byte).
    assert_eq!(quantize(DType::Q8_0, &[0.0; QK]), [0u8; 34]);
    let mut q4 = vec![0x00, 0x80];
    q4.extend([0x88; 16]);
    assert_eq!(quantize(DType::Q4_0, &[0.0; QK]), q4);
    // The ramp -16, -15, ..., 15. q8_0: d = 16/127 = 0.12598..., f16 0x3008 (0.1259765625);
    // q = round(x * 7.9375): -16 -> -127, -15 -> -119, -14 -> -111.125 -> -111, 0 -> 0,
    // 15 -> 119.
    let ramp: Vec<f32> = (0..QK).map(|j| j as f32 - 16.0).collect();
    let q8 = quantize(DType::Q8_0, &ramp);
    assert_eq!(q8[..2], [0x08, 0x30]);
    let code = |j: usize| q8[2 + j] as i8;
    assert_eq!([code(0), code(1), code(2), code(16), code(31)], [-127, -119, -111, 0, 119]);
    // q4_0: max = -16, d = 2 (f16 0x4000), q = min(15, trunc(x / 2 + 8.5)): x = j - 16 for the
    // low nibbles gives floor((j + 1) / 2), x = j for the high ones 8 + floor((j + 1) / 2),
    // clamped to 15 at x = 15.
    let q4 = quantize(DType::Q4_0, &ramp);
    assert_eq!(q4[..2], [0x00, 0x40]);
    assert_eq!(
        q4[2..],
        [0x80, 0x91, 0x91, 0xA2, 0xA2, 0xB3, 0xB3, 0xC4, 0xC4, 0xD5, 0xD5, 0xE6, 0xE6, 0xF7, 0xF7, 0xF8]
    );
    // And back: the ramp's q4_0 values are 2 * (q - 8): exact but for the clamped 15 -> 14.
    let mut back = [0.0f32; QK];
    dequantize(DType::Q4_0, &q4, &mut back);
    let mut want: Vec<f32> = (0..QK).map(|j| 2.0 * ((j as f32 - 16.0) / 2.0 + 0.5).floor()).collect();
    want[31] = 14.0;
    assert_eq!(back[..], want[..]);
}

#[test]
fn reads_and_weight_checks() {
    let x = Rng::new(3).vec(3 * QK);
    for dtype in BLOCK_DTYPES {
        let bytes = quantize(dtype, &x);
        let mut all = vec![0.0; x.len()];
        to_f32(dtype, &bytes, &mut all);
        for (i, &v) in all.iter().enumerate() {
            assert_eq!(read_f32(dtype, &bytes, i).to_bits(), v.to_bits(), "{dtype:?} [{i}]");
        }
        // An unaligned copy reads the same, by row and by element.
        let mut buf = vec![0u8];
        buf.extend(&bytes);
        let w = Weight::new(dtype, &buf[1..], 1, 3 * QK).unwrap();
        assert_eq!(w.row_bytes(), dtype.bytes(3 * QK).unwrap());
        let mut row = vec![0.0; 3 * QK];
        w.row_to_f32(0, &mut row);
        assert_eq!(row, all);
        assert_eq!(w.get(70), all[70]);
        // Rows must be whole blocks.
        let err = Weight::new(dtype, &bytes, 3, QK + 1).unwrap_err();
        assert!(matches!(err, KernelError::PartialBlock { cols: 33, block: 32, .. }), "{err}");
        let err = Weight::new(dtype, &bytes[1..], 1, 3 * QK).unwrap_err();
        assert!(matches!(err, KernelError::WeightSize { .. }), "{err}");
        assert_eq!(DType::parse(&dtype.name().to_lowercase()), Some(dtype));
        assert_eq!(dtype.bytes(QK + 1), None);
    }
}

/// Every path quantizes activations to the reference's bytes, ties included (`x * (1/d)`
/// exactly half-way: rounded away from zero, as `f32::round` does).
#[test]
fn activation_quantization_equals_the_reference_on_every_path() {
    let mut rng = Rng::new(4);
    let mut x = sample_blocks(&mut rng);
    // max 127 gives d = 1: every .5 is a tie.
    x.extend((0..QK).map(|j| if j == 0 { 127.0 } else { (j as f32 - 16.0) + 0.5 }));
    x.extend((0..QK).map(|j| if j == 0 { -127.0 } else { -(j as f32) - 0.5 }));
    let want = quantize(DType::Q8_0, &x);
    for isa in Isa::available() {
        for cols in [QK, 2 * QK, x.len()] {
            assert_eq!(quantize_rows(isa, &x, cols), want, "{isa:?} cols {cols}");
        }
    }
}

/// `rows x cols` weights of `dtype` quantized from seeded values, at an odd address; also
/// dequantized.
fn weight(dtype: DType, rows: usize, cols: usize, rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
    let mut buf = vec![0u8];
    buf.extend(quantize(dtype, &rng.vec(rows * cols)));
    let mut wv = vec![0.0; rows * cols];
    dequantize(dtype, &buf[1..], &mut wv);
    (buf, wv)
}

/// `(rows, cols, tokens)`: 1 to 9 tokens and prefill sizes, row counts that leave 1-row tiles,
/// one block and many, and a row long enough to cross a prefill panel.
const SHAPES: [(usize, usize, usize); 14] = [
    (1, 32, 1),
    (3, 32, 2),
    (5, 64, 3),
    (7, 96, 4),
    (9, 160, 5),
    (13, 256, 6),
    (37, 512, 7),
    (6, 1024, 8),
    (11, 2048, 9),
    (64, 128, 1),
    (66, 64, 33),
    (17, 288, 40),
    (5, 32 * 40, 37),
    (70, 8192, 5),
];

/// Runs `matmul_with(opts)` on `dtype` at a shape and checks it against the f64 loops and the
/// scalar path, with the bounds of the module doc.
fn check(opts: MatmulOptions, dtype: DType, (rows, cols, n): (usize, usize, usize), seed: u64) {
    let mut rng = Rng::new(seed);
    let (buf, wv) = weight(dtype, rows, cols, &mut rng);
    let w = Weight::new(dtype, &buf[1..], rows, cols).unwrap();
    let x: Vec<f32> = rng.vec(n * cols).iter().map(|v| v * 3.0).collect();
    let mut out = vec![f32::NAN; n * rows];
    matmul_with(opts, &x, &w, &mut out);
    let xq = quantize(DType::Q8_0, &x);
    let mut xd = vec![0.0; x.len()];
    dequantize(DType::Q8_0, &xq, &mut xd);
    let nb = (cols / QK) as f64;
    let (wb, xb) = (w.row_bytes(), cols / QK * 34);
    for t in 0..n {
        for r in 0..rows {
            let (mut exact_q, mut exact_x, mut abs, mut quant_err) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
            for b in 0..cols / QK {
                let cs = t * cols + b * QK..t * cols + (b + 1) * QK;
                let mut wabs = 0.0;
                for (j, c) in cs.clone().enumerate() {
                    let wc = wv[r * cols + b * QK + j] as f64;
                    exact_q += wc * xd[c] as f64;
                    exact_x += wc * x[c] as f64;
                    abs += (wc * xd[c] as f64).abs();
                    wabs += wc.abs();
                }
                quant_err += wabs * q8_0_bound(&x[cs], &xq[t * xb + b * 34..]);
            }
            // `abs` is A of the module doc up to the rounding of the scale products.
            let kernel = (nb + 4.0) * U * abs * (1.0 + 4.0 * U);
            let got = out[t * rows + r] as f64;
            let at = format!(
                "{:?} {:?} {dtype:?} {rows}x{cols} n={n}: out[{t}, {r}] = {got}",
                opts.isa, opts.threading
            );
            assert!((got - exact_q).abs() <= kernel, "{at}, exact on quantized x {exact_q}, bound {kernel}");
            let bound = kernel + quant_err * (1.0 + 1e-6);
            assert!((got - exact_x).abs() <= bound, "{at}, exact on f32 x {exact_x}, bound {bound}");
            let scalar = dot_scalar(dtype, &w.data[r * wb..(r + 1) * wb], &xq[t * xb..(t + 1) * xb]) as f64;
            let bound = 2.0 * kernel;
            assert!((got - scalar).abs() <= bound, "{at}, scalar {scalar}, bound {bound}");
        }
    }
}

#[test]
fn every_path_dtype_shape_and_threading_matches_f64_loops_and_scalar() {
    for isa in Isa::available() {
        for threading in [Threading::Single, Threading::Parallel, Threading::Auto] {
            for dtype in BLOCK_DTYPES {
                for (i, &shape) in SHAPES.iter().enumerate() {
                    check(MatmulOptions { isa, threading }, dtype, shape, i as u64);
                }
            }
        }
    }
}

/// Auto threads past its threshold: an expert-sized decode and a short prefill.
#[test]
fn large_products_on_the_default_path() {
    for dtype in BLOCK_DTYPES {
        for n in [1, 6] {
            check(MatmulOptions::default(), dtype, (768, 2048, n), 9);
        }
    }
}

/// q8_0 weights straight from a file may hold any byte, -128 included (ggml's quantizer never
/// writes it): the SIMD sign trick must still give the exact integer dot. The scales are kept
/// sane; the codes are random bytes.
#[test]
fn any_q8_0_weight_byte_is_exact() {
    let (rows, cols, n) = (9, 256, 3);
    let mut rng = Rng::new(6);
    let mut bytes = Vec::new();
    for _ in 0..rows * cols / QK {
        bytes.extend(half::f16::from_f32(0.01 + rng.f32().abs()).to_bits().to_le_bytes());
        bytes.extend((0..QK).map(|j| if j % 5 == 0 { 0x80 } else { rng.next_u64() as u8 }));
    }
    let w = Weight::new(DType::Q8_0, &bytes, rows, cols).unwrap();
    let x = rng.vec(n * cols);
    let xq = quantize(DType::Q8_0, &x);
    let (wb, xb) = (w.row_bytes(), cols / QK * 34);
    for isa in Isa::available() {
        let mut out = vec![0.0; n * rows];
        matmul_with(MatmulOptions { isa, threading: Threading::Single }, &x, &w, &mut out);
        for t in 0..n {
            for r in 0..rows {
                let (mut exact, mut abs) = (0.0f64, 0.0f64);
                for c in 0..cols {
                    let p = w.get(r * cols + c) as f64 * read_f32(DType::Q8_0, &xq[t * xb..], c) as f64;
                    exact += p;
                    abs += p.abs();
                }
                let got = out[t * rows + r] as f64;
                let bound = (cols / QK + 4) as f64 * U * abs * (1.0 + 4.0 * U);
                assert!((got - exact).abs() <= bound, "{isa:?} out[{t}, {r}] = {got}, exact {exact}");
                let scalar = dot_scalar(DType::Q8_0, &bytes[r * wb..(r + 1) * wb], &xq[t * xb..(t + 1) * xb]);
                assert!(
                    (got - scalar as f64).abs() <= 2.0 * bound,
                    "{isa:?} out[{t}, {r}] = {got}, scalar {scalar}"
                );
            }
        }
    }
}

/// A token's result depends on its own row only: every token of a batch of `n` equals, bit for
/// bit, the token computed alone (single-threaded), on every path and threading mode, for every
/// tile shape and prefill's panels.
#[test]
fn batched_equals_alone_bit_for_bit_on_every_path_and_threading() {
    for isa in Isa::available() {
        for dtype in BLOCK_DTYPES {
            for (rows, cols) in [(37, 2048), (9, 96), (70, 4096)] {
                let mut rng = Rng::new(rows as u64 + cols as u64);
                let (buf, _) = weight(dtype, rows, cols, &mut rng);
                let w = Weight::new(dtype, &buf[1..], rows, cols).unwrap();
                let x = rng.vec(40 * cols);
                let single = MatmulOptions { isa, threading: Threading::Single };
                let alone: Vec<Vec<f32>> = (0..40)
                    .map(|t| {
                        let mut out = vec![0.0; rows];
                        matmul_with(single, &x[t * cols..(t + 1) * cols], &w, &mut out);
                        out
                    })
                    .collect();
                for threading in [Threading::Single, Threading::Parallel, Threading::Auto] {
                    for n in (1..=9).chain([33, 40]) {
                        let mut out = vec![0.0; n * rows];
                        matmul_with(MatmulOptions { isa, threading }, &x[..n * cols], &w, &mut out);
                        for t in 0..n {
                            assert!(
                                out[t * rows..(t + 1) * rows].iter().zip(&alone[t]).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{isa:?} {threading:?} {dtype:?} {rows}x{cols}: token {t} of {n} differs from alone"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// `matmul_many` over block and plain weights together gives each weight what `matmul` gives
/// it alone, bit for bit.
#[test]
fn matmul_many_mixing_formats_equals_each_alone() {
    let (cols, n) = (256, 5);
    let mut rng = Rng::new(8);
    let dtypes = [DType::Q8_0, DType::BF16, DType::Q4_0, DType::Q8_0];
    let heights = [37, 8, 13, 0];
    let bufs: Vec<Vec<u8>> =
        dtypes.iter().zip(heights).map(|(&d, r)| quantize(d, &rng.vec(r * cols))).collect();
    let ws: Vec<Weight> = bufs
        .iter()
        .zip(dtypes.iter().zip(heights))
        .map(|(b, (&d, r))| Weight::new(d, b, r, cols).unwrap())
        .collect();
    let x = rng.vec(n * cols);
    for isa in Isa::available() {
        for threading in [Threading::Single, Threading::Parallel] {
            let opts = MatmulOptions { isa, threading };
            super::assert_many_equals_each_alone(opts, &x, &ws, "mixed formats");
        }
    }
}
