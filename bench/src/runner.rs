//! Runs the real `stevedore` binary as a child process and reads its `--json` output.
//!
//! The benchmark measures the binary users run, not a library call with a friendlier setup: the
//! same argument parsing, loading, budget resolution and expert store.

use std::path::{Path, PathBuf};
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
    /// Most bytes of expert buffers alive at once, when the engine reports it.
    #[serde(default)]
    pub buffer_peak_bytes: Option<u64>,
    /// Expert reader threads, when the engine reports them.
    #[serde(default)]
    pub readers: Option<usize>,
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
        // The streaming store alone, as measured before the default became predictive; the
        // prediction benchmark (`prefetch`) compares the policies.
        .args(["--policy", "lru"])
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
pub fn machine_busy_seconds() -> Option<f64> {
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
    check_status(cmd, &out)?;
    Ok(out)
}

/// An error with the command and the end of its stderr unless it succeeded.
fn check_status(cmd: &Command, out: &Output) -> Result<(), String> {
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
    Err(format!("{cmd:?} failed ({}):\n{}", out.status, tail.join("\n")))
}

/// The step counters of a `generate --batch` run (`stats.steps`): the engine's own type.
pub use stevedore_engine::engine::StepStats;

/// `stats` of `generate --batch --json`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct BatchStats {
    pub requests: usize,
    pub failed_requests: usize,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// From the first submission to the last completion (loading excluded).
    pub wall_seconds: f64,
    #[serde(default)]
    pub peak_rss_bytes: Option<u64>,
    #[serde(default)]
    pub dense_bytes: Option<u64>,
    #[serde(default)]
    pub kv_cache_bytes: Option<u64>,
    pub steps: StepStats,
    pub expert_cache: ExpertCacheStats,
}

/// One request's outcome in `generate --batch --json`: ids, or an error.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct BatchResult {
    pub line: usize,
    pub prompt_ids: Vec<u32>,
    #[serde(default)]
    pub generated_ids: Vec<u32>,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct BatchJson {
    pub results: Vec<BatchResult>,
    pub stats: BatchStats,
}

/// One line of the request file.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BatchRequest {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
}

/// How a batch is run: greedy, policy `lru` (the engine's default without a config file, named
/// explicitly), `--host-cache`, `--max-batch`, and with `readers` a config file setting
/// `[engine] readers`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BatchOptions {
    pub host_cache: String,
    pub max_batch: usize,
    pub readers: Option<usize>,
}

/// One `stevedore generate --batch` run.
#[derive(Clone, Debug, Serialize)]
pub struct BatchRun {
    pub options: BatchOptions,
    pub results: Vec<BatchResult>,
    pub stats: BatchStats,
    /// The whole process, loading included.
    pub process_wall_seconds: f64,
    /// Cores' worth of CPU that other processes used meanwhile (see [`CpuMeter`]).
    pub other_cores: Option<f64>,
}

/// Parses the single JSON object `generate --batch --json` prints on stdout.
pub fn parse_batch(stdout: &str) -> Result<BatchJson, String> {
    serde_json::from_str(stdout.trim()).map_err(|e| {
        let head: String = stdout.chars().take(300).collect();
        format!(
            "`stevedore generate --batch --json` printed something unexpected ({e}); it began with: {head:?}"
        )
    })
}

/// The config file for `readers` reader threads; it also names the policy, since a config file
/// would otherwise switch it to the file default (`predictive`).
pub fn readers_config(readers: usize) -> String {
    format!("# written by the stevedore batch benchmark\n[cache]\npolicy = \"lru\"\n\n[engine]\nreaders = {readers}\n")
}

/// Runs `bin generate --batch` greedily on `model`: writes the request file (and the config file
/// for `opts.readers`) to a temporary directory, runs, parses and checks the output: one result
/// per request, in order, echoing its prompt, none failed.
pub fn generate_batch(
    bin: &Path,
    model: &Path,
    requests: &[BatchRequest],
    opts: &BatchOptions,
) -> Result<BatchRun, String> {
    let tmp = crate::TempDir::new("batch-run")?;
    let write = |name: &str, text: String| -> Result<PathBuf, String> {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: cannot write: {e}", path.display()))?;
        Ok(path)
    };
    let lines: Vec<String> =
        requests.iter().map(|r| serde_json::to_string(r).expect("a request serialises")).collect();
    let batch = write("requests.jsonl", lines.join("\n") + "\n")?;
    let mut cmd = Command::new(bin);
    cmd.arg("generate")
        .arg("--model")
        .arg(model)
        .arg("--batch")
        .arg(&batch)
        .args(["--max-batch", &opts.max_batch.to_string()])
        .args(["--host-cache", &opts.host_cache])
        .args(["--policy", "lru"])
        .args(["--temperature", "0"])
        .arg("--json");
    if let Some(r) = opts.readers {
        cmd.arg("--config").arg(write("config.toml", readers_config(r))?);
    }
    let meter = CpuMeter::start();
    let t0 = Instant::now();
    let out = cmd.output().map_err(|e| format!("{}: cannot run: {e}", bin.display()))?;
    let process_wall_seconds = t0.elapsed().as_secs_f64();
    let other_cores = meter.and_then(|m| m.other_cores(process_wall_seconds));
    let parsed = parse_batch(&String::from_utf8_lossy(&out.stdout));
    // A failed request makes the exit status non-zero after the JSON: name it.
    if let Ok(p) = &parsed {
        if let Some(r) = p.results.iter().find(|r| r.error.is_some()) {
            return Err(format!(
                "{} of {} requests failed; line {}: {}",
                p.stats.failed_requests,
                p.results.len(),
                r.line,
                r.error.as_deref().unwrap_or_default()
            ));
        }
    }
    check_status(&cmd, &out)?;
    let parsed = parsed?;
    check_results(requests, &parsed.results)?;
    Ok(BatchRun {
        options: opts.clone(),
        results: parsed.results,
        stats: parsed.stats,
        process_wall_seconds,
        other_cores,
    })
}

/// One result per request, in file order, echoing its prompt.
fn check_results(requests: &[BatchRequest], results: &[BatchResult]) -> Result<(), String> {
    if results.len() != requests.len() {
        return Err(format!("{} requests but {} results", requests.len(), results.len()));
    }
    for (i, (q, r)) in requests.iter().zip(results).enumerate() {
        if r.line != i + 1 || r.prompt_ids != q.prompt_ids {
            return Err(format!(
                "result {} is line {} with prompt {:?}; expected line {} with prompt {:?}",
                i + 1,
                r.line,
                r.prompt_ids,
                i + 1,
                q.prompt_ids
            ));
        }
    }
    Ok(())
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

    const BATCH: &str = r#"{"results":[
        {"line":1,"prompt_ids":[1,2],"generated_ids":[5,6],"text":null,"finish_reason":"length"},
        {"line":2,"prompt_ids":[3],"error":"boom"}],
      "stats":{"requests":2,"failed_requests":1,"prompt_tokens":2,"generated_tokens":2,"wall_seconds":1.5,
        "generated_tokens_per_s":1.33,"peak_rss_bytes":null,"dense_bytes":10,"kv_cache_bytes":20,
        "steps":{"steps":3,"prefill_rows":3,"decode_rows":1,"generated_tokens":2,"max_batch_seen":2,
          "kv_blocks_peak":2,"forward_seconds":1.0,"busy_seconds":1.2,"requests_finished":1,"requests_failed":1},
        "expert_cache":{"policy":"lru","budget_bytes":500,"peak_bytes":400,"buffer_peak_bytes":450,"hits":1,
          "misses":2,"bytes_read":4096,"direct_io":true,"readers":2,"read_seconds":0.5,"stall_seconds":0.25},
        "forecast":null}}"#;

    #[test]
    fn parses_batch_output() {
        let b = parse_batch(BATCH).unwrap();
        assert_eq!(b.results.len(), 2);
        assert_eq!(b.results[0].generated_ids, vec![5, 6]);
        assert_eq!(b.results[0].finish_reason.as_deref(), Some("length"));
        assert_eq!(b.results[1].error.as_deref(), Some("boom"));
        assert!(b.results[1].generated_ids.is_empty());
        assert_eq!(b.stats.peak_rss_bytes, None);
        assert_eq!((b.stats.steps.steps, b.stats.steps.busy_seconds), (3, 1.2));
        let c = &b.stats.expert_cache;
        assert_eq!((c.buffer_peak_bytes, c.readers, c.stall_seconds), (Some(450), Some(2), Some(0.25)));
    }

    #[test]
    fn batch_results_must_echo_the_requests_in_order() {
        let b = parse_batch(BATCH).unwrap();
        let req = |ids: Vec<u32>| BatchRequest { prompt_ids: ids, max_new_tokens: 2 };
        check_results(&[req(vec![1, 2]), req(vec![3])], &b.results).unwrap();
        let err = check_results(&[req(vec![3]), req(vec![1, 2])], &b.results).unwrap_err();
        assert!(err.contains("expected line 1 with prompt [3]"), "{err}");
        assert!(check_results(&[req(vec![1, 2])], &b.results).unwrap_err().contains("1 requests but 2"));
    }

    #[test]
    fn request_lines_and_config_are_what_the_engine_reads() {
        let r = BatchRequest { prompt_ids: vec![4, 5], max_new_tokens: 64 };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"prompt_ids":[4,5],"max_new_tokens":64}"#);
        let cfg = readers_config(2);
        assert!(cfg.contains("[engine]\nreaders = 2\n") && cfg.contains("policy = \"lru\""), "{cfg}");
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
