//! Batching benchmark: on the end-to-end benchmark's random checkpoint at a host-cache budget,
//! runs 1, 4, 16 and 64 concurrent sequences through `stevedore generate --batch` and reports
//! generated tokens/s and bytes read per generated token against one sequence; checks that
//! batched tokens equal the same requests run alone; optionally compares reader-thread counts and
//! one sequence at host-cache 100% with a previous binary. See bench/README.md.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use stevedore_bench::batch::{self, BatchReport, Routing, SingleRun, SizeResult};
use stevedore_bench::checkpoint::{Plan, Shape, SplitMix64};
use stevedore_bench::probe::{self, DiskProbe};
use stevedore_bench::runner::{self, BatchOptions, BatchRequest, BatchRun};
use stevedore_bench::setup::{self, Checkpoint, SHAPE_USAGE};

const USAGE_HEAD: &str = "\
usage: batch [options]
  --dir DIR              write the checkpoint here (default: a new temporary directory); a DIR that
                         already holds the same checkpoint is reused without writing
  --keep                 keep the checkpoint afterwards (default: its files are deleted)
  --bin PATH             the stevedore binary (default: `stevedore` next to this executable)
  --concurrency LIST     numbers of concurrent sequences, one run each (default 1,4,16,64)
  --max-new-tokens N     new tokens per request (default 64)
  --prompt-tokens N      random prompt ids per request, different for every request (default 16)
  --seed N               seed of the prompts (default 1)
  --host-cache SIZE      expert cache budget of the batch runs (default 25%)
  --alone N              also run the first N requests alone and compare their tokens with every
                         batch that holds them (default 4; 0 = no check)
  --readers LIST         also compare these reader-thread counts (a config file with
                         `[engine] readers = R`) at the smallest and largest concurrency
  --baseline-bin PATH    a previous stevedore binary: one sequence at --baseline-cache, run
                         alternately with the current binary, decode tokens/s medians compared
  --baseline-runs N      runs of each binary for that comparison (default 3)
  --baseline-cache SIZE  host cache of that comparison (default 100%)
  --json-out FILE        also write every number as JSON
  --no-disk-probe        skip the O_DIRECT disk probe before and after the runs
  --threads N            threads for writing the checkpoint and the parallel disk probe (default: all cores)
  --disk-sequential-mib N  expert bytes read sequentially by the disk probe (default 2048)
  --disk-random-reads N  whole-expert reads per random-read pass (default 64)";
const USAGE_TAIL: &str = "\
Exit status: 0 when every bar passes, batched tokens equal alone and budgets hold; 1 when not;
2 on an error.";

fn usage() -> String {
    format!("{USAGE_HEAD}\n{SHAPE_USAGE}\n{USAGE_TAIL}")
}

#[derive(Debug)]
struct Args {
    dir: Option<PathBuf>,
    keep: bool,
    bin: Option<PathBuf>,
    concurrency: Vec<usize>,
    max_new_tokens: usize,
    prompt_tokens: usize,
    seed: u64,
    host_cache: String,
    alone: usize,
    readers: Vec<usize>,
    baseline_bin: Option<PathBuf>,
    baseline_runs: usize,
    baseline_cache: String,
    json_out: Option<PathBuf>,
    disk_probe: bool,
    threads: usize,
    disk: DiskProbe,
    shape: Shape,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut a = Args {
        dir: None,
        keep: false,
        bin: None,
        concurrency: vec![1, 4, 16, 64],
        max_new_tokens: 64,
        prompt_tokens: 16,
        seed: 1,
        host_cache: "25%".into(),
        alone: 4,
        readers: Vec::new(),
        baseline_bin: None,
        baseline_runs: 3,
        baseline_cache: "100%".into(),
        json_out: None,
        disk_probe: true,
        threads,
        disk: DiskProbe::with_threads(threads),
        shape: Shape::default(),
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let mut num = || -> Result<usize, String> {
            let v = value()?;
            v.parse::<usize>().map_err(|_| format!("{flag}: `{v}` is not a whole number"))
        };
        match flag.as_str() {
            "--dir" => a.dir = Some(value()?.into()),
            "--keep" => a.keep = true,
            "--bin" => a.bin = Some(value()?.into()),
            "--concurrency" => a.concurrency = setup::positive_list(&flag, &value()?)?,
            "--max-new-tokens" => a.max_new_tokens = num()?,
            "--prompt-tokens" => a.prompt_tokens = num()?,
            "--seed" => a.seed = num()? as u64,
            "--host-cache" => a.host_cache = value()?,
            "--alone" => a.alone = num()?,
            "--readers" => a.readers = setup::positive_list(&flag, &value()?)?,
            "--baseline-bin" => a.baseline_bin = Some(value()?.into()),
            "--baseline-runs" => a.baseline_runs = num()?,
            "--baseline-cache" => a.baseline_cache = value()?,
            "--json-out" => a.json_out = Some(value()?.into()),
            "--no-disk-probe" => a.disk_probe = false,
            "--threads" => a.threads = num()?,
            "--disk-sequential-mib" => a.disk.sequential_bytes = num()? as u64 * (1 << 20),
            "--disk-random-reads" => a.disk.random_reads = num()?,
            "-h" | "--help" => return Err(usage()),
            other => match setup::shape_field(&mut a.shape, other) {
                Some(field) => *field = num()?,
                None => return Err(format!("unknown argument `{other}`\n{}", usage())),
            },
        }
    }
    if a.max_new_tokens < 2 {
        return Err("--max-new-tokens must be at least 2 (decode rates need a token after the first)".into());
    }
    if a.prompt_tokens == 0 || a.threads == 0 || a.disk.random_reads == 0 || a.baseline_runs == 0 {
        return Err(
            "--prompt-tokens, --threads, --disk-random-reads and --baseline-runs must be positive".into()
        );
    }
    a.disk.threads = a.threads;
    Ok(a)
}

/// `n` requests of `tokens` random ids below `vocab`, seeded, no two prompts alike.
fn prompts(n: usize, tokens: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = SplitMix64(seed);
    let mut out: Vec<Vec<u32>> = Vec::with_capacity(n);
    while out.len() < n {
        let p: Vec<u32> = (0..tokens).map(|_| rng.below(vocab) as u32).collect();
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

fn main() -> ExitCode {
    setup::main("batch", parse_args, run)
}

fn log(m: &str) {
    eprintln!("[batch] {m}");
}

/// Runs and checks the binaries, then everything the report needs; see the module docs.
fn run(args: Args) -> Result<bool, String> {
    let command = setup::command_line("batch");
    let machine = probe::machine();
    let plan = Plan::new(args.shape.clone())?;
    let vocab = plan.shape.vocab_size;
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => setup::default_bin()?,
    };
    setup::check_bin(&bin)?;
    if let Some(b) = &args.baseline_bin {
        if !b.is_file() {
            return Err(format!("--baseline-bin {}: no such file", b.display()));
        }
    }
    let checkpoint =
        setup::prepare_checkpoint(&plan, args.dir.as_deref(), args.keep, args.threads, "batch", &log)?;
    let dir = checkpoint.dir();
    log("stevedore inspect:");
    eprint!("{}", runner::inspect(&bin, dir)?);

    let probe_disk = || -> Result<probe::DiskBandwidth, String> {
        log("measuring disk bandwidth");
        let d = probe::disk_bandwidth(dir, &plan, args.disk)?;
        log(&format!(
            "disk (direct {}): sequential {:.2} GB/s, random {:.2} GB/s, random x{} {:.2} GB/s",
            d.direct_io, d.sequential_gb_s, d.random_gb_s, d.threads, d.random_parallel_gb_s
        ));
        Ok(d)
    };
    let mut disk = Vec::new();
    if args.disk_probe {
        disk.push(probe_disk()?);
    }

    let most = args.concurrency.iter().copied().max().unwrap_or(1);
    if (vocab as f64).powi(args.prompt_tokens.min(64) as i32) < most as f64 {
        return Err(format!(
            "a vocabulary of {vocab} has no {most} different prompts of {} tokens",
            args.prompt_tokens
        ));
    }
    let alone_n = args.alone.min(most);
    let requests: Vec<BatchRequest> = prompts(most.max(alone_n), args.prompt_tokens, vocab, args.seed)
        .into_iter()
        .map(|prompt_ids| BatchRequest { prompt_ids, max_new_tokens: args.max_new_tokens })
        .collect();
    let routing = Routing::of(&plan.shape);
    let runs = Runs { bin: &bin, checkpoint: &checkpoint, requests: &requests, host_cache: &args.host_cache };

    // One run per concurrency, then the requests alone, then readers, then the baseline.
    let mut sweep: Vec<BatchRun> = Vec::new();
    for &n in &args.concurrency {
        sweep.push(runs.batch(n, None)?);
    }
    let mut alone: Vec<Vec<u32>> = Vec::with_capacity(alone_n);
    for i in 0..alone_n {
        let reuse = sweep.iter().find(|r| i == 0 && r.results.len() == 1 && r.options.readers.is_none());
        let ids = match reuse {
            Some(r) => r.results[0].generated_ids.clone(),
            None => runs.alone(i)?.results[0].generated_ids.clone(),
        };
        alone.push(ids);
    }
    let mut reader_runs = Vec::new();
    let least = args.concurrency.iter().copied().min().unwrap_or(1);
    let ends = if least == most { vec![least] } else { vec![least, most] };
    for &n in if args.readers.is_empty() { &[][..] } else { &ends[..] } {
        for &r in &args.readers {
            reader_runs.push(runs.batch(n, Some(r))?);
        }
    }
    let baseline = match &args.baseline_bin {
        Some(b) => {
            let mut c = run_baseline(b, &bin, dir, &checkpoint, &requests[0].prompt_ids, &args)?;
            c.same_as_batched = alone.first().zip(c.current.first()).map(|(a, r)| *a == r.generated_ids);
            Some(c)
        }
        None => None,
    };
    if args.disk_probe {
        disk.push(probe_disk()?);
    }

    let evaluate = |runs: &[BatchRun]| -> Result<Vec<SizeResult>, String> {
        let mut out = runs
            .iter()
            .map(|r| batch::evaluate(r, routing, args.max_new_tokens, &alone))
            .collect::<Result<Vec<_>, _>>()?;
        batch::relate_to_one(&mut out);
        Ok(out)
    };
    let sizes = evaluate(&sweep)?;
    let readers = evaluate(&reader_runs)?;
    let all = || sizes.iter().chain(&readers);
    let bars = batch::bars(&sizes, baseline.as_ref());
    let report = BatchReport {
        command,
        commit: setup::git_commit(),
        machine,
        load_1min_at_end: probe::load_1min(),
        shape: plan.shape.clone(),
        checkpoint_bytes: plan.total_bytes(),
        expert_bytes_total: plan.expert_bytes_total(),
        expert_bytes: plan.shape.expert_bytes(),
        routing,
        host_cache: args.host_cache.clone(),
        prompt_tokens: args.prompt_tokens,
        max_new_tokens: args.max_new_tokens,
        disk,
        alone_requests: alone_n,
        batched_equals_alone: all().all(|r| r.alone_equal == r.alone_checked),
        within_budget: all().all(|r| r.within_budget),
        sizes,
        readers,
        baseline,
        bars,
    };
    print!("{}", report.markdown());
    if let Some(path) = &args.json_out {
        let text =
            serde_json::to_string_pretty(&report).map_err(|e| format!("cannot encode the report: {e}"))?;
        std::fs::write(path, text).map_err(|e| format!("{}: cannot write: {e}", path.display()))?;
    }
    Ok(report.pass())
}

/// What every batch run shares; each starts with the checkpoint evicted from the page cache.
struct Runs<'a> {
    bin: &'a Path,
    checkpoint: &'a Checkpoint<'a>,
    requests: &'a [BatchRequest],
    host_cache: &'a str,
}

impl Runs<'_> {
    /// The first `n` requests together, `--max-batch n`.
    fn batch(&self, n: usize, readers: Option<usize>) -> Result<BatchRun, String> {
        self.go(&self.requests[..n], readers, &format!("x{n}"))
    }

    /// Request `i` by itself.
    fn alone(&self, i: usize) -> Result<BatchRun, String> {
        self.go(&self.requests[i..=i], None, &format!("request {} alone", i + 1))
    }

    fn go(&self, requests: &[BatchRequest], readers: Option<usize>, what: &str) -> Result<BatchRun, String> {
        probe::evict_from_page_cache(&self.checkpoint.shard_paths())?;
        let opts =
            BatchOptions { host_cache: self.host_cache.to_string(), max_batch: requests.len(), readers };
        let r = runner::generate_batch(self.bin, self.checkpoint.dir(), requests, &opts)?;
        let (s, c) = (&r.stats, &r.stats.expert_cache);
        log(&format!(
            "{} {what}{}: {} tokens, {:.2} tok/s busy ({:.1} s; engine wall {:.1} s, process {:.1} s), {} steps, \
             misses {}, read {:.2} GB, budget {:.2} GB, peak {:.2} GB, buffers {:.2} GB, readers {}, direct {}, \
             other load {:.2} cores",
            self.host_cache,
            readers.map_or(String::new(), |r| format!(" readers={r}")),
            s.generated_tokens,
            s.generated_tokens as f64 / s.steps.busy_seconds.max(1e-9),
            s.steps.busy_seconds,
            s.wall_seconds,
            r.process_wall_seconds,
            s.steps.steps,
            c.misses,
            c.bytes_read as f64 / 1e9,
            c.budget_bytes as f64 / 1e9,
            c.peak_bytes as f64 / 1e9,
            c.buffer_peak_bytes.unwrap_or(0) as f64 / 1e9,
            c.readers.map_or("?".into(), |n| n.to_string()),
            c.direct_io,
            r.other_cores.unwrap_or(f64::NAN)
        ));
        Ok(r)
    }
}

/// One sequence (`--prompt-ids`, so the previous binary understands it) at `--baseline-cache`,
/// the baseline and the current binary alternately, each run after evicting the page cache.
fn run_baseline(
    baseline: &Path,
    current: &Path,
    dir: &Path,
    checkpoint: &Checkpoint,
    prompt: &[u32],
    args: &Args,
) -> Result<batch::BaselineComparison, String> {
    let (mut b, mut c) = (Vec::new(), Vec::new());
    for i in 0..args.baseline_runs {
        for (bin, out, name) in [(baseline, &mut b, "baseline"), (current, &mut c, "current")] {
            probe::evict_from_page_cache(&checkpoint.shard_paths())?;
            let r = runner::generate(bin, dir, prompt, args.max_new_tokens, &args.baseline_cache)?;
            log(&format!(
                "{} one sequence, {name} #{}: decode {:.2} tok/s, prefill {:.1} tok/s, misses {}, other load {:.2} cores",
                args.baseline_cache,
                i + 1,
                r.stats.decode_tokens_per_s,
                r.stats.prefill_tokens_per_s,
                r.stats.expert_cache.misses,
                r.other_cores.unwrap_or(f64::NAN)
            ));
            out.push(SingleRun::from(r));
        }
    }
    Ok(batch::compare_baseline(
        baseline.display().to_string(),
        args.baseline_cache.clone(),
        args.max_new_tokens,
        b,
        c,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<Args, String> {
        parse_args(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn defaults_are_the_issue_benchmark() {
        let a = args(&[]).unwrap();
        assert_eq!(a.concurrency, vec![1, 4, 16, 64]);
        assert_eq!((a.max_new_tokens, a.prompt_tokens, a.alone), (64, 16, 4));
        assert_eq!((a.host_cache.as_str(), a.baseline_cache.as_str(), a.baseline_runs), ("25%", "100%", 3));
        assert_eq!(a.shape, Shape::default());
        assert!(a.readers.is_empty() && a.baseline_bin.is_none() && a.disk_probe);
    }

    #[test]
    fn options_and_shape_flags_parse() {
        let a = args(&[
            "--concurrency",
            "1,4,16",
            "--readers",
            "1,2",
            "--baseline-bin",
            "previous/stevedore",
            "--hidden",
            "512",
            "--experts",
            "16",
            "--no-disk-probe",
            "--seed",
            "7",
        ])
        .unwrap();
        assert_eq!((a.concurrency, a.readers), (vec![1, 4, 16], vec![1, 2]));
        assert_eq!(a.baseline_bin, Some(PathBuf::from("previous/stevedore")));
        assert_eq!((a.shape.hidden_size, a.shape.num_experts, a.seed), (512, 16, 7));
        assert!(!a.disk_probe);
        assert!(args(&["--concurrency", "0"]).is_err());
        assert!(args(&["--max-new-tokens", "1"]).is_err());
        assert!(args(&["--bogus"]).unwrap_err().contains("unknown argument `--bogus`"));
        assert!(args(&["--help"]).unwrap_err().contains("--baseline-bin"));
    }

    #[test]
    fn prompts_are_seeded_distinct_and_in_the_vocabulary() {
        let p = prompts(64, 16, 32000, 1);
        assert_eq!(p, prompts(64, 16, 32000, 1));
        assert_ne!(p, prompts(64, 16, 32000, 2));
        assert!(p.iter().all(|x| x.len() == 16 && x.iter().all(|&t| t < 32000)));
        for (i, a) in p.iter().enumerate() {
            assert!(p[i + 1..].iter().all(|b| b != a));
        }
        // A tiny vocabulary still gives distinct prompts.
        let q = prompts(3, 1, 3, 0);
        assert_eq!(q.len(), 3);
        assert!(q[0] != q[1] && q[1] != q[2] && q[0] != q[2]);
    }
}
