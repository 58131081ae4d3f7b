//! What this machine can do, measured in the same run as the engine: memory read bandwidth and
//! the disk's O_DIRECT read bandwidth on the checkpoint's own expert bytes.
//!
//! These are the two ceilings the engine is judged against: a decode step that finds every expert
//! in RAM cannot beat reading its weights at memory speed, and one that misses cannot beat
//! reading the missed experts at disk speed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::checkpoint::{ExpertSpan, Plan, SplitMix64};
use crate::direct::{aligned, open_read, read_aligned, ALIGN};

#[derive(Clone, Debug, Serialize)]
pub struct MemoryBandwidth {
    pub buffer_bytes: u64,
    pub threads: usize,
    /// Best of several passes, GB/s (1e9 bytes per second).
    pub one_core_gb_s: f64,
    pub all_cores_gb_s: f64,
}

impl MemoryBandwidth {
    /// The machine's memory bandwidth: the faster of the two (all cores can come out slower than
    /// one when other work holds a core), so the bar built on it is never too lenient.
    pub fn best_gb_s(&self) -> f64 {
        self.one_core_gb_s.max(self.all_cores_gb_s)
    }
}

/// Sums a `buffer_bytes` buffer with one thread and with `threads`, best of `passes` each.
pub fn memory_bandwidth(buffer_bytes: usize, threads: usize, passes: usize) -> MemoryBandwidth {
    // Non-zero fill so that every page is really mapped before timing.
    let buf = vec![1u64; buffer_bytes / 8];
    let bytes = (buf.len() * 8) as f64;
    let best = |threads: usize| {
        let part = buf.len().div_ceil(threads);
        (0..passes)
            .map(|_| {
                let t0 = Instant::now();
                let total: u64 = std::thread::scope(|s| {
                    let handles: Vec<_> = buf.chunks(part).map(|c| s.spawn(move || sum(c))).collect();
                    handles.into_iter().map(|h| h.join().expect("summing cannot panic")).sum()
                });
                std::hint::black_box(total);
                bytes / t0.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max)
    };
    MemoryBandwidth {
        buffer_bytes: bytes as u64,
        threads,
        one_core_gb_s: best(1),
        all_cores_gb_s: best(threads),
    }
}

/// Eight independent accumulators so the loop is load-bound, not add-latency-bound.
#[inline(always)]
fn sum_lanes(x: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(*v);
        }
    }
    chunks.remainder().iter().chain(&acc).fold(0u64, |s, v| s.wrapping_add(*v))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(x: &[u64]) -> u64 {
    sum_lanes(x)
}

fn sum(x: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { sum_avx2(x) };
    }
    sum_lanes(x)
}

#[derive(Clone, Debug, Serialize)]
pub struct DiskBandwidth {
    /// Whether the files could be opened with O_DIRECT (else buffered, after evicting them from
    /// the page cache, which still measures the disk on the first read).
    pub direct_io: bool,
    pub sequential_bytes: u64,
    pub sequential_chunk_bytes: u64,
    pub sequential_gb_s: f64,
    /// One whole expert per read, at random experts: what a cache miss does.
    pub random_read_bytes: u64,
    pub random_reads: usize,
    pub random_gb_s: f64,
    /// The same with `threads` readers at once.
    pub threads: usize,
    pub random_parallel_gb_s: f64,
}

impl DiskBandwidth {
    /// The fastest rate measured: the floor built on it is one the engine could only reach
    /// with the disk's best access pattern, so it is never too lenient.
    pub fn best_gb_s(&self) -> f64 {
        self.sequential_gb_s.max(self.random_gb_s).max(self.random_parallel_gb_s)
    }
}

/// How much the disk probe reads.
#[derive(Clone, Copy, Debug)]
pub struct DiskProbe {
    pub sequential_bytes: u64,
    pub sequential_chunk_bytes: usize,
    pub random_reads: usize,
    pub threads: usize,
}

impl DiskProbe {
    /// The benchmarks' default probe: 2 GiB read sequentially in 4 MiB reads, 64 random whole
    /// experts, then the same with `threads` readers.
    pub fn with_threads(threads: usize) -> Self {
        DiskProbe { sequential_bytes: 2048 << 20, sequential_chunk_bytes: 4 << 20, random_reads: 64, threads }
    }
}

/// Reads expert data of the checkpoint in `dir`: whole layers' experts in order in
/// `sequential_chunk_bytes` reads, then whole experts in random order from the other layers (so
/// no byte is read twice when the checkpoint is large enough), first one at a time, then with
/// `threads` readers.
pub fn disk_bandwidth(dir: &Path, plan: &Plan, probe: DiskProbe) -> Result<DiskBandwidth, String> {
    let paths: Vec<PathBuf> = plan.shards.iter().map(|s| dir.join(&s.file_name)).collect();
    evict_from_page_cache(&paths)?;
    let mut files = Vec::with_capacity(paths.len());
    let mut direct_io = true;
    for p in &paths {
        let (f, direct) = open_read(p)?;
        direct_io &= direct;
        files.push(f);
    }
    let spans = plan.expert_spans()?;
    let layers = plan.shape.num_hidden_layers;
    // Sequential: each layer's experts form one run of bytes.
    let mut seq_layers = Vec::new();
    let mut seq_bytes = 0u64;
    let t0 = Instant::now();
    let mut buf = aligned(probe.sequential_chunk_bytes + ALIGN)?;
    for layer in 0..layers {
        if seq_bytes >= probe.sequential_bytes {
            break;
        }
        let mine: Vec<&ExpertSpan> = spans.iter().filter(|s| s.layer == layer).collect();
        let (start, end) =
            (mine.iter().map(|s| s.start).min().unwrap(), mine.iter().map(|s| s.end).max().unwrap());
        let f = &files[mine[0].shard];
        let mut at = start / ALIGN as u64 * ALIGN as u64;
        while at < end && seq_bytes < probe.sequential_bytes {
            let n = (end - at).min(probe.sequential_chunk_bytes as u64);
            seq_bytes += read_aligned(f, &paths[mine[0].shard], &mut buf, at, at + n)?;
            at += n;
        }
        seq_layers.push(layer);
    }
    let sequential_gb_s = seq_bytes as f64 / t0.elapsed().as_secs_f64() / 1e9;

    // Random: whole experts, preferring those the sequential pass did not touch.
    let mut rng = SplitMix64(0x5EED);
    let (mut fresh, mut seen): (Vec<ExpertSpan>, Vec<ExpertSpan>) =
        spans.iter().partition(|s| !seq_layers.contains(&s.layer));
    shuffle(&mut fresh, &mut rng);
    shuffle(&mut seen, &mut rng);
    let order: Vec<ExpertSpan> = fresh.into_iter().chain(seen).cycle().take(probe.random_reads * 2).collect();
    let (one, many) = order.split_at(probe.random_reads);
    let expert_bytes = plan.shape.expert_bytes();
    let read_all = |spans: &[ExpertSpan]| -> Result<u64, String> {
        let mut buf = aligned(expert_bytes as usize + 2 * ALIGN)?;
        spans.iter().map(|s| read_aligned(&files[s.shard], &paths[s.shard], &mut buf, s.start, s.end)).sum()
    };
    let t0 = Instant::now();
    let bytes = read_all(one)?;
    let random_gb_s = bytes as f64 / t0.elapsed().as_secs_f64() / 1e9;
    let t0 = Instant::now();
    let threads = probe.threads.max(1);
    let read_all = &read_all;
    let bytes: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = many
            .chunks(many.len().div_ceil(threads).max(1))
            .map(|part| s.spawn(move || read_all(part)))
            .collect();
        handles.into_iter().map(|h| h.join().expect("reading cannot panic")).sum::<Result<u64, String>>()
    })?;
    let random_parallel_gb_s = bytes as f64 / t0.elapsed().as_secs_f64() / 1e9;
    Ok(DiskBandwidth {
        direct_io,
        sequential_bytes: seq_bytes,
        sequential_chunk_bytes: probe.sequential_chunk_bytes as u64,
        sequential_gb_s,
        random_read_bytes: expert_bytes,
        random_reads: probe.random_reads,
        random_gb_s,
        threads,
        random_parallel_gb_s,
    })
}

fn shuffle<T>(v: &mut [T], rng: &mut SplitMix64) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i + 1));
    }
}

/// Asks the kernel to drop `paths` from the page cache, so that the next buffered read (or
/// mmap) of them goes to the disk. Only clean pages go, hence the `sync_all` the writer does.
pub fn evict_from_page_cache(paths: &[PathBuf]) -> Result<(), String> {
    for p in paths {
        let f = File::open(p).map_err(|e| format!("{}: cannot open: {e}", p.display()))?;
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: the descriptor belongs to `f`, which is open for the whole call.
            let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            if rc != 0 {
                return Err(format!(
                    "{}: posix_fadvise failed: {}",
                    p.display(),
                    std::io::Error::from_raw_os_error(rc)
                ));
            }
        }
    }
    Ok(())
}

/// What the numbers were measured on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_bytes: u64,
    pub kernel: String,
    /// `/proc/loadavg`'s 1-minute load: above the benchmark's own use, other work was running.
    pub load_1min: f64,
}

pub fn machine() -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let memory_bytes = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024);
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_bytes,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        load_1min: load_1min(),
    }
}

pub fn load_1min() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Shape;

    #[test]
    fn sum_matches_a_plain_fold() {
        let v: Vec<u64> = (0..1003u64).map(|i| i * 7919).collect();
        assert_eq!(sum(&v), v.iter().sum::<u64>());
        assert_eq!(sum_lanes(&v[..5]), v[..5].iter().sum::<u64>());
    }

    #[test]
    fn memory_probe_reports_positive_rates() {
        let m = memory_bandwidth(8 << 20, 2, 2);
        assert_eq!(m.buffer_bytes, 8 << 20);
        assert!(m.one_core_gb_s > 0.0 && m.all_cores_gb_s > 0.0, "{m:?}");
    }

    #[test]
    fn disk_probe_reads_a_small_checkpoint() {
        let shape = Shape {
            hidden_size: 64,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 4,
            num_experts: 8,
            num_experts_per_tok: 2,
            intermediate_size: 96,
            vocab_size: 64,
            layers_per_shard: 2,
        };
        let plan = Plan::new(shape).unwrap();
        let dir = crate::TempDir::new("disk-probe").unwrap();
        plan.write(dir.path(), 2, &mut |_| {}).unwrap();
        let probe = DiskProbe {
            sequential_bytes: 4 << 20,
            sequential_chunk_bytes: 16384,
            random_reads: 5,
            threads: 2,
        };
        let d = disk_bandwidth(dir.path(), &plan, probe).unwrap();
        // All four layers' experts (4 x 8 x 36 KiB) fit under the 4 MiB sequential limit.
        assert!(d.sequential_bytes >= 4 * 8 * plan.shape.expert_bytes(), "{d:?}");
        assert!(d.sequential_gb_s > 0.0 && d.random_gb_s > 0.0 && d.random_parallel_gb_s > 0.0, "{d:?}");
        assert_eq!(d.random_read_bytes, plan.shape.expert_bytes());
    }
}
