//! Kernel micro-benchmarks: decode GEMV and prefill matmul over bf16/f16/f32 weights and the
//! q8_0/q4_0 block formats, next to this machine's memory read bandwidth so the GB/s can be
//! compared within one run (`src/bin/gemv.rs` prints the block formats' ratios to bf16 directly).
//!
//! Throughput is bytes of weights per second (prefill MAC/s = bytes/s / bytes per weight *
//! tokens; q8_0 is 34/32 bytes a weight, q4_0 18/32);
//! `fma_peak_1thread` gives the core's multiply-add ceiling in elements (MACs) per second.
//! Decode cycles through enough copies of each matrix to overflow the L3 cache, as decode does
//! (every weight is read once per token), so its GB/s is comparable with `mem_read`.
//!
//! Groups ending in `_1thread` run on one thread and are timed in that thread's CPU time, not
//! wall time: on a shared machine this drops the time the thread spent descheduled (it still
//! counts memory stalls), so per-core rates stay comparable between runs. The other groups use
//! all cores and wall time.
//!
//! ```text
//! cargo bench -p stevedore-bench --bench matmul -- --warm-up-time 1 --measurement-time 3
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use stevedore_kernels::{matmul_with, quantize, DType, Isa, MatmulOptions, Threading, Weight};

/// Total bytes of weight copies a decode benchmark cycles through: well over a 32 MiB L3.
const COLD_BYTES: usize = 256 << 20;

/// `(rows, cols)`: a dense projection, an expert of the tests' small MoE, Mixtral's expert.
const SHAPES: [(usize, usize); 3] = [(2048, 2048), (1024, 2048), (14336, 4096)];

const PREFILL_SHAPES: [(usize, usize); 2] = [(2048, 2048), (14336, 4096)];

const PREFILL_TOKENS: [usize; 3] = [4, 16, 64];

const DTYPES: [DType; 5] = [DType::BF16, DType::F16, DType::F32, DType::Q8_0, DType::Q4_0];

/// Deterministic values in [-1, 1) stored as `dtype` (block formats quantized as ggml does).
fn weight_bytes(dtype: DType, len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let values: Vec<f32> = (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    quantize(dtype, &values)
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

/// 1 GiB filled with non-zero values, so that every page is really mapped (untouched calloc
/// pages all alias one zero page and read from cache).
fn gib_buffer() -> Vec<u64> {
    (0..(1u64 << 30) / 8).collect()
}

fn mem_read(c: &mut Criterion) {
    let buf = gib_buffer();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut g = c.benchmark_group("mem_read");
    g.throughput(Throughput::Bytes((buf.len() * 8) as u64)).sample_size(10);
    g.bench_function(format!("1GiB/{threads}-threads"), |b| {
        b.iter(|| {
            std::thread::scope(|s| {
                let parts = buf.chunks(buf.len().div_ceil(threads));
                let handles: Vec<_> = parts.map(|part| s.spawn(|| sum_u64(black_box(part)))).collect();
                handles.into_iter().map(|h| h.join().unwrap()).fold(0u64, u64::wrapping_add)
            })
        })
    });
    g.finish();
}

fn mem_read_1thread(c: &mut Criterion<ThreadCpuTime>) {
    let buf = gib_buffer();
    let mut g = c.benchmark_group("mem_read_1thread");
    g.throughput(Throughput::Bytes((buf.len() * 8) as u64)).sample_size(10);
    g.bench_function("1GiB", |b| b.iter(|| sum_u64(black_box(&buf))));
    g.finish();
}

/// Decode, one token, weights from DRAM, each `(isa, threading)` of `runs`.
fn gemv<M: Measurement>(c: &mut Criterion<M>, group: &str, runs: &[(Isa, Threading)]) {
    let mut g = c.benchmark_group(group);
    g.sample_size(20);
    for (rows, cols) in SHAPES {
        for dtype in DTYPES {
            let copies = cold_copies(dtype, rows, cols);
            let weights: Vec<Weight> =
                copies.iter().map(|b| Weight::new(dtype, b, rows, cols).unwrap()).collect();
            let x = vec![0.5f32; cols];
            let mut out = vec![0.0f32; rows];
            g.throughput(Throughput::Bytes(weights[0].data.len() as u64));
            for &(isa, threading) in runs {
                let opts = MatmulOptions { isa, threading };
                let mut i = 0;
                g.bench_function(BenchmarkId::new(label(dtype, rows, cols), isa.name()), |b| {
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

fn gemv_all_cores(c: &mut Criterion) {
    gemv(c, "gemv", &[(Isa::detect(), Threading::Auto)]);
}

fn gemv_1thread(c: &mut Criterion<ThreadCpuTime>) {
    let simd: Vec<_> = Isa::available()
        .into_iter()
        .filter(|&isa| isa != Isa::Scalar)
        .map(|isa| (isa, Threading::Single))
        .collect();
    gemv(c, "gemv_1thread", &simd);
    // The scalar reference on one expert-sized matrix only: it runs at well under 1 GB/s.
    let mut g = c.benchmark_group("gemv_1thread_scalar");
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

/// Prefill: several tokens against one matrix (compute-bound; the matrix is reused from cache
/// across iterations, as the token blocks of one call reuse it).
fn prefill<M: Measurement>(c: &mut Criterion<M>, group: &str, opts: MatmulOptions) {
    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    for (rows, cols) in PREFILL_SHAPES {
        for dtype in DTYPES {
            let bytes = weight_bytes(dtype, rows * cols, 2);
            let w = Weight::new(dtype, &bytes, rows, cols).unwrap();
            g.throughput(Throughput::Bytes(bytes.len() as u64));
            for n in PREFILL_TOKENS {
                let x: Vec<f32> = (0..n * cols).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
                let mut out = vec![0.0f32; n * rows];
                g.bench_function(BenchmarkId::new(label(dtype, rows, cols), format!("n{n}")), |b| {
                    b.iter(|| matmul_with(opts, black_box(&x), &w, &mut out))
                });
            }
        }
    }
    g.finish();
}

fn prefill_all_cores(c: &mut Criterion) {
    prefill(c, "prefill", MatmulOptions::default());
}

fn prefill_1thread(c: &mut Criterion<ThreadCpuTime>) {
    prefill(c, "prefill_1thread", MatmulOptions { isa: Isa::detect(), threading: Threading::Single });
}

/// The core's f32 FMA peak with AVX-512 (16 independent chains of multiply-adds, no memory), the
/// ceiling for `prefill_1thread`. Throughput in elements is multiply-adds per second.
#[cfg(target_arch = "x86_64")]
fn fma_peak_1thread(c: &mut Criterion<ThreadCpuTime>) {
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    unsafe fn chains(iters: usize) -> f32 {
        use std::arch::x86_64::*;
        let mut acc = [_mm512_set1_ps(1.0); 16];
        let (m, a) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, m, a);
            }
        }
        acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
    }
    if !Isa::Avx512.is_available() {
        return;
    }
    const ITERS: usize = 1 << 20;
    let mut g = c.benchmark_group("fma_peak_1thread");
    g.throughput(Throughput::Elements((ITERS * 16 * 16) as u64));
    // SAFETY: the CPU has AVX-512F (checked above).
    g.bench_function("avx512", |b| b.iter(|| unsafe { chains(black_box(ITERS)) }));
    g.finish();
}

#[cfg(not(target_arch = "x86_64"))]
fn fma_peak_1thread(_c: &mut Criterion<ThreadCpuTime>) {}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`).
struct ThreadCpuTime;

fn thread_cpu_now() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux defines.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu_now()
    }
    fn end(&self, start: Duration) -> Duration {
        thread_cpu_now().saturating_sub(start)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuTimeFormatter
    }
}

/// Formats nanoseconds of CPU time, and throughputs per second of it in decimal units (GB/s).
struct CpuTimeFormatter;

impl ValueFormatter for CpuTimeFormatter {
    fn scale_values(&self, typical_ns: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = match typical_ns {
            t if t < 1e3 => (1.0, "ns cpu"),
            t if t < 1e6 => (1e-3, "us cpu"),
            t if t < 1e9 => (1e-6, "ms cpu"),
            _ => (1e-9, "s cpu"),
        };
        values.iter_mut().for_each(|v| *v *= factor);
        unit
    }

    fn scale_throughputs(
        &self,
        _typical_ns: f64,
        throughput: &Throughput,
        values: &mut [f64],
    ) -> &'static str {
        let (per_iter, unit) = match *throughput {
            Throughput::Bytes(b) | Throughput::BytesDecimal(b) => (b as f64, "GB/s"),
            Throughput::Elements(e) => (e as f64, "Gelem/s"),
            Throughput::Bits(b) => (b as f64, "Gb/s"),
        };
        // Units per nanosecond are billions per second.
        values.iter_mut().for_each(|ns| *ns = per_iter / *ns);
        unit
    }

    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

criterion_group!(all_cores, mem_read, gemv_all_cores, prefill_all_cores);
criterion_group! {
    name = one_thread;
    config = Criterion::default().with_measurement(ThreadCpuTime);
    targets = mem_read_1thread, fma_peak_1thread, gemv_1thread, prefill_1thread
}
criterion_main!(one_thread, all_cores);
