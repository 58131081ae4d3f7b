//! Decode GEMV against memory bandwidth, in one run: the machine's memory read bandwidth, then
//! one-token matmuls over bf16, q8_0 and q4_0 copies of expert-shaped weights (all cores, the
//! detected SIMD path, inside the compute pool as a forward pass runs them), each cycling
//! through enough copies to overflow the L3 cache. Reports weight bytes read per second, that
//! rate as a fraction of the memory bandwidth, and each block format's fraction over bf16's;
//! the bar (kernels issue): q8_0's fraction >= 0.8 x bf16's on every shape.
//!
//! Rounds alternate the formats (one pass over each format's copies per round, best pass
//! kept), so a slower stretch of a shared machine hits every format alike. The `other load`
//! column is the cores' worth of CPU other processes used while a shape ran (all CPU time from
//! /proc/stat minus this process's own): on two cores, anything above ~0.1 shows in the rates.

use std::hint::black_box;
use std::process::ExitCode;
use std::time::Instant;

use stevedore_bench::{probe, setup};
use stevedore_kernels::{in_pool, matmul, quantize, DType, Isa, Weight};

const USAGE: &str = "\
usage: gemv [options]
  --shapes LIST   rows x cols of each weight (default 1024x2048,768x2048,2048x768,14336x4096)
  --rounds N      passes over each format's copies, best kept (default 15)
  --cold-mib N    bytes of copies per format, MiB, well over the L3 (default 256)";

const DTYPES: [DType; 3] = [DType::BF16, DType::Q8_0, DType::Q4_0];

/// The bar: a block format's fraction of the memory bandwidth over bf16's.
const BAR: f64 = 0.8;

struct Args {
    shapes: Vec<(usize, usize)>,
    rounds: usize,
    cold_bytes: usize,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        shapes: vec![(1024, 2048), (768, 2048), (2048, 768), (14336, 4096)],
        rounds: 15,
        cold_bytes: 256 << 20,
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--shapes" => a.shapes = value()?.split(',').map(shape).collect::<Result<_, _>>()?,
            "--rounds" => a.rounds = setup::positive(&flag, &value()?)?,
            "--cold-mib" => a.cold_bytes = setup::positive(&flag, &value()?)? << 20,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown flag `{other}`\n{USAGE}")),
        }
    }
    Ok(a)
}

fn shape(s: &str) -> Result<(usize, usize), String> {
    let parse = |v: &str| v.trim().parse::<usize>().ok().filter(|&v| v > 0);
    match s.split_once('x').map(|(r, c)| (parse(r), parse(c))) {
        Some((Some(r), Some(c))) if c % 32 == 0 => Ok((r, c)),
        _ => Err(format!("shape `{s}`: want ROWSxCOLS, cols a multiple of 32")),
    }
}

/// Copies of one `rows x cols` weight of `dtype` (quantized from seeded values in [-1, 1)),
/// enough to fill `cold_bytes`.
fn cold_copies(dtype: DType, rows: usize, cols: usize, cold_bytes: usize) -> Vec<Vec<u8>> {
    let mut state = 1u64;
    let values: Vec<f32> = (0..rows * cols)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    let one = quantize(dtype, &values);
    vec![one.clone(); cold_bytes.div_ceil(one.len()).max(2)]
}

/// Non-idle CPU seconds of all cores (first line of /proc/stat) and of this process.
fn cpu_seconds() -> Option<(f64, f64)> {
    let busy = stevedore_bench::runner::machine_busy_seconds()?;
    // SAFETY: `rusage` is plain data, valid when zeroed, and getrusage only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Some((busy, secs(usage.ru_utime) + secs(usage.ru_stime)))
}

/// Seconds of one pass: one GEMV on each copy in turn.
fn pass(weights: &[Weight], x: &[f32], out: &mut [f32]) -> f64 {
    let t0 = Instant::now();
    in_pool(|| {
        for w in weights {
            matmul(black_box(x), w, out);
        }
    });
    t0.elapsed().as_secs_f64()
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem = probe::memory_bandwidth(1 << 30, threads, 5);
    let bw = mem.best_gb_s();
    println!(
        "memory read bandwidth (1 GiB): {:.1} GB/s one core, {:.1} GB/s {threads} threads; fractions below use {bw:.1}",
        mem.one_core_gb_s, mem.all_cores_gb_s
    );
    println!(
        "path {}, {threads} threads, copies of {} MiB per format\n",
        Isa::detect().name(),
        args.cold_bytes >> 20
    );
    println!("| shape | format | bytes | us / GEMV | GB/s | of memory bw | fraction / bf16's | other load |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut pass_bar = true;
    for &(rows, cols) in &args.shapes {
        let copies: Vec<Vec<Vec<u8>>> =
            DTYPES.iter().map(|&d| cold_copies(d, rows, cols, args.cold_bytes)).collect();
        let weights: Vec<Vec<Weight>> = DTYPES
            .iter()
            .zip(&copies)
            .map(|(&d, cs)| cs.iter().map(|b| Weight::new(d, b, rows, cols).expect("sizes match")).collect())
            .collect();
        let x: Vec<f32> = (0..cols).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
        let mut out = vec![0.0f32; rows];
        let mut best = [f64::INFINITY; DTYPES.len()];
        let (t0, cpu0) = (Instant::now(), cpu_seconds());
        for round in 0..=args.rounds {
            for (i, ws) in weights.iter().enumerate() {
                let s = pass(ws, &x, &mut out) / ws.len() as f64;
                // Round 0 warms up (page faults, pool threads).
                if round > 0 {
                    best[i] = best[i].min(s);
                }
            }
        }
        let other = cpu0
            .zip(cpu_seconds())
            .map(|((b0, s0), (b1, s1))| (((b1 - b0) - (s1 - s0)) / t0.elapsed().as_secs_f64()).max(0.0));
        let other = other.map_or("?".to_string(), |o| format!("{o:.2}"));
        let gb_s = |i: usize| weights[i][0].data.len() as f64 / best[i] / 1e9;
        for (i, dtype) in DTYPES.iter().enumerate() {
            let ratio = gb_s(i) / gb_s(0);
            println!(
                "| {rows}x{cols} | {} | {:.2} MiB | {:.1} | {:.1} | {:.2} | {} | {other} |",
                dtype.name().to_lowercase(),
                weights[i][0].data.len() as f64 / (1 << 20) as f64,
                best[i] * 1e6,
                gb_s(i),
                gb_s(i) / bw,
                if i == 0 { "-".to_string() } else { format!("{ratio:.2}") },
            );
            if *dtype == DType::Q8_0 && ratio < BAR {
                pass_bar = false;
            }
        }
    }
    println!(
        "\nbar: q8_0 GEMV's fraction of memory bandwidth >= {BAR} x bf16's on every shape: {}",
        if pass_bar { "PASS" } else { "FAIL" }
    );
    if pass_bar {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
