//! `matmul` on every path, dtype and threading against an f64 loop.
//!
//! Error bound: `|got - exact| <= (cols + 16) * 2^-24 * sum_c |x[t, c] * w[r, c]|`. This is the
//! worst-case bound for summing `cols` f32 products in any order (each partial sum rounds once;
//! the `+ 16` covers the lane and horizontal reductions). Weights are compared as stored (already
//! rounded to their dtype), so only the kernel's own error is measured. A wrong, missing or
//! doubled element breaks the bound by a factor of about `1 / (cols * 2^-24)`.

use super::{encode_unaligned, Rng, DTYPES, U};
use crate::{matmul, matmul_with, DType, Isa, KernelError, MatmulOptions, Threading, Weight};

/// `(rows, cols, tokens)`: odd sizes hit every tile shape (1 to 4 tokens, full and 1-row) and
/// every row, token and column remainder; 64x64 is the smallest expert in the model tests; cols
/// below 16 are all tail; 5 rows x 37 tokens makes the parallel split cut the tokens too.
const SHAPES: [(usize, usize, usize); 15] = [
    (1, 1, 1),
    (9, 5, 2),
    (3, 15, 4),
    (37, 67, 1),
    (37, 67, 5),
    (13, 131, 9),
    (70, 259, 3),
    (64, 64, 4),
    (64, 64, 1),
    (17, 32, 1),
    (33, 16, 8),
    (11, 96, 7),
    (19, 100, 6),
    (8, 64, 2),
    (5, 67, 37),
];

/// Builds a `rows x cols` weight of `dtype` from seeded data, runs `run` on it, and checks the
/// result against the f64 loop with the bound in the module doc.
fn check(
    dtype: DType,
    rows: usize,
    cols: usize,
    n: usize,
    seed: u64,
    run: impl Fn(&[f32], &Weight, &mut [f32]),
) {
    let mut rng = Rng::new(seed);
    let (buf, wv) = encode_unaligned(dtype, &rng.vec(rows * cols));
    let w = Weight::new(dtype, &buf[1..], rows, cols).unwrap();
    let x = rng.vec(n * cols);
    let mut out = vec![f32::NAN; n * rows];
    run(&x, &w, &mut out);
    for t in 0..n {
        for r in 0..rows {
            let (mut exact, mut abs) = (0.0f64, 0.0f64);
            for c in 0..cols {
                let p = x[t * cols + c] as f64 * wv[r * cols + c] as f64;
                exact += p;
                abs += p.abs();
            }
            let got = out[t * rows + r] as f64;
            let bound = (cols + 16) as f64 * U * abs;
            assert!(
                (got - exact).abs() <= bound,
                "{dtype:?} {rows}x{cols} n={n}: out[{t}, {r}] = {got}, exact {exact}, bound {bound}"
            );
        }
    }
}

#[test]
fn every_path_dtype_shape_and_threading_matches_f64_loop() {
    for isa in Isa::available() {
        for threading in [Threading::Single, Threading::Parallel] {
            let opts = MatmulOptions { isa, threading };
            for dtype in DTYPES {
                for (i, &(rows, cols, n)) in SHAPES.iter().enumerate() {
                    check(dtype, rows, cols, n, i as u64, |x, w, out| matmul_with(opts, x, w, out));
                }
            }
        }
    }
}

/// Rows of 32 KiB and more: a panel holds only a few rows, so prefill crosses panel edges (and
/// the last panel of a chunk is partial).
#[test]
fn long_rows_cross_panels() {
    for isa in Isa::available() {
        for threading in [Threading::Single, Threading::Parallel] {
            let opts = MatmulOptions { isa, threading };
            for dtype in [DType::BF16, DType::F32] {
                check(dtype, 45, 16_387, 5, 7, |x, w, out| matmul_with(opts, x, w, out));
            }
        }
    }
}

/// The public entry point: detected path, and a size past the threshold where `Auto` threads.
#[test]
fn public_matmul_on_a_large_matrix() {
    for dtype in DTYPES {
        for n in [1, 3] {
            check(dtype, 1031, 1029, n, 11, matmul);
        }
    }
}

#[test]
fn empty_operands() {
    for isa in Isa::available() {
        let opts = MatmulOptions { isa, threading: Threading::Auto };
        let bytes = [0u8; 3 * 4 * 2];
        let w = Weight::new(DType::BF16, &bytes, 3, 4).unwrap();
        // No tokens.
        matmul_with(opts, &[], &w, &mut []);
        // No rows.
        let w0 = Weight::new(DType::F16, &[], 0, 4).unwrap();
        matmul_with(opts, &[1.0; 8], &w0, &mut []);
        // No columns: every output is an empty sum.
        let wc = Weight::new(DType::F32, &[], 3, 0).unwrap();
        matmul_with(opts, &[], &wc, &mut []);
    }
}

#[test]
#[should_panic(expected = "out length")]
fn wrong_output_length_is_named() {
    let bytes = [0u8; 3 * 4 * 4];
    let w = Weight::new(DType::F32, &bytes, 3, 4).unwrap();
    matmul(&[0.0; 8], &w, &mut [0.0; 5]);
}

#[test]
fn weight_size_errors() {
    let err = Weight::new(DType::BF16, &[0u8; 10], 2, 3).unwrap_err();
    assert!(matches!(err, KernelError::WeightSize { expected: 12, got: 10, .. }), "{err}");
    let err = Weight::new(DType::F32, &[], usize::MAX / 2, 3).unwrap_err();
    assert!(matches!(err, KernelError::WeightTooLarge { .. }), "{err}");
}

#[test]
fn row_to_f32_reads_unaligned_rows() {
    let mut rng = Rng::new(5);
    for dtype in DTYPES {
        let (buf, vals) = encode_unaligned(dtype, &rng.vec(3 * 37));
        let w = Weight::new(dtype, &buf[1..], 3, 37).unwrap();
        let mut row = vec![0.0; 37];
        w.row_to_f32(2, &mut row);
        assert_eq!(row, vals[2 * 37..]);
        assert_eq!(w.get(40), vals[40]);
    }
}

/// A token's result does not depend on the other tokens of its batch: every row of a batch of
/// n tokens equals, bit for bit, the same token computed alone, on every path and threading,
/// for rows long enough to span several reduction segments (decode streams whole rows, prefill
/// cuts them into chunks; both sum the segments in the same order). Regression: before
/// segments, a batched token's logits differed from its solo run in the last bits.
#[test]
fn batched_rows_equal_rows_alone_bit_for_bit() {
    for isa in Isa::available() {
        for threading in [Threading::Single, Threading::Parallel] {
            let opts = MatmulOptions { isa, threading };
            for dtype in DTYPES {
                for &(rows, cols) in &[(37, 2 * 1024 + 77), (9, 3000), (64, 64), (13, 1024)] {
                    let mut rng = Rng::new(rows as u64 * 31 + cols as u64);
                    let (buf, _) = encode_unaligned(dtype, &rng.vec(rows * cols));
                    let w = Weight::new(dtype, &buf[1..], rows, cols).unwrap();
                    let x = rng.vec(37 * cols);
                    let alone: Vec<Vec<f32>> = (0..37)
                        .map(|t| {
                            let mut out = vec![0.0; rows];
                            matmul_with(opts, &x[t * cols..(t + 1) * cols], &w, &mut out);
                            out
                        })
                        .collect();
                    for n in [2, 3, 4, 5, 8, 9, 37] {
                        let mut out = vec![0.0; n * rows];
                        matmul_with(opts, &x[..n * cols], &w, &mut out);
                        for t in 0..n {
                            let got = &out[t * rows..(t + 1) * rows];
                            assert!(
                                got.iter().zip(&alone[t]).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{isa:?} {threading:?} {dtype:?} {rows}x{cols}: token {t} of {n} differs from alone"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// `matmul_many` gives each weight exactly what `matmul` gives it alone, bit for bit, on every
/// path and threading, for weights of different heights (q, k, v) and a weight with no rows.
#[test]
fn matmul_many_equals_each_matmul_alone() {
    for isa in Isa::available() {
        for threading in [Threading::Single, Threading::Parallel] {
            let opts = MatmulOptions { isa, threading };
            for dtype in DTYPES {
                for (cols, n) in [(67, 1), (1024 + 77, 3), (64, 9)] {
                    let mut rng = Rng::new(cols as u64 * 7 + n as u64);
                    let heights = [37, 8, 0, 13];
                    let bufs: Vec<Vec<u8>> =
                        heights.iter().map(|&r| encode_unaligned(dtype, &rng.vec(r * cols)).0).collect();
                    let ws: Vec<Weight> = bufs
                        .iter()
                        .zip(heights)
                        .map(|(b, r)| Weight::new(dtype, &b[1..], r, cols).unwrap())
                        .collect();
                    let x = rng.vec(n * cols);
                    super::assert_many_equals_each_alone(opts, &x, &ws, "plain weights");
                }
            }
        }
    }
}
