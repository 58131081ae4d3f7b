//! From raw runs to the numbers the issue asks for: steady-state decode speed per budget, bytes
//! read and touched per token, achieved weight bandwidth, the floor set by compute plus disk, and
//! the pass/fail bars.

use serde::Serialize;

use crate::checkpoint::Shape;
use crate::probe::{DiskBandwidth, Machine, MemoryBandwidth};
use crate::runner::Run;

/// The budget whose steady state is taken as pure compute (every expert cached).
pub const FULL: &str = "100%";
/// Bar: at 100%, weights are read at least at this share of the memory bandwidth.
pub const MIN_MEMORY_SHARE: f64 = 0.5;
/// Bar: at this budget, time per token is within [`MAX_FLOOR_RATIO`] of the floor.
pub const FLOOR_BUDGET: &str = "25%";
pub const MAX_FLOOR_RATIO: f64 = 1.5;

/// The two runs made at one budget: `max_new_tokens` N and 2N, same prompt, greedy.
pub struct BudgetRuns {
    pub host_cache: String,
    pub short: Run,
    pub long: Run,
}

/// What the longer run did after the point where the shorter one stopped: its decode steps
/// N+1..2N. Differencing cancels start-up (loading, prefill, the cold cache of the first tokens),
/// so this is the steady state at the budget.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Steady {
    pub tokens: usize,
    pub seconds: f64,
    pub hits: u64,
    pub misses: u64,
    pub bytes_read: u64,
    /// The engine's own I/O and stall time over these steps, when it reports them.
    pub read_seconds: Option<f64>,
    pub stall_seconds: Option<f64>,
}

pub fn steady(short: &Run, long: &Run) -> Result<Steady, String> {
    let (s, l) = (&short.generated_ids, &long.generated_ids);
    if s.len() != short.max_new_tokens || l.len() != long.max_new_tokens {
        return Err(format!(
            "at {}: asked for {} and {} tokens, got {} and {} (the random checkpoint has no EOS id)",
            long.host_cache,
            short.max_new_tokens,
            long.max_new_tokens,
            s.len(),
            l.len()
        ));
    }
    if l.len() <= s.len() || l[..s.len()] != s[..] {
        return Err(format!("at {}: the longer greedy run does not extend the shorter one", long.host_cache));
    }
    let (a, b) = (&short.stats.expert_cache, &long.stats.expert_cache);
    let seconds = long.decode_seconds() - short.decode_seconds();
    if seconds <= 0.0 {
        return Err(format!(
            "at {}: {} decode steps took {:.3} s but {} took {:.3} s; the machine is too noisy, run again",
            long.host_cache,
            l.len() - 1,
            long.decode_seconds(),
            s.len() - 1,
            short.decode_seconds()
        ));
    }
    Ok(Steady {
        tokens: l.len() - s.len(),
        seconds,
        hits: b.hits.saturating_sub(a.hits),
        misses: b.misses.saturating_sub(a.misses),
        bytes_read: b.bytes_read.saturating_sub(a.bytes_read),
        read_seconds: b.read_seconds.zip(a.read_seconds).map(|(b, a)| b - a),
        stall_seconds: b.stall_seconds.zip(a.stall_seconds).map(|(b, a)| b - a),
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct BudgetResult {
    pub host_cache: String,
    pub budget_bytes: u64,
    pub peak_cache_bytes: u64,
    pub peak_rss_bytes: u64,
    pub direct_io: bool,
    pub steady: Steady,
    pub tokens_per_s: f64,
    pub seconds_per_token: f64,
    pub misses_per_token: f64,
    pub bytes_read_per_token: f64,
    pub expert_bytes_touched_per_token: u64,
    pub dense_bytes_touched_per_token: u64,
    /// All weight bytes a token touches (experts and dense) per second of decode, GB/s.
    pub weight_gb_s: f64,
    /// Expert bytes alone over the whole step time: a lower bound on the expert matmuls' own rate.
    pub expert_gb_s: f64,
    /// Compute time per token (from 100%) plus this budget's missed bytes at disk speed.
    pub floor_seconds_per_token: f64,
    pub ratio_to_floor: f64,
    /// Bytes read over the engine's own read time: how fast its I/O path pulls from the disk.
    pub engine_read_gb_s: Option<f64>,
    /// Seconds per token that compute waited for expert reads (start-up differences included, so
    /// only indicative).
    pub stall_seconds_per_token: Option<f64>,
    /// Cores' worth of CPU other processes used during the busier of the two runs.
    pub other_cores: Option<f64>,
    /// The engine's own decode rate for the longer run (start-up tokens included).
    pub engine_decode_tokens_per_s: f64,
}

/// Per-token weight traffic of the model, from the checkpoint's plan.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Traffic {
    pub expert_bytes_touched_per_token: u64,
    pub dense_bytes_touched_per_token: u64,
}

/// Evaluates every budget against the floor. The compute time is the 100% steady state minus
/// whatever it still read from disk (usually nothing) at `disk_gb_s`.
pub fn evaluate(runs: &[BudgetRuns], traffic: Traffic, disk_gb_s: f64) -> Result<Vec<BudgetResult>, String> {
    let full = runs
        .iter()
        .find(|r| r.host_cache == FULL)
        .ok_or("no run at host cache 100%: it defines compute time")?;
    let full = steady(&full.short, &full.long)?;
    let disk_bytes_per_s = disk_gb_s * 1e9;
    let compute = (full.seconds - full.bytes_read as f64 / disk_bytes_per_s).max(0.0) / full.tokens as f64;
    let touched = (traffic.expert_bytes_touched_per_token + traffic.dense_bytes_touched_per_token) as f64;
    runs.iter()
        .map(|r| {
            let st = steady(&r.short, &r.long)?;
            let n = st.tokens as f64;
            let seconds_per_token = st.seconds / n;
            let bytes_read_per_token = st.bytes_read as f64 / n;
            let floor = compute + bytes_read_per_token / disk_bytes_per_s;
            let cache = &r.long.stats.expert_cache;
            Ok(BudgetResult {
                host_cache: r.host_cache.clone(),
                budget_bytes: cache.budget_bytes,
                peak_cache_bytes: cache.peak_bytes,
                peak_rss_bytes: r.long.stats.peak_rss_bytes,
                direct_io: cache.direct_io,
                tokens_per_s: 1.0 / seconds_per_token,
                seconds_per_token,
                misses_per_token: st.misses as f64 / n,
                bytes_read_per_token,
                expert_bytes_touched_per_token: traffic.expert_bytes_touched_per_token,
                dense_bytes_touched_per_token: traffic.dense_bytes_touched_per_token,
                weight_gb_s: touched / seconds_per_token / 1e9,
                expert_gb_s: traffic.expert_bytes_touched_per_token as f64 / seconds_per_token / 1e9,
                floor_seconds_per_token: floor,
                ratio_to_floor: seconds_per_token / floor,
                engine_decode_tokens_per_s: r.long.stats.decode_tokens_per_s,
                other_cores: r.short.other_cores.zip(r.long.other_cores).map(|(a, b)| a.max(b)),
                // Without reads in the steady state these would be differences of the start-up
                // phases alone (prefill loading), i.e. noise.
                engine_read_gb_s: st
                    .read_seconds
                    .filter(|&s| s > 0.0 && st.bytes_read > 0)
                    .map(|s| st.bytes_read as f64 / s / 1e9),
                stall_seconds_per_token: st.stall_seconds.filter(|_| st.bytes_read > 0).map(|s| s / n),
                steady: st,
            })
        })
        .collect()
}

#[derive(Clone, Debug, Serialize)]
pub struct Bar {
    pub name: String,
    pub measured: f64,
    pub threshold: f64,
    pub pass: bool,
}

impl Bar {
    /// `- name: PASS (measured .., bar ..)`.
    pub fn line(&self) -> String {
        format!(
            "- {}: {} (measured {:.2}, bar {})",
            self.name,
            if self.pass { "PASS" } else { "FAIL" },
            self.measured,
            self.threshold
        )
    }
}

/// The two bars; a budget that was not run yields no bar.
pub fn bars(results: &[BudgetResult], memory: &MemoryBandwidth) -> Vec<Bar> {
    let mut bars = Vec::new();
    if let Some(r) = results.iter().find(|r| r.host_cache == FULL) {
        let share = r.weight_gb_s / memory.best_gb_s();
        bars.push(Bar {
            name: format!("{FULL}: weights read at >= {MIN_MEMORY_SHARE} x memory bandwidth"),
            measured: share,
            threshold: MIN_MEMORY_SHARE,
            pass: share >= MIN_MEMORY_SHARE,
        });
    }
    if let Some(r) = results.iter().find(|r| r.host_cache == FLOOR_BUDGET) {
        bars.push(Bar {
            name: format!("{FLOOR_BUDGET}: time per token <= {MAX_FLOOR_RATIO} x floor"),
            measured: r.ratio_to_floor,
            threshold: MAX_FLOOR_RATIO,
            pass: r.ratio_to_floor <= MAX_FLOOR_RATIO,
        });
    }
    bars
}

/// Everything one benchmark run measured; written as JSON with `--json-out`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub command: String,
    /// `git describe`-style commit of the tree the binaries were built from, `+dirty` if changed.
    pub commit: Option<String>,
    pub machine: Machine,
    /// 1-minute load average when the engine runs ended (the benchmark itself adds up to ~1-2).
    pub load_1min_at_end: f64,
    pub shape: Shape,
    pub checkpoint_bytes: u64,
    pub expert_bytes_total: u64,
    pub expert_bytes: u64,
    pub prompt_tokens: usize,
    pub max_new_tokens: usize,
    pub memory: MemoryBandwidth,
    /// The disk probe before the engine runs and, unless there were none, again after them.
    pub disk: Vec<DiskBandwidth>,
    /// The rate the floor uses: the best any probe measured.
    pub floor_disk_gb_s: f64,
    pub traffic: Traffic,
    pub budgets: Vec<BudgetResult>,
    /// Greedy ids were identical at every budget (the engine's correctness invariant).
    pub same_tokens_at_every_budget: bool,
    pub bars: Vec<Bar>,
}

/// `- Machine: ...` for a report's header.
pub fn machine_line(m: &Machine, load_1min_at_end: f64) -> String {
    format!(
        "- Machine: {}, {} cores, {:.1} GiB RAM, Linux {}; load average {:.2} at start, {:.2} at end.",
        m.cpu,
        m.cores,
        m.memory_bytes as f64 / (1u64 << 30) as f64,
        m.kernel,
        m.load_1min,
        load_1min_at_end
    )
}

/// `- Checkpoint: ...` for a report's header.
pub fn checkpoint_line(
    s: &Shape,
    checkpoint_bytes: u64,
    expert_bytes_total: u64,
    expert_bytes: u64,
) -> String {
    format!(
        "- Checkpoint: OLMoE-shaped, bf16, hidden {}, {} layers, {} heads ({} kv), {} experts, top-{}, expert \
         intermediate {}, vocab {}: {} in {} shards, experts {} ({} each).",
        s.hidden_size,
        s.num_hidden_layers,
        s.num_attention_heads,
        s.num_key_value_heads,
        s.num_experts,
        s.num_experts_per_tok,
        s.intermediate_size,
        s.vocab_size,
        gb(checkpoint_bytes as f64),
        s.num_hidden_layers.div_ceil(s.layers_per_shard),
        gb(expert_bytes_total as f64),
        mib(expert_bytes as f64)
    )
}

/// `- Disk {when} ...` for a report's header.
pub fn disk_line(d: &DiskBandwidth, when: &str) -> String {
    format!(
        "- Disk {when} ({}): sequential {:.2} GB/s ({} reads), random whole experts {:.2} GB/s (1 reader), \
         {:.2} GB/s ({} readers).",
        if d.direct_io { "O_DIRECT" } else { "buffered, page cache evicted" },
        d.sequential_gb_s,
        mib(d.sequential_chunk_bytes as f64),
        d.random_gb_s,
        d.random_parallel_gb_s,
        d.threads,
    )
}

pub fn gb(bytes: f64) -> String {
    format!("{:.2} GB", bytes / 1e9)
}

pub fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}"))
}

pub fn mib(bytes: f64) -> String {
    format!("{:.0} MiB", bytes / (1 << 20) as f64)
}

impl Report {
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let s = &self.shape;
        let mut out = String::new();
        let mut line = |l: String| {
            out.push_str(&l);
            out.push('\n');
        };
        line(machine_line(m, self.load_1min_at_end));
        line(checkpoint_line(s, self.checkpoint_bytes, self.expert_bytes_total, self.expert_bytes));
        line(format!(
            "- Per token: experts touched {}, dense weights {}. Prompt {} tokens; runs of {} and {} new tokens, \
             steady state = the difference.",
            mib(self.traffic.expert_bytes_touched_per_token as f64),
            mib(self.traffic.dense_bytes_touched_per_token as f64),
            self.prompt_tokens,
            self.max_new_tokens,
            2 * self.max_new_tokens
        ));
        line(format!(
            "- Memory read bandwidth ({} buffer): {:.1} GB/s one core, {:.1} GB/s {} cores; the bar uses {:.1} GB/s.",
            mib(self.memory.buffer_bytes as f64),
            self.memory.one_core_gb_s,
            self.memory.all_cores_gb_s,
            self.memory.threads,
            self.memory.best_gb_s()
        ));
        for (d, when) in self.disk.iter().zip(["before the runs", "after the runs"]) {
            line(disk_line(d, when));
        }
        line(format!("- The floor uses the best disk rate measured: {:.2} GB/s.", self.floor_disk_gb_s));
        if let Some(c) = &self.commit {
            line(format!("- Commit: {c}."));
        }
        if !self.budgets.is_empty() {
            line(String::new());
            line(
                "| host cache | budget | decode tok/s | misses/token | read/token | weight GB/s (experts only) | floor tok/s \
                 | time / floor | engine read GB/s | stall s/token | cache peak | peak RSS | O_DIRECT | other load |"
                    .into(),
            );
            line("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|".into());
            for r in &self.budgets {
                line(format!(
                    "| {} | {} | {:.2} | {:.1} | {} | {:.1} ({:.1}) | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} |",
                    r.host_cache,
                    gb(r.budget_bytes as f64),
                    r.tokens_per_s,
                    r.misses_per_token,
                    mib(r.bytes_read_per_token),
                    r.weight_gb_s,
                    r.expert_gb_s,
                    1.0 / r.floor_seconds_per_token,
                    r.ratio_to_floor,
                    opt(r.engine_read_gb_s),
                    opt(r.stall_seconds_per_token),
                    gb(r.peak_cache_bytes as f64),
                    gb(r.peak_rss_bytes as f64),
                    if r.direct_io { "yes" } else { "no" },
                    opt(r.other_cores)
                ));
            }
            line(String::new());
            line(format!(
                "Same greedy tokens at every budget: {}.",
                if self.same_tokens_at_every_budget { "yes" } else { "NO" }
            ));
        }
        for b in &self.bars {
            line(b.line());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::{ExpertCacheStats, Stats};

    fn run(budget: &str, ids: Vec<u32>, decode_seconds: f64, misses: u64, bytes_read: u64) -> Run {
        let decode_tokens_per_s = (ids.len() - 1) as f64 / decode_seconds;
        Run {
            host_cache: budget.into(),
            max_new_tokens: ids.len(),
            generated_ids: ids,
            stats: Stats {
                prefill_tokens_per_s: 1.0,
                decode_tokens_per_s,
                peak_rss_bytes: 0,
                expert_cache: ExpertCacheStats {
                    budget_bytes: 0,
                    peak_bytes: 0,
                    hits: 100,
                    misses,
                    bytes_read,
                    direct_io: true,
                    read_seconds: Some(decode_seconds / 2.0),
                    stall_seconds: None,
                    buffer_peak_bytes: None,
                    readers: None,
                },
                decode_seconds: None,
            },
            wall_seconds: 0.0,
            other_cores: None,
        }
    }

    fn pair(budget: &str, short_s: f64, long_s: f64, misses: (u64, u64), read: (u64, u64)) -> BudgetRuns {
        BudgetRuns {
            host_cache: budget.into(),
            short: run(budget, (0..5).collect(), short_s, misses.0, read.0),
            long: run(budget, (0..9).collect(), long_s, misses.1, read.1),
        }
    }

    #[test]
    fn steady_state_is_the_difference_of_the_two_runs() {
        let p = pair("50%", 1.0, 3.0, (10, 30), (1000, 5000));
        let st = steady(&p.short, &p.long).unwrap();
        assert_eq!(st.tokens, 4);
        assert!((st.seconds - 2.0).abs() < 1e-9);
        assert_eq!((st.misses, st.bytes_read), (20, 4000));
    }

    #[test]
    fn diverging_or_short_runs_are_errors() {
        let mut p = pair("50%", 1.0, 3.0, (0, 0), (0, 0));
        p.long.generated_ids[2] = 99;
        assert!(steady(&p.short, &p.long).unwrap_err().contains("does not extend"));
        let mut p = pair("50%", 1.0, 3.0, (0, 0), (0, 0));
        p.long.generated_ids.pop();
        assert!(steady(&p.short, &p.long).unwrap_err().contains("got 5 and 8"));
        let p = pair("50%", 3.0, 2.0, (0, 0), (0, 0));
        assert!(steady(&p.short, &p.long).unwrap_err().contains("too noisy"));
    }

    #[test]
    fn floor_is_compute_plus_missed_bytes_at_disk_speed() {
        // 100%: 4 tokens in 0.4 s, nothing read -> 0.1 s compute per token.
        // 25%: 4 tokens in 2.4 s, 4 GB read at 2 GB/s -> floor 0.1 + 0.5 = 0.6 s, measured 0.6 s.
        let runs =
            [pair("100%", 1.0, 1.4, (5, 5), (7, 7)), pair("25%", 1.0, 3.4, (0, 40), (0, 4_000_000_000))];
        let traffic = Traffic {
            expert_bytes_touched_per_token: 300_000_000,
            dense_bytes_touched_per_token: 100_000_000,
        };
        let res = evaluate(&runs, traffic, 2.0).unwrap();
        assert!((res[0].seconds_per_token - 0.1).abs() < 1e-9);
        assert!((res[0].weight_gb_s - 4.0).abs() < 1e-9);
        assert!((res[0].expert_gb_s - 3.0).abs() < 1e-9);
        assert!((res[0].ratio_to_floor - 1.0).abs() < 1e-9);
        assert!((res[1].floor_seconds_per_token - 0.6).abs() < 1e-9);
        assert!((res[1].ratio_to_floor - 1.0).abs() < 1e-9);
        assert!((res[1].misses_per_token - 10.0).abs() < 1e-9);
        // Read time 1.7 - 0.5 s for 4 GB.
        assert!((res[1].engine_read_gb_s.unwrap() - 4.0 / 1.2).abs() < 1e-9);
        assert_eq!(res[1].stall_seconds_per_token, None);
        assert_eq!(res[0].engine_read_gb_s, None, "nothing read at 100%");

        let memory =
            MemoryBandwidth { buffer_bytes: 1, threads: 2, one_core_gb_s: 5.0, all_cores_gb_s: 10.0 };
        let b = bars(&res, &memory);
        assert_eq!(b.len(), 2);
        assert!(!b[0].pass && (b[0].measured - 0.4).abs() < 1e-9, "{b:?}");
        assert!(b[1].pass, "{b:?}");
    }

    #[test]
    fn evaluation_needs_the_full_budget() {
        let runs = [pair("25%", 1.0, 3.4, (0, 40), (0, 4))];
        let traffic = Traffic { expert_bytes_touched_per_token: 1, dense_bytes_touched_per_token: 1 };
        assert!(evaluate(&runs, traffic, 2.0).unwrap_err().contains("100%"));
    }
}
