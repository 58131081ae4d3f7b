//! Kernel micro-benchmarks: decode GEMV and prefill matmul over bf16/f16/f32 weights, next to
//! this machine's memory read bandwidth so the GB/s can be compared within one run.
//!
//! Throughput is bytes of weights per second. Decode cycles through enough copies of each
//! matrix to overflow the L3 cache, as decode does (every weight is read once per token), so
//! its GB/s is comparable with `mem_read`. Prefill MAC/s = bytes/s / dtype size * tokens.
//!
//! ```text
//! cargo bench -p stevedore-bench --bench matmul -- --warm-up-time 1 --measurement-time 3
//! ```

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use stevedore_kernels::{matmul_with, DType, Isa, MatmulOptions, Threading, Weight};

/// Total bytes of weight copies a decode benchmark cycles through: well over a 32 MiB L3.
const COLD_BYTES: usize = 256 << 20;

/// `(rows, cols)`: a dense projection, one Mixtral-sized expert projection split 8 ways
/// (1024x2048, as in the tests' small MoE), and Mixtral's 14336x4096 expert.
const SHAPES: [(usize, usize); 3] = [(2048, 2048), (1024, 2048), (14336, 4096)];

const DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

/// Deterministic values in [-1, 1) stored as `dtype`.
fn weight_bytes(dtype: DType, len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len * dtype.size());
    for _ in 0..len {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let v = (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
        match dtype {
            DType::F32 => out.extend(v.to_le_bytes()),
            DType::F16 => out.extend(half::f16::from_f32(v).to_bits().to_le_bytes()),
            DType::BF16 => out.extend(half::bf16::from_f32(v).to_bits().to_le_bytes()),
        }
    }
    out
}

/// Copies of one matrix, enough to overflow the caches when used in turn.
fn cold_copies(dtype: DType, rows: usize, cols: usize) -> Vec<Vec<u8>> {
    let one = weight_bytes(dtype, rows * cols, 1);
    let copies = COLD_BYTES.div_ceil(one.len()).max(1);
    vec![one; copies]
}

fn label(dtype: DType, rows: usize, cols: usize) -> String {
    format!("{}/{rows}x{cols}", dtype.name().to_lowercase())
}

/// Sums `data` so that the loop is bound by memory reads, not by the adds.
fn sum_u64(data: &[u64]) -> u64 {
    data.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

fn mem_read(c: &mut Criterion) {
    let len = (1usize << 30) / 8;
    // Filled with non-zero values so every page is really mapped (untouched calloc pages all
    // alias one zero page and read from cache).
    let buf: Vec<u64> = (0..len as u64).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut g = c.benchmark_group("mem_read");
    g.throughput(Throughput::Bytes((len * 8) as u64)).sample_size(10);
    g.bench_function("1GiB/1-thread", |b| b.iter(|| sum_u64(black_box(&buf))));
    g.bench_function(format!("1GiB/{threads}-threads"), |b| {
        b.iter(|| {
            std::thread::scope(|s| {
                let handles: Vec<_> = buf
                    .chunks(len.div_ceil(threads))
                    .map(|part| s.spawn(|| sum_u64(black_box(part))))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).fold(0u64, u64::wrapping_add)
            })
        })
    });
    g.finish();
}

/// Decode: one token, weights from DRAM. Single-threaded on each SIMD path (the per-core
/// rate), then on all cores with the default path.
fn gemv(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemv");
    g.sample_size(20);
    for (rows, cols) in SHAPES {
        for dtype in DTYPES {
            let copies = cold_copies(dtype, rows, cols);
            let weights: Vec<Weight> =
                copies.iter().map(|b| Weight::new(dtype, b, rows, cols).unwrap()).collect();
            let x = vec![0.5f32; cols];
            let mut out = vec![0.0f32; rows];
            g.throughput(Throughput::Bytes(weights[0].data.len() as u64));
            let mut runs = Isa::available()
                .into_iter()
                .filter(|&isa| isa != Isa::Scalar)
                .map(|isa| (isa, Threading::Single, format!("{}-1-thread", isa.name())))
                .collect::<Vec<_>>();
            runs.push((Isa::detect(), Threading::Auto, format!("{}-all-cores", Isa::detect().name())));
            for (isa, threading, name) in runs {
                let opts = MatmulOptions { isa, threading };
                let mut i = 0;
                g.bench_function(BenchmarkId::new(label(dtype, rows, cols), name), |b| {
                    b.iter(|| {
                        i = (i + 1) % weights.len();
                        matmul_with(opts, black_box(&x), &weights[i], &mut out);
                    })
                });
            }
        }
    }
    g.finish();
}

/// The scalar reference on one expert-sized matrix, for scale.
fn gemv_scalar(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemv_scalar");
    g.sample_size(10);
    let (rows, cols, dtype) = (1024, 2048, DType::BF16);
    let bytes = weight_bytes(dtype, rows * cols, 1);
    let w = Weight::new(dtype, &bytes, rows, cols).unwrap();
    let x = vec![0.5f32; cols];
    let mut out = vec![0.0f32; rows];
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    let opts = MatmulOptions { isa: Isa::Scalar, threading: Threading::Single };
    g.bench_function(label(dtype, rows, cols), |b| b.iter(|| matmul_with(opts, black_box(&x), &w, &mut out)));
    g.finish();
}

/// Prefill: several tokens against one matrix; compute-bound, so weights are reused from
/// cache by design. All cores, default path.
fn prefill(c: &mut Criterion) {
    let mut g = c.benchmark_group("prefill");
    g.sample_size(10);
    for (rows, cols) in [(2048, 2048), (14336, 4096)] {
        for dtype in DTYPES {
            let bytes = weight_bytes(dtype, rows * cols, 2);
            let w = Weight::new(dtype, &bytes, rows, cols).unwrap();
            g.throughput(Throughput::Bytes(bytes.len() as u64));
            for n in [4, 16, 64] {
                let x: Vec<f32> = (0..n * cols).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
                let mut out = vec![0.0f32; n * rows];
                let opts = MatmulOptions::default();
                g.bench_function(BenchmarkId::new(label(dtype, rows, cols), format!("n{n}")), |b| {
                    b.iter(|| matmul_with(opts, black_box(&x), &w, &mut out))
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, mem_read, gemv, gemv_scalar, prefill);
criterion_main!(benches);
