//! The batching benchmark's numbers (`src/bin/batch.rs`): from `generate --batch` runs at several
//! concurrencies to generated tokens per second, bytes read per generated token, how many
//! distinct experts a layer step uses, the ratios to one sequence, the bars of the issue, the
//! reader-thread comparison and the single-sequence comparison with a previous binary.

use serde::Serialize;

use crate::checkpoint::Shape;
use crate::probe::{DiskBandwidth, Machine};
use crate::report::{checkpoint_line, disk_line, gb, machine_line, opt, Bar};
use crate::runner::{BatchRun, Run};

/// Bar: the concurrency compared with one sequence.
pub const BAR_CONCURRENCY: usize = 64;
/// Bar: at [`BAR_CONCURRENCY`], at least this many times the generated tokens/s of one sequence.
pub const MIN_SPEEDUP: f64 = 5.0;
/// Bar: at [`BAR_CONCURRENCY`], at most this share of one sequence's bytes read per token.
pub const MAX_READ_SHARE: f64 = 0.2;
/// Bar: one sequence at host-cache 100% decodes at least this share of the baseline binary's
/// rate (medians). "Not slower", with room for run-to-run noise, which the report shows.
pub const MIN_BASELINE_RATIO: f64 = 0.95;

/// What the evaluation needs to know about the model's routing.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Routing {
    pub moe_layers: usize,
    pub experts: usize,
    pub top_k: usize,
}

impl Routing {
    pub fn of(shape: &Shape) -> Routing {
        Routing {
            moe_layers: shape.num_hidden_layers,
            experts: shape.num_experts,
            top_k: shape.num_experts_per_tok,
        }
    }

    /// Distinct experts a layer uses for `tokens` rows when every row picks `top_k` of the
    /// experts uniformly at random: an expert is missed by one row with probability 1 - k/E.
    pub fn uniform_distinct(&self, tokens: usize) -> f64 {
        let e = self.experts as f64;
        e * (1.0 - (1.0 - self.top_k as f64 / e).powi(tokens.min(i32::MAX as usize) as i32))
    }
}

/// One batch run, evaluated.
#[derive(Clone, Debug, Serialize)]
pub struct SizeResult {
    /// Sequences in the run, all submitted at once, `--max-batch` the same.
    pub concurrency: usize,
    /// Reader threads asked for with a config file (`None`: the engine's default).
    pub readers_asked: Option<usize>,
    /// Reader threads the engine reports.
    pub readers: Option<usize>,
    pub generated_tokens: usize,
    pub steps: u64,
    pub prefill_rows: u64,
    pub decode_rows: u64,
    pub max_batch_seen: usize,
    /// The engine's time in steps (forward passes, scheduling, sampling).
    pub busy_seconds: f64,
    /// The engine's time from first submission to last completion.
    pub wall_seconds: f64,
    /// The whole process, loading included.
    pub process_wall_seconds: f64,
    /// Generated tokens over `busy_seconds`: the headline rate.
    pub tokens_per_s: f64,
    /// Generated tokens over `wall_seconds`.
    pub wall_tokens_per_s: f64,
    pub hits: u64,
    pub misses: u64,
    pub bytes_read: u64,
    pub bytes_per_token: f64,
    pub misses_per_step: f64,
    /// (hits + misses) / (steps x MoE layers): distinct experts a layer step used (the store
    /// counts each expert once per layer step).
    pub experts_per_layer_step: f64,
    /// The same for one decode step of `concurrency` rows under uniform random routing.
    pub uniform_experts_per_layer_step: f64,
    /// Token rows each expert access served: rows x top-k x layers / (hits + misses).
    pub rows_per_expert: f64,
    /// Bytes over the readers' summed read time: the rate of one reader.
    pub engine_read_gb_s: Option<f64>,
    /// Bytes over the busy time: the rate the run sustained.
    pub effective_read_gb_s: f64,
    /// Share of the busy time compute waited for reads or room.
    pub stall_share: Option<f64>,
    pub budget_bytes: u64,
    pub peak_cache_bytes: u64,
    pub buffer_peak_bytes: Option<u64>,
    /// Cache and buffer peaks at or under the budget.
    pub within_budget: bool,
    pub peak_rss_bytes: Option<u64>,
    pub kv_cache_bytes: Option<u64>,
    pub direct_io: bool,
    pub other_cores: Option<f64>,
    /// Tokens/s over the run at concurrency 1 (same readers setting).
    pub speedup_vs_one: Option<f64>,
    /// Bytes per token over the run at concurrency 1's.
    pub read_share_vs_one: Option<f64>,
    /// Requests whose tokens were compared with the same request run alone, and how many matched.
    pub alone_checked: usize,
    pub alone_equal: usize,
}

/// Evaluates one run. `alone[i]` holds request i's tokens when run by itself; runs of one
/// sequence are not compared (they are the reference). Every request must produce exactly
/// `max_new_tokens` (the random checkpoint has no EOS id).
pub fn evaluate(
    run: &BatchRun,
    routing: Routing,
    max_new_tokens: usize,
    alone: &[Vec<u32>],
) -> Result<SizeResult, String> {
    let n = run.results.len();
    let (st, c) = (&run.stats.steps, &run.stats.expert_cache);
    if let Some(r) = run.results.iter().find(|r| r.generated_ids.len() != max_new_tokens) {
        return Err(format!(
            "concurrency {n}: request on line {} made {} tokens, not {max_new_tokens} (finish reason {:?})",
            r.line,
            r.generated_ids.len(),
            r.finish_reason
        ));
    }
    if st.steps == 0 || st.busy_seconds <= 0.0 {
        return Err(format!("concurrency {n}: the engine reports no steps or no busy time"));
    }
    let generated = run.stats.generated_tokens;
    let accesses = c.hits + c.misses;
    let rows = st.prefill_rows + st.decode_rows;
    let layer_steps = st.steps as f64 * routing.moe_layers as f64;
    let checked = if n > 1 { n.min(alone.len()) } else { 0 };
    let equal = (0..checked).filter(|&i| run.results[i].generated_ids == alone[i]).count();
    let within_budget =
        c.peak_bytes <= c.budget_bytes && c.buffer_peak_bytes.is_none_or(|b| b <= c.budget_bytes);
    Ok(SizeResult {
        concurrency: n,
        readers_asked: run.options.readers,
        readers: c.readers,
        generated_tokens: generated,
        steps: st.steps,
        prefill_rows: st.prefill_rows,
        decode_rows: st.decode_rows,
        max_batch_seen: st.max_batch_seen,
        busy_seconds: st.busy_seconds,
        wall_seconds: run.stats.wall_seconds,
        process_wall_seconds: run.process_wall_seconds,
        tokens_per_s: generated as f64 / st.busy_seconds,
        wall_tokens_per_s: generated as f64 / run.stats.wall_seconds.max(1e-9),
        hits: c.hits,
        misses: c.misses,
        bytes_read: c.bytes_read,
        bytes_per_token: c.bytes_read as f64 / generated.max(1) as f64,
        misses_per_step: c.misses as f64 / st.steps as f64,
        experts_per_layer_step: accesses as f64 / layer_steps,
        uniform_experts_per_layer_step: routing.uniform_distinct(n),
        rows_per_expert: (rows * routing.top_k as u64 * routing.moe_layers as u64) as f64
            / accesses.max(1) as f64,
        engine_read_gb_s: c
            .read_seconds
            .filter(|&s| s > 0.0 && c.bytes_read > 0)
            .map(|s| c.bytes_read as f64 / s / 1e9),
        effective_read_gb_s: c.bytes_read as f64 / st.busy_seconds / 1e9,
        stall_share: c.stall_seconds.map(|s| s / st.busy_seconds),
        budget_bytes: c.budget_bytes,
        peak_cache_bytes: c.peak_bytes,
        buffer_peak_bytes: c.buffer_peak_bytes,
        within_budget,
        peak_rss_bytes: run.stats.peak_rss_bytes,
        kv_cache_bytes: run.stats.kv_cache_bytes,
        direct_io: c.direct_io,
        other_cores: run.other_cores,
        speedup_vs_one: None,
        read_share_vs_one: None,
        alone_checked: checked,
        alone_equal: equal,
    })
}

/// Fills the ratios to the run of one sequence with the same readers setting, where there is one.
pub fn relate_to_one(results: &mut [SizeResult]) {
    let ones: Vec<(Option<usize>, f64, f64)> = results
        .iter()
        .filter(|r| r.concurrency == 1)
        .map(|r| (r.readers_asked, r.tokens_per_s, r.bytes_per_token))
        .collect();
    for r in results.iter_mut() {
        if let Some(&(_, tps, bpt)) = ones.iter().find(|o| o.0 == r.readers_asked) {
            r.speedup_vs_one = Some(r.tokens_per_s / tps);
            r.read_share_vs_one = Some(if bpt > 0.0 {
                r.bytes_per_token / bpt
            } else if r.bytes_per_token == 0.0 {
                0.0
            } else {
                f64::INFINITY
            });
        }
    }
}

/// One single-prompt run of the baseline or the current binary.
#[derive(Clone, Debug, Serialize)]
pub struct SingleRun {
    pub decode_tokens_per_s: f64,
    pub prefill_tokens_per_s: f64,
    pub misses: u64,
    pub bytes_read: u64,
    pub peak_rss_bytes: u64,
    pub other_cores: Option<f64>,
    pub generated_ids: Vec<u32>,
}

impl From<Run> for SingleRun {
    fn from(r: Run) -> Self {
        let c = &r.stats.expert_cache;
        SingleRun {
            decode_tokens_per_s: r.stats.decode_tokens_per_s,
            prefill_tokens_per_s: r.stats.prefill_tokens_per_s,
            misses: c.misses,
            bytes_read: c.bytes_read,
            peak_rss_bytes: r.stats.peak_rss_bytes,
            other_cores: r.other_cores,
            generated_ids: r.generated_ids,
        }
    }
}

/// One sequence at a budget (100%), the baseline binary and the current one run alternately.
#[derive(Clone, Debug, Serialize)]
pub struct BaselineComparison {
    pub baseline_bin: String,
    pub host_cache: String,
    pub max_new_tokens: usize,
    pub baseline: Vec<SingleRun>,
    pub current: Vec<SingleRun>,
    pub baseline_median: f64,
    pub current_median: f64,
    /// current / baseline medians of decode tokens/s.
    pub ratio: f64,
    /// Every run of both binaries produced the same greedy tokens.
    pub same_tokens: bool,
    /// The current binary's tokens equal the same prompt's in the batch runs (alone, at the batch
    /// runs' budget), where that run was made.
    pub same_as_batched: Option<bool>,
}

pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

pub fn compare_baseline(
    baseline_bin: String,
    host_cache: String,
    max_new_tokens: usize,
    baseline: Vec<SingleRun>,
    current: Vec<SingleRun>,
) -> BaselineComparison {
    let rates = |v: &[SingleRun]| v.iter().map(|r| r.decode_tokens_per_s).collect::<Vec<_>>();
    let (b, c) = (median(&rates(&baseline)), median(&rates(&current)));
    let first = baseline.first().or(current.first()).map(|r| r.generated_ids.clone());
    let same_tokens = baseline.iter().chain(&current).all(|r| Some(&r.generated_ids) == first.as_ref());
    BaselineComparison {
        baseline_bin,
        host_cache,
        max_new_tokens,
        baseline,
        current,
        baseline_median: b,
        current_median: c,
        ratio: c / b,
        same_tokens,
        same_as_batched: None,
    }
}

/// The bars: at [`BAR_CONCURRENCY`] against one sequence (default readers), and one
/// sequence against the baseline binary. What was not run yields no bar.
pub fn bars(sizes: &[SizeResult], baseline: Option<&BaselineComparison>) -> Vec<Bar> {
    let mut bars = Vec::new();
    if let Some(r) = sizes.iter().find(|r| r.concurrency == BAR_CONCURRENCY && r.speedup_vs_one.is_some()) {
        let speedup = r.speedup_vs_one.unwrap_or(f64::NAN);
        bars.push(Bar {
            name: format!(
                "{BAR_CONCURRENCY} sequences: generated tokens/s >= {MIN_SPEEDUP} x one sequence's"
            ),
            measured: speedup,
            threshold: MIN_SPEEDUP,
            pass: speedup >= MIN_SPEEDUP,
        });
        let share = r.read_share_vs_one.unwrap_or(f64::NAN);
        bars.push(Bar {
            name: format!(
                "{BAR_CONCURRENCY} sequences: bytes read per generated token <= {MAX_READ_SHARE} x one sequence's"
            ),
            measured: share,
            threshold: MAX_READ_SHARE,
            pass: share <= MAX_READ_SHARE,
        });
    }
    if let Some(b) = baseline {
        bars.push(Bar {
            name: format!(
                "one sequence at {}: decode tokens/s >= {MIN_BASELINE_RATIO} x the baseline binary's (medians)",
                b.host_cache
            ),
            measured: b.ratio,
            threshold: MIN_BASELINE_RATIO,
            pass: b.ratio >= MIN_BASELINE_RATIO,
        });
    }
    bars
}

/// Everything one run of the batching benchmark measured; written as JSON with `--json-out`.
#[derive(Clone, Debug, Serialize)]
pub struct BatchReport {
    pub command: String,
    pub commit: Option<String>,
    pub machine: Machine,
    pub load_1min_at_end: f64,
    pub shape: Shape,
    pub checkpoint_bytes: u64,
    pub expert_bytes_total: u64,
    pub expert_bytes: u64,
    pub routing: Routing,
    pub host_cache: String,
    pub prompt_tokens: usize,
    pub max_new_tokens: usize,
    /// Disk probes before and after the engine runs (empty with `--no-disk-probe`).
    pub disk: Vec<DiskBandwidth>,
    /// One run per concurrency, engine default readers.
    pub sizes: Vec<SizeResult>,
    /// Runs with a config file setting the reader threads (`--readers`).
    pub readers: Vec<SizeResult>,
    /// Requests also run alone (each at concurrency 1).
    pub alone_requests: usize,
    /// Every compared request's batched tokens equal its tokens alone.
    pub batched_equals_alone: bool,
    /// Every run's cache and buffer peaks stayed within its budget.
    pub within_budget: bool,
    pub baseline: Option<BaselineComparison>,
    pub bars: Vec<Bar>,
}

impl BatchReport {
    /// Exit status 0: every bar passes, batched equals alone, budgets held.
    pub fn pass(&self) -> bool {
        self.batched_equals_alone && self.within_budget && self.bars.iter().all(|b| b.pass)
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let mut line = |l: String| {
            out.push_str(&l);
            out.push('\n');
        };
        let rt = &self.routing;
        line(machine_line(&self.machine, self.load_1min_at_end));
        line(checkpoint_line(&self.shape, self.checkpoint_bytes, self.expert_bytes_total, self.expert_bytes));
        line(format!(
            "- Requests: {} random prompt tokens each (different per request), {} new tokens, greedy, host cache {}, \
             policy lru, `--max-batch` = the number of sequences; page cache evicted before every run.",
            self.prompt_tokens, self.max_new_tokens, self.host_cache
        ));
        for (d, when) in self.disk.iter().zip(["before the runs", "after the runs"]) {
            line(disk_line(d, when));
        }
        if let Some(c) = &self.commit {
            line(format!("- Commit: {c}."));
        }
        if !self.sizes.is_empty() {
            line(String::new());
            table(&mut line, &self.sizes, rt);
            line(String::new());
            for r in &self.sizes {
                line(format!(
                    "- {} sequence{}: {} steps ({} prefill rows, {} decode rows, up to {} a step); a layer step \
                     used {:.1} of {} experts (uniform routing for one decode step: {:.1}), each access serving \
                     {:.1} token rows; {:.1} misses a step ({:.0}% of accesses); read {:.2} GB/s over the busy time{}.",
                    r.concurrency,
                    if r.concurrency == 1 { "" } else { "s" },
                    r.steps,
                    r.prefill_rows,
                    r.decode_rows,
                    r.max_batch_seen,
                    r.experts_per_layer_step,
                    rt.experts,
                    r.uniform_experts_per_layer_step,
                    r.rows_per_expert,
                    r.misses_per_step,
                    100.0 * r.misses as f64 / (r.hits + r.misses).max(1) as f64,
                    r.effective_read_gb_s,
                    r.stall_share.map_or(String::new(), |s| format!(", compute waited for reads {:.0}% of it", 100.0 * s))
                ));
            }
            line(String::new());
            line(format!(
                "Batched equals alone: {} ({} requests also run alone; {} of {} compared requests identical).",
                if self.batched_equals_alone { "yes" } else { "NO" },
                self.alone_requests,
                self.sizes.iter().chain(&self.readers).map(|r| r.alone_equal).sum::<usize>(),
                self.sizes.iter().chain(&self.readers).map(|r| r.alone_checked).sum::<usize>()
            ));
            line(format!(
                "Cache and buffer peaks within the budget in every run: {}.",
                if self.within_budget { "yes" } else { "NO" }
            ));
        }
        if !self.readers.is_empty() {
            line(String::new());
            line("Reader threads (a config file with `[engine] readers = R`):".into());
            line(String::new());
            table(&mut line, &self.readers, rt);
            line(String::new());
            for (n, base, r, x) in readers_ratios(&self.readers) {
                let seqs = if n == 1 { "sequence" } else { "sequences" };
                line(format!("- {n} {seqs}: {r} reader threads give {x:.2}x the tokens/s of {base}."));
            }
        }
        if let Some(b) = &self.baseline {
            line(String::new());
            let rates = |v: &[SingleRun]| {
                v.iter().map(|r| format!("{:.2}", r.decode_tokens_per_s)).collect::<Vec<_>>().join(", ")
            };
            line(format!(
                "One sequence at host cache {} ({} new tokens, `--prompt-ids`), run alternately: baseline `{}` \
                 decode {:.2} tok/s (median of {}), current {:.2} tok/s (median of {}): {:.2}x. Same tokens from \
                 both: {}; same as the batch runs' one sequence: {}.",
                b.host_cache,
                b.max_new_tokens,
                b.baseline_bin,
                b.baseline_median,
                rates(&b.baseline),
                b.current_median,
                rates(&b.current),
                b.ratio,
                if b.same_tokens { "yes" } else { "no" },
                match b.same_as_batched {
                    Some(true) => "yes",
                    Some(false) => "no",
                    None => "-",
                }
            ));
        }
        line(String::new());
        for b in &self.bars {
            line(b.line());
        }
        if self.baseline.is_none() {
            line(
                "- (no comparison of one sequence at 100% with a previous binary: pass --baseline-bin)"
                    .into(),
            );
        }
        if !self.sizes.iter().any(|r| r.concurrency == BAR_CONCURRENCY && r.speedup_vs_one.is_some()) {
            line(format!(
                "- (no bar for {BAR_CONCURRENCY} sequences: it needs runs at 1 and {BAR_CONCURRENCY})"
            ));
        }
        out
    }
}

/// (concurrency, first readers setting, readers, tokens/s over the first setting's at that
/// concurrency) for every other readers setting.
pub fn readers_ratios(rows: &[SizeResult]) -> Vec<(usize, usize, usize, f64)> {
    let mut out = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let Some(first) = rows.iter().position(|f| f.concurrency == r.concurrency) else { continue };
        let f = &rows[first];
        if let (true, Some(base), Some(asked)) = (first != i, f.readers_asked, r.readers_asked) {
            out.push((r.concurrency, base, asked, r.tokens_per_s / f.tokens_per_s));
        }
    }
    out
}

/// Bytes per token: MiB, with decimals where they are small.
fn per_token(b: f64) -> String {
    let m = b / (1 << 20) as f64;
    if m >= 10.0 {
        format!("{m:.0} MiB")
    } else {
        format!("{m:.2} MiB")
    }
}

/// GB from 1 GB up, MiB below (the small test shapes' budgets are a few MiB).
fn bytes(b: u64) -> String {
    if b >= 1_000_000_000 {
        gb(b as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
    }
}

fn table(line: &mut impl FnMut(String), rows: &[SizeResult], rt: &Routing) {
    line(
        "| sequences | readers | generated | tok/s (busy) | tok/s (wall) | x one | read/token | x one | misses/step \
         | experts/layer step | read GB/s: reader, busy | stall | cache peak / budget | buffer peak | peak RSS | KV | \
         same as alone | other load |"
            .into(),
    );
    line("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|".into());
    for r in rows {
        line(format!(
            "| {} | {} | {} | {:.2} | {:.2} | {} | {} | {} | {:.1} | {:.1} / {} | {}, {:.2} | {} | {} / {} | {} | {} | {} | {} | {} |",
            r.concurrency,
            r.readers.map_or("-".into(), |n| n.to_string()),
            r.generated_tokens,
            r.tokens_per_s,
            r.wall_tokens_per_s,
            opt(r.speedup_vs_one),
            per_token(r.bytes_per_token),
            r.read_share_vs_one.map_or("-".into(), |s| format!("{s:.3}")),
            r.misses_per_step,
            r.experts_per_layer_step,
            rt.experts,
            opt(r.engine_read_gb_s),
            r.effective_read_gb_s,
            r.stall_share.map_or("-".into(), |s| format!("{:.0}%", 100.0 * s)),
            bytes(r.peak_cache_bytes),
            bytes(r.budget_bytes),
            r.buffer_peak_bytes.map_or("-".into(), bytes),
            r.peak_rss_bytes.map_or("-".into(), bytes),
            r.kv_cache_bytes.map_or("-".into(), bytes),
            if r.alone_checked == 0 {
                "-".into()
            } else {
                format!("{}/{}", r.alone_equal, r.alone_checked)
            },
            opt(r.other_cores)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::{BatchOptions, BatchResult, BatchStats, ExpertCacheStats, Stats, StepStats};

    const ROUTING: Routing = Routing { moe_layers: 2, experts: 8, top_k: 2 };

    /// A run of `n` sequences of 4 tokens (request i makes [i, i, i, i]) in `steps` steps.
    fn batch(n: usize, steps: u64, busy: f64, accesses: (u64, u64), bytes_read: u64) -> BatchRun {
        let results = (0..n)
            .map(|i| BatchResult {
                line: i + 1,
                prompt_ids: vec![i as u32],
                generated_ids: vec![i as u32; 4],
                finish_reason: Some("length".into()),
                error: None,
            })
            .collect();
        BatchRun {
            options: BatchOptions { host_cache: "25%".into(), max_batch: n, readers: None },
            results,
            stats: BatchStats {
                requests: n,
                failed_requests: 0,
                prompt_tokens: n,
                generated_tokens: 4 * n,
                wall_seconds: busy * 1.25,
                peak_rss_bytes: Some(1000),
                dense_bytes: None,
                kv_cache_bytes: None,
                steps: StepStats {
                    steps,
                    prefill_rows: n as u64,
                    decode_rows: 3 * n as u64,
                    generated_tokens: 4 * n as u64,
                    max_batch_seen: n,
                    kv_blocks_peak: n,
                    forward_seconds: busy,
                    busy_seconds: busy,
                    ..StepStats::default()
                },
                expert_cache: ExpertCacheStats {
                    budget_bytes: 100,
                    peak_bytes: 100,
                    hits: accesses.0,
                    misses: accesses.1,
                    bytes_read,
                    direct_io: true,
                    read_seconds: Some(busy / 2.0),
                    stall_seconds: Some(busy / 4.0),
                    buffer_peak_bytes: Some(90),
                    readers: Some(1),
                },
            },
            process_wall_seconds: busy * 2.0,
            other_cores: None,
        }
    }

    #[test]
    fn uniform_routing_expectation() {
        assert!((ROUTING.uniform_distinct(1) - 2.0).abs() < 1e-12);
        assert!((ROUTING.uniform_distinct(2) - 8.0 * (1.0 - 0.75f64 * 0.75)).abs() < 1e-12);
        assert!(ROUTING.uniform_distinct(1000) > 7.999);
    }

    #[test]
    fn rates_per_token_step_and_layer() {
        let alone: Vec<Vec<u32>> = (0..4u32).map(|i| vec![i; 4]).collect();
        // 4 steps x 2 layers = 8 layer steps, 8 + 16 accesses: 3 experts a layer step.
        let r = evaluate(&batch(4, 4, 2.0, (8, 16), 1600), ROUTING, 4, &alone).unwrap();
        assert_eq!(r.generated_tokens, 16);
        assert!((r.tokens_per_s - 8.0).abs() < 1e-12);
        assert!((r.wall_tokens_per_s - 6.4).abs() < 1e-12);
        assert!((r.bytes_per_token - 100.0).abs() < 1e-12);
        assert!((r.misses_per_step - 4.0).abs() < 1e-12);
        assert!((r.experts_per_layer_step - 3.0).abs() < 1e-12);
        // 16 rows x top-2 x 2 layers over 24 accesses.
        assert!((r.rows_per_expert - 64.0 / 24.0).abs() < 1e-12);
        assert!((r.engine_read_gb_s.unwrap() - 1600.0 / 1.0 / 1e9).abs() < 1e-18);
        assert_eq!(r.stall_share, Some(0.25));
        assert!(r.within_budget);
        assert_eq!((r.alone_checked, r.alone_equal), (4, 4));

        let mut other = alone.clone();
        other[2] = vec![9; 4];
        let r = evaluate(&batch(4, 4, 2.0, (8, 16), 1600), ROUTING, 4, &other[..3]).unwrap();
        assert_eq!((r.alone_checked, r.alone_equal), (3, 2));
        let one = evaluate(&batch(1, 4, 2.0, (0, 8), 800), ROUTING, 4, &alone).unwrap();
        assert_eq!(one.alone_checked, 0, "one sequence is the reference, not compared");
    }

    #[test]
    fn short_runs_and_broken_budgets_are_caught() {
        let mut b = batch(2, 4, 1.0, (0, 8), 8);
        b.results[1].generated_ids.pop();
        let err = evaluate(&b, ROUTING, 4, &[]).unwrap_err();
        assert!(err.contains("line 2 made 3 tokens, not 4"), "{err}");
        let mut b = batch(2, 4, 1.0, (0, 8), 8);
        b.stats.expert_cache.buffer_peak_bytes = Some(101);
        assert!(!evaluate(&b, ROUTING, 4, &[]).unwrap().within_budget);
    }

    #[test]
    fn bars_compare_sixty_four_sequences_with_one() {
        let mut rs = vec![
            evaluate(&batch(1, 4, 4.0, (0, 8), 4000), ROUTING, 4, &[]).unwrap(),
            evaluate(&batch(64, 4, 2.0, (40, 24), 24000), ROUTING, 4, &[]).unwrap(),
        ];
        relate_to_one(&mut rs);
        // One: 4 tok in 4 s, 1000 B/token. 64: 256 tok in 2 s = 128x, 93.75 B/token.
        assert!((rs[1].speedup_vs_one.unwrap() - 128.0).abs() < 1e-9);
        assert!((rs[1].read_share_vs_one.unwrap() - 0.09375).abs() < 1e-12);
        let b = bars(&rs, None);
        assert_eq!(b.len(), 2);
        assert!(b.iter().all(|b| b.pass), "{b:?}");

        let mut slow = rs.clone();
        slow[1].speedup_vs_one = Some(4.0);
        slow[1].read_share_vs_one = Some(0.3);
        assert!(bars(&slow, None).iter().all(|b| !b.pass));
        assert!(bars(&rs[..1], None).is_empty(), "no bar without a run of 64");
    }

    #[test]
    fn readers_compare_with_the_first_setting_at_each_concurrency() {
        let with = |n: usize, readers: usize, busy: f64| {
            let mut b = batch(n, 4, busy, (0, 8), 8);
            b.options.readers = Some(readers);
            evaluate(&b, ROUTING, 4, &[]).unwrap()
        };
        let rows = [with(1, 1, 2.0), with(1, 2, 1.0), with(8, 1, 4.0), with(8, 2, 5.0)];
        assert_eq!(readers_ratios(&rows), vec![(1, 1, 2, 2.0), (8, 1, 2, 0.8)]);
    }

    #[test]
    fn baseline_uses_medians_and_checks_tokens() {
        let run = |tps: f64, ids: Vec<u32>| SingleRun {
            decode_tokens_per_s: tps,
            prefill_tokens_per_s: 1.0,
            misses: 0,
            bytes_read: 0,
            peak_rss_bytes: 0,
            other_cores: None,
            generated_ids: ids,
        };
        let c = compare_baseline(
            "previous/stevedore".into(),
            "100%".into(),
            4,
            vec![run(10.0, vec![1]), run(2.0, vec![1]), run(11.0, vec![1])],
            vec![run(9.8, vec![1]), run(10.2, vec![1]), run(3.0, vec![1])],
        );
        assert_eq!((c.baseline_median, c.current_median), (10.0, 9.8));
        assert!(c.same_tokens);
        let b = bars(&[], Some(&c));
        assert!(b[0].pass && (b[0].measured - 0.98).abs() < 1e-12, "{b:?}");
        let c =
            compare_baseline("b".into(), "100%".into(), 4, vec![run(10.0, vec![1])], vec![run(9.0, vec![2])]);
        assert!(!c.same_tokens && !bars(&[], Some(&c))[0].pass);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn single_runs_take_the_engine_rates() {
        let stats = Stats {
            prefill_tokens_per_s: 50.0,
            decode_tokens_per_s: 7.0,
            peak_rss_bytes: 5,
            expert_cache: batch(1, 1, 1.0, (1, 2), 3).stats.expert_cache,
            decode_seconds: None,
        };
        let run = Run {
            host_cache: "100%".into(),
            max_new_tokens: 2,
            generated_ids: vec![3, 4],
            stats,
            wall_seconds: 1.0,
            other_cores: Some(0.1),
        };
        let s = SingleRun::from(run);
        assert_eq!((s.decode_tokens_per_s, s.misses, s.bytes_read), (7.0, 2, 3));
    }
}
