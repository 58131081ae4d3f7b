//! The CUDA kernels against f64 loops and against the CPU kernels, on deterministic inputs
//! round-tripped through bf16 first (so that only kernel error is measured), and batched against
//! alone. Each test needs a GPU: without one ([`probe`] says why) it prints "skipped: <reason>"
//! and passes, unless `STEVEDORE_REQUIRE_GPU=1` (set by `bench/gpu/run.sh`), which makes a
//! missing GPU a failure.
//!
//! Bounds (`U = 2^-24`, `k = ceil(cols / 256)` terms per thread, 8 tree levels for 256 threads):
//! - **plain matmul**: each thread sums `k` products in f32, then a tree of 8 levels:
//!   `|gpu - exact| <= (k + 9) U sum_c |x_c w_c|`. Against the CPU, whose bound is
//!   `(cols + 16) U sum_c |x_c w_c|` (`tests/matmul.rs`), the sum of the two.
//! - **block matmul** (activations in f32, dequantized weights): a block's 32 products summed in
//!   f32, times its scale, `kb = ceil(blocks / 256)` such terms per thread, the tree:
//!   `|gpu - exact| <= (32 + kb + 10) U sum_c |x_c w_c|`. Against the CPU, which quantizes the
//!   activations to q8_0 first: that plus the CPU's kernel bound on its quantized operands and
//!   the activations' quantization error, `sum_b e_b sum_{c in b} |w_c|` (`tests/quant.rs`).
//! - **silu_mul**: `expf` within 2 ulp, then four correctly rounded operations:
//!   `10 U |exact|`, as the CPU's.
//! - **rms_norm**: the sum of squares `(k + 9) U` relative, halved by the square root, plus a
//!   few roundings: `(k + 24) U |exact|`.
//! - **softmax**: each `expf(x - max)` within `(4 + |x - max|) U` relative (2 ulp, and the
//!   subtraction's rounding in the exponent), the sum `(k + 9) U` more, the division one:
//!   `(2 max|x - max| + k + 24) U exact`.

use super::{Rng, U};
use crate::cuda::{probe, CudaBackend};
use crate::{matmul, quantize, read_f32, Backend, Cpu, DType, SwiGlu, Weight, QK};

const THREADS: usize = 256;

/// The backend on device 0, or `None` after printing why there is none.
fn gpu() -> Option<CudaBackend> {
    let reason = match probe() {
        Ok(_) => match CudaBackend::new(0) {
            Ok(backend) => return Some(backend),
            Err(e) => panic!("a GPU is there but the backend failed: {e}"),
        },
        Err(e) => e.to_string(),
    };
    assert!(
        std::env::var("STEVEDORE_REQUIRE_GPU").as_deref() != Ok("1"),
        "STEVEDORE_REQUIRE_GPU=1: {reason}"
    );
    println!("skipped: {reason}");
    None
}

/// `n` values uniform in `[-scale, scale)`, rounded to bf16.
fn bf16_vec(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    rng.vec(n).iter().map(|v| half::bf16::from_f32(v * scale).to_f32()).collect()
}

/// A `rows x cols` weight of `dtype` from bf16-rounded values, and its values as stored.
fn weight(rng: &mut Rng, dtype: DType, rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    let bytes = quantize(dtype, &bf16_vec(rng, rows * cols, 1.0));
    let stored = (0..rows * cols).map(|i| read_f32(dtype, &bytes, i)).collect();
    (bytes, stored)
}

/// `sum_c x[t, c] w[r, c]` in f64 and `sum_c |x[t, c] w[r, c]|`.
fn exact(x: &[f32], w: &[f32], cols: usize, t: usize, r: usize) -> (f64, f64) {
    let (xs, ws) = (&x[t * cols..][..cols], &w[r * cols..][..cols]);
    xs.iter()
        .zip(ws)
        .fold((0.0, 0.0), |(s, a), (&x, &w)| (s + x as f64 * w as f64, a + (x as f64 * w as f64).abs()))
}

/// The GPU's bound against the exact product, over `abs = sum |x w|` (module doc).
fn gpu_bound(dtype: DType, cols: usize, abs: f64) -> f64 {
    match dtype.is_block() {
        true => (QK + (cols / QK).div_ceil(THREADS) + 10) as f64 * U * abs,
        false => (cols.div_ceil(THREADS) + 9) as f64 * U * abs,
    }
}

/// What quantizing activation row `t` to q8_0 can move `out[t, r]`: per block half a step of
/// `max|x| / 127` (plus the f16 scale's rounding, generously 1%) times `sum |w|`.
fn activation_quantization(x: &[f32], w: &[f32], cols: usize, t: usize, r: usize) -> f64 {
    let (xs, ws) = (&x[t * cols..][..cols], &w[r * cols..][..cols]);
    xs.chunks(QK)
        .zip(ws.chunks(QK))
        .map(|(xb, wb)| {
            let step = xb.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64)) / 127.0;
            (0.5 * 1.01 + 254.0 * U) * step * wb.iter().map(|v| v.abs() as f64).sum::<f64>()
        })
        .sum()
}

const SHAPES: [(usize, usize, usize); 6] =
    [(1, 32, 1), (37, 96, 1), (64, 4096, 1), (129, 320, 5), (70, 1056, 17), (300, 2080, 9)];

#[test]
fn probe_returns_a_reason_instead_of_panicking() {
    match probe() {
        Ok(info) => println!(
            "CUDA device {}: {} ({} of {}), NVRTC {:?}",
            info.ordinal,
            info.name,
            info.arch(),
            info.count,
            info.nvrtc
        ),
        Err(e) => {
            let reason = e.to_string();
            assert!(!reason.is_empty());
            println!("no CUDA device: {reason}");
        }
    }
}

#[test]
fn matmul_matches_f64_and_the_cpu_for_every_dtype() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(14);
    for dtype in DType::ALL {
        let mut shapes = SHAPES.to_vec();
        if !dtype.is_block() {
            shapes.extend([(5, 75, 3), (33, 257, 8)]); // columns not a multiple of 32 or 256
        }
        for (rows, cols, n) in shapes {
            let (bytes, stored) = weight(&mut rng, dtype, rows, cols);
            let w = Weight::new(dtype, &bytes, rows, cols).unwrap();
            let x = bf16_vec(&mut rng, n * cols, 2.0);
            let mut got = vec![f32::NAN; n * rows];
            gpu.matmuls(&x, &mut [(w, &mut got)]);
            let mut cpu = vec![0.0; n * rows];
            matmul(&x, &w, &mut cpu);
            for t in 0..n {
                for r in 0..rows {
                    let (want, abs) = exact(&x, &stored, cols, t, r);
                    let (g, c) = (got[t * rows + r] as f64, cpu[t * rows + r] as f64);
                    let bound = gpu_bound(dtype, cols, abs);
                    let at = format!("{dtype:?} {rows}x{cols} n={n} out[{t}, {r}]");
                    assert!((g - want).abs() <= bound, "{at}: gpu {g}, exact {want}, bound {bound}");
                    let cpu_bound = match dtype.is_block() {
                        // The CPU's kernel bound `(nb + 4) U A` on its quantized operands, where
                        // A is at most `abs` plus the quantization's move, `aq`; and `aq`.
                        true => {
                            let aq = activation_quantization(&x, &stored, cols, t, r);
                            (cols + 16) as f64 * U * (abs + aq) + aq
                        }
                        false => (cols + 16) as f64 * U * abs,
                    };
                    assert!(
                        (g - c).abs() <= bound + cpu_bound,
                        "{at}: gpu {g}, cpu {c}, bound {}",
                        bound + cpu_bound
                    );
                }
            }
        }
    }
}

#[test]
fn batched_equals_alone() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(15);
    for dtype in DType::ALL {
        let (rows, cols, n) = (48, 640, 19);
        let (bytes, _) = weight(&mut rng, dtype, rows, cols);
        let w = Weight::new(dtype, &bytes, rows, cols).unwrap();
        let x = bf16_vec(&mut rng, n * cols, 1.0);
        let mut batched = vec![0.0; n * rows];
        gpu.matmuls(&x, &mut [(w, &mut batched)]);
        for t in 0..n {
            let mut alone = vec![0.0; rows];
            gpu.matmuls(&x[t * cols..][..cols], &mut [(w, &mut alone)]);
            assert_eq!(alone, &batched[t * rows..][..rows], "{dtype:?} token {t}");
        }
    }
}

#[test]
fn matmuls_of_several_weights_equal_each_alone_and_weights_stay_cached() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(16);
    let cols = 256;
    let (q, _) = weight(&mut rng, DType::BF16, 64, cols);
    let (k, _) = weight(&mut rng, DType::Q8_0, 32, cols);
    let (wq, wk) =
        (Weight::new(DType::BF16, &q, 64, cols).unwrap(), Weight::new(DType::Q8_0, &k, 32, cols).unwrap());
    let x = bf16_vec(&mut rng, 3 * cols, 1.0);
    let (mut oq, mut ok) = (vec![0.0; 3 * 64], vec![0.0; 3 * 32]);
    gpu.clear_weights();
    gpu.matmuls(&x, &mut [(wq, &mut oq), (wk, &mut ok)]);
    assert_eq!(gpu.cached_weight_bytes(), q.len() + k.len());
    let (mut aq, mut ak) = (vec![0.0; 3 * 64], vec![0.0; 3 * 32]);
    gpu.matmuls(&x, &mut [(wq, &mut aq)]);
    gpu.matmuls(&x, &mut [(wk, &mut ak)]);
    assert_eq!((oq, ok), (aq, ak));
    assert_eq!(gpu.cached_weight_bytes(), q.len() + k.len(), "a second use uploads nothing");
    gpu.forget(&q);
    assert_eq!(gpu.cached_weight_bytes(), k.len());
}

#[test]
fn swiglu_matches_f64_and_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(17);
    for dtype in DType::ALL {
        let (hidden, inter, n) = (320, 544, 6);
        let (g, gs) = weight(&mut rng, dtype, inter, hidden);
        let (u, us) = weight(&mut rng, dtype, inter, hidden);
        let (d, ds) = weight(&mut rng, dtype, hidden, inter);
        let w = SwiGlu {
            gate: Weight::new(dtype, &g, inter, hidden).unwrap(),
            up: Weight::new(dtype, &u, inter, hidden).unwrap(),
            down: Weight::new(dtype, &d, hidden, inter).unwrap(),
        };
        let x = bf16_vec(&mut rng, n * hidden, 1.0);
        let mut got = vec![f32::NAN; n * hidden];
        gpu.swiglu(&x, &w, &mut got);
        let mut cpu = vec![0.0; n * hidden];
        Cpu.swiglu(&x, &w, &mut cpu);
        // A bound on the error of `out[t, r]` for a path whose matmul error is `mm(cols, abs)`:
        // the gate and up errors carried through silu (|silu'| <= 1.1, |silu(g)| <= |g|) and
        // silu_mul's own rounding, then down's sum over them and its own error.
        let bound_of = |t: usize, mm: &dyn Fn(usize, f64) -> f64| -> Vec<(f64, f64, f64)> {
            let (mut h, mut dh) = (vec![0.0f64; inter], vec![0.0f64; inter]);
            for i in 0..inter {
                let ((gv, ga), (uv, ua)) = (exact(&x, &gs, hidden, t, i), exact(&x, &us, hidden, t, i));
                let (eg, eu) = (mm(hidden, ga), mm(hidden, ua));
                h[i] = gv / (1.0 + (-gv).exp()) * uv;
                let carried = 1.1 * (uv.abs() + eu) * eg + (gv.abs() + eg) * eu;
                dh[i] = carried + 10.0 * U * (h[i].abs() + carried);
            }
            (0..hidden)
                .map(|r| {
                    let row = &ds[r * inter..][..inter];
                    let want: f64 = row.iter().zip(&h).map(|(&w, h)| w as f64 * h).sum();
                    let carried: f64 = row.iter().zip(&dh).map(|(&w, e)| (w as f64).abs() * e).sum();
                    let abs: f64 = row
                        .iter()
                        .zip(h.iter().zip(&dh))
                        .map(|(&w, (h, e))| (w as f64).abs() * (h.abs() + e))
                        .sum();
                    (want, carried + mm(inter, abs), abs)
                })
                .collect()
        };
        let cpu_mm = |cols: usize, abs: f64| (cols + 16) as f64 * U * abs;
        for t in 0..n {
            let gpu_bounds = bound_of(t, &|cols, abs| gpu_bound(dtype, cols, abs));
            let cpu_bounds = bound_of(t, &cpu_mm);
            for (r, (&(want, bound, abs), &(_, cpu_bound, _))) in
                gpu_bounds.iter().zip(&cpu_bounds).enumerate()
            {
                let (g, c) = (got[t * hidden + r] as f64, cpu[t * hidden + r] as f64);
                assert!(
                    (g - want).abs() <= bound,
                    "{dtype:?} out[{t}, {r}]: gpu {g}, exact {want}, bound {bound}"
                );
                // The CPU quantizes x and the hidden activations to q8_0 for block formats: a
                // loose check there (5% of sum |w h|); the tight one is above.
                let cpu_bound = match dtype.is_block() {
                    true => 0.05 * abs,
                    false => cpu_bound,
                };
                assert!((g - c).abs() <= bound + cpu_bound, "{dtype:?} out[{t}, {r}]: gpu {g}, cpu {c}");
            }
        }
        // Batched equals alone.
        for t in 0..n {
            let mut alone = vec![0.0; hidden];
            gpu.swiglu(&x[t * hidden..][..hidden], &w, &mut alone);
            assert_eq!(alone, &got[t * hidden..][..hidden], "{dtype:?} token {t}");
        }
    }
}

#[test]
fn silu_mul_matches_f64_and_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(18);
    for n in [1, 255, 256, 257, 100_003] {
        let (g0, up) = (bf16_vec(&mut rng, n, 20.0), bf16_vec(&mut rng, n, 4.0));
        let mut got = g0.clone();
        gpu.silu_mul(&mut got, &up).unwrap();
        let mut cpu = g0.clone();
        crate::silu_mul(&mut cpu, &up);
        for i in 0..n {
            let g = g0[i] as f64;
            let want = g / (1.0 + (-g).exp()) * up[i] as f64;
            let bound = 10.0 * U * want.abs() + 1e-30;
            assert!((got[i] as f64 - want).abs() <= bound, "n={n} [{i}]: gpu {}, exact {want}", got[i]);
            assert!(
                (got[i] - cpu[i]).abs() as f64 <= 2.0 * bound,
                "n={n} [{i}]: gpu {}, cpu {}",
                got[i],
                cpu[i]
            );
        }
    }
}

#[test]
fn rms_norm_matches_f64_and_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(19);
    for (rows, cols) in [(1, 1), (3, 255), (7, 2048), (2, 5120)] {
        let x0 = bf16_vec(&mut rng, rows * cols, 3.0);
        let w = bf16_vec(&mut rng, cols, 1.5);
        let mut got = x0.clone();
        gpu.rms_norm(&mut got, &w, 1e-6).unwrap();
        let mut cpu = x0.clone();
        crate::rms_norm(&mut cpu, &w, 1e-6);
        for (r, row) in x0.chunks(cols).enumerate() {
            let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / cols as f64;
            let inv = 1.0 / (ms + 1e-6f32 as f64).sqrt();
            for c in 0..cols {
                let want = row[c] as f64 * inv * w[c] as f64;
                let bound = (cols.div_ceil(THREADS) + 24) as f64 * U * want.abs();
                let (g, cp) = (got[r * cols + c] as f64, cpu[r * cols + c] as f64);
                assert!((g - want).abs() <= bound, "{rows}x{cols} [{r}, {c}]: gpu {g}, exact {want}");
                let cpu_bound = (cols + 24) as f64 * U * want.abs();
                assert!((g - cp).abs() <= bound + cpu_bound, "{rows}x{cols} [{r}, {c}]: gpu {g}, cpu {cp}");
            }
        }
    }
}

#[test]
fn softmax_matches_f64_and_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(20);
    for (rows, cols) in [(1, 1), (4, 8), (3, 1000), (2, 151_936)] {
        let x0 = bf16_vec(&mut rng, rows * cols, 12.0);
        let mut got = x0.clone();
        gpu.softmax(&mut got, cols).unwrap();
        for (r, row) in x0.chunks(cols).enumerate() {
            let mut cpu = row.to_vec();
            crate::softmax(&mut cpu);
            let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let spread = row.iter().fold(0.0f64, |s, &v| s.max(m - v as f64));
            let sum: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
            for c in 0..cols {
                let want = (row[c] as f64 - m).exp() / sum;
                let bound = (2.0 * spread + (cols.div_ceil(THREADS) + 24) as f64) * U * want;
                let g = got[r * cols + c] as f64;
                assert!((g - want).abs() <= bound, "{rows}x{cols} [{r}, {c}]: gpu {g}, exact {want}");
                let cpu_bound = (cols + 24) as f64 * U * want;
                assert!(
                    (g - cpu[c] as f64).abs() <= bound + cpu_bound,
                    "{rows}x{cols} [{r}, {c}]: gpu {g}, cpu {}",
                    cpu[c]
                );
            }
        }
    }
}

#[test]
fn shape_mismatches_are_errors_not_launches() {
    let Some(gpu) = gpu() else { return };
    let bytes = quantize(DType::F32, &[1.0; 64]);
    let w = Weight::new(DType::F32, &bytes, 2, 32).unwrap();
    let mut out = vec![0.0; 3];
    let err = gpu.try_matmuls(&[1.0; 32], &mut [(w, &mut out)]).unwrap_err();
    assert!(err.to_string().contains("into 3 values"), "{err}");
    let err = gpu.try_matmuls(&[1.0; 33], &mut [(w, &mut [0.0; 2])]).unwrap_err();
    assert!(err.to_string().contains("not rows of 32"), "{err}");
}
