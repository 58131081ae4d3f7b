//! Runs the real `stevedore` binary as a child process and reads its `--json` output.
//!
//! The benchmark measures the binary users run, not a library call with a friendlier setup: the
//! same argument parsing, loading, budget resolution and expert store.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// The expert cache's counters, as `generate --json` prints them (other fields are ignored).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ExpertCacheStats {
    pub budget_bytes: u64,
    pub peak_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub bytes_read: u64,
    pub direct_io: bool,
    /// Time the engine's I/O spent reading, when it reports it.
    #[serde(default)]
    pub read_seconds: Option<f64>,
    /// Time compute waited for reads, when the engine reports it.
    #[serde(default)]
    pub stall_seconds: Option<f64>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Stats {
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub peak_rss_bytes: u64,
    pub expert_cache: ExpertCacheStats,
    /// Used when present; otherwise derived from the rate (see [`Run::decode_seconds`]).
    #[serde(default)]
    pub decode_seconds: Option<f64>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct GenerateJson {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub stats: Stats,
}

/// One `stevedore generate` run.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    pub host_cache: String,
    pub max_new_tokens: usize,
    pub generated_ids: Vec<u32>,
    pub stats: Stats,
    /// Whole process, loading included.
    pub wall_seconds: f64,
    /// Cores' worth of CPU that other processes used meanwhile (see [`CpuMeter`]); `None` where
    /// /proc/stat is not readable.
    pub other_cores: Option<f64>,
}

impl Run {
    /// Seconds spent in decode steps. The engine counts every generated token after the first
    /// as a decode step (the first comes from the prefill's logits).
    pub fn decode_seconds(&self) -> f64 {
        match self.stats.decode_seconds {
            Some(s) => s,
            None if self.stats.decode_tokens_per_s > 0.0 => {
                self.generated_ids.len().saturating_sub(1) as f64 / self.stats.decode_tokens_per_s
            }
            None => 0.0,
        }
    }
}

/// Parses the single JSON object `generate --json` prints on stdout.
pub fn parse_generate(stdout: &str) -> Result<GenerateJson, String> {
    serde_json::from_str(stdout.trim()).map_err(|e| {
        let head: String = stdout.chars().take(300).collect();
        format!("`stevedore generate --json` printed something unexpected ({e}); it began with: {head:?}")
    })
}

/// Runs `bin generate` greedily on `model` with the given prompt, token count and budget.
pub fn generate(
    bin: &Path,
    model: &Path,
    prompt_ids: &[u32],
    max_new_tokens: usize,
    host_cache: &str,
) -> Result<Run, String> {
    let ids: Vec<String> = prompt_ids.iter().map(u32::to_string).collect();
    let mut cmd = Command::new(bin);
    cmd.arg("generate")
        .arg("--model")
        .arg(model)
        .args(["--prompt-ids", &ids.join(",")])
        .args(["--max-new-tokens", &max_new_tokens.to_string()])
        .args(["--host-cache", host_cache])
        .args(["--temperature", "0"])
        .arg("--json");
    let meter = CpuMeter::start();
    let t0 = Instant::now();
    let out = run(&mut cmd, bin)?;
    let wall_seconds = t0.elapsed().as_secs_f64();
    let other_cores = meter.and_then(|m| m.other_cores(wall_seconds));
    let parsed = parse_generate(&String::from_utf8_lossy(&out.stdout))?;
    if parsed.prompt_ids != prompt_ids {
        return Err(format!(
            "`stevedore generate` echoed prompt ids {:?}, not {:?}",
            parsed.prompt_ids, prompt_ids
        ));
    }
    Ok(Run {
        host_cache: host_cache.to_string(),
        max_new_tokens,
        generated_ids: parsed.generated_ids,
        stats: parsed.stats,
        wall_seconds,
        other_cores,
    })
}

/// Measures how busy the machine was with work other than ours: CPU time all processes spent
/// (from /proc/stat) minus what our finished children spent (`getrusage`). Two cores shared with
/// compilers make timings noisy; this says by how much, per run.
pub struct CpuMeter {
    busy_seconds: f64,
    children_seconds: f64,
}

impl CpuMeter {
    pub fn start() -> Option<CpuMeter> {
        Some(CpuMeter { busy_seconds: machine_busy_seconds()?, children_seconds: children_cpu_seconds() })
    }

    /// Average cores used by others over `wall_seconds` since `start` (after our child exited).
    pub fn other_cores(&self, wall_seconds: f64) -> Option<f64> {
        let busy = machine_busy_seconds()? - self.busy_seconds;
        let ours = children_cpu_seconds() - self.children_seconds;
        (wall_seconds > 0.0).then(|| ((busy - ours) / wall_seconds).max(0.0))
    }
}

/// Non-idle CPU seconds of all cores since boot, from the first line of /proc/stat.
fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> =
        stat.lines().next()?.split_whitespace().skip(1).map_while(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already inside user).
    let busy: u64 =
        fields.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| busy as f64 / hz as f64)
}

/// User and system CPU seconds of this process's waited-for children.
fn children_cpu_seconds() -> f64 {
    // SAFETY: `rusage` is plain data, valid when zeroed, and getrusage only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// `bin inspect --model DIR`: its stdout, which also proves the checkpoint loads.
pub fn inspect(bin: &Path, model: &Path) -> Result<String, String> {
    let out = run(Command::new(bin).arg("inspect").arg("--model").arg(model), bin)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &mut Command, bin: &Path) -> Result<Output, String> {
    let out = cmd.output().map_err(|e| format!("{}: cannot run: {e}", bin.display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(format!("{cmd:?} failed ({}):\n{}", out.status, tail.join("\n")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"prompt_ids":[1,2,3],"generated_ids":[7,8,9,10],"text":"","stats":{
        "prefill_tokens_per_s":120.5,"decode_tokens_per_s":6.0,"peak_rss_bytes":1000,"load_seconds":0.1,
        "expert_cache":{"budget_bytes":500,"peak_bytes":400,"hits":10,"misses":5,"bytes_read":4096,
        "direct_io":true,"evictions":2,"read_seconds":0.25}}}"#;

    #[test]
    fn parses_generate_output_and_ignores_extra_fields() {
        let g = parse_generate(SAMPLE).unwrap();
        assert_eq!(g.prompt_ids, vec![1, 2, 3]);
        assert_eq!(g.generated_ids, vec![7, 8, 9, 10]);
        assert_eq!(g.stats.expert_cache.misses, 5);
        assert!(g.stats.expert_cache.direct_io);
        assert_eq!(g.stats.decode_seconds, None);
        assert_eq!(g.stats.expert_cache.read_seconds, Some(0.25));
        assert_eq!(g.stats.expert_cache.stall_seconds, None);
    }

    #[test]
    fn decode_time_counts_tokens_after_the_first() {
        let g = parse_generate(SAMPLE).unwrap();
        let run = Run {
            host_cache: "25%".into(),
            max_new_tokens: 4,
            generated_ids: g.generated_ids,
            stats: g.stats,
            wall_seconds: 1.0,
            other_cores: None,
        };
        assert!((run.decode_seconds() - 0.5).abs() < 1e-12);
        let mut with_seconds = run.clone();
        with_seconds.stats.decode_seconds = Some(0.7);
        assert_eq!(with_seconds.decode_seconds(), 0.7);
    }

    #[test]
    fn unexpected_output_is_a_clear_error() {
        let err = parse_generate("hello\n").unwrap_err();
        assert!(err.contains("printed something unexpected") && err.contains("hello"), "{err}");
        let err = parse_generate(r#"{"prompt_ids":[1]}"#).unwrap_err();
        assert!(err.contains("missing field"), "{err}");
    }

    #[test]
    fn cpu_meter_counts_a_busy_child_as_ours() {
        let meter = CpuMeter::start().expect("/proc/stat is readable on Linux");
        let before = children_cpu_seconds();
        let t0 = Instant::now();
        let burn = "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done";
        run(Command::new("sh").args(["-c", burn]), Path::new("sh")).unwrap();
        let ours = children_cpu_seconds() - before;
        assert!(ours > 0.05, "the child's CPU time was not seen: {ours} s");
        let other = meter.other_cores(t0.elapsed().as_secs_f64()).unwrap();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        assert!((0.0..=cores).contains(&other), "{other}");
    }

    #[test]
    fn a_failing_binary_reports_its_stderr() {
        let err = run(Command::new("sh").args(["-c", "echo boom >&2; exit 3"]), Path::new("sh")).unwrap_err();
        assert!(err.contains("boom") && err.contains("exit status: 3"), "{err}");
    }
}
