//! End-to-end expert-streaming benchmark: writes a random OLMoE-shaped checkpoint of a few GB,
//! measures memory and O_DIRECT disk bandwidth, runs `stevedore generate` at several host-cache
//! budgets and reports decode speed against the floor those bandwidths set. See bench/README.md.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use stevedore_bench::checkpoint::{Plan, Shape};
use stevedore_bench::probe::{self, DiskProbe};
use stevedore_bench::report::{self, BudgetRuns, Report, Traffic};
use stevedore_bench::runner;
use stevedore_bench::setup::{self, SHAPE_USAGE};

const USAGE_HEAD: &str = "\
usage: e2e [options]
  --dir DIR              write the checkpoint here (default: a new temporary directory); a DIR that
                         already holds the same checkpoint is reused without writing
  --keep                 keep the checkpoint afterwards (default: its files are deleted)
  --bin PATH             the stevedore binary (default: `stevedore` next to this executable)
  --max-new-tokens N     tokens of the shorter run per budget; the longer run makes 2N (default 32)
  --budgets LIST         host-cache budgets, must include 100% (default 100%,50%,25%)
  --json-out FILE        also write every number as JSON
  --no-engine            only write the checkpoint and measure memory and disk
  --threads N            threads for writing and the all-core probes (default: all cores)
  --memory-buffer-mib N  buffer summed by the memory probe (default 1024)
  --disk-sequential-mib N  expert bytes read sequentially by the disk probe (default 2048)
  --disk-random-reads N  whole-expert reads per random-read pass (default 64)";
const USAGE_TAIL: &str = "Exit status: 0 when every bar passes, 1 when one fails, 2 on an error.";

fn usage() -> String {
    format!("{USAGE_HEAD}\n{SHAPE_USAGE}\n{USAGE_TAIL}")
}

struct Args {
    dir: Option<PathBuf>,
    keep: bool,
    bin: Option<PathBuf>,
    max_new_tokens: usize,
    budgets: Vec<String>,
    json_out: Option<PathBuf>,
    no_engine: bool,
    threads: usize,
    memory_buffer_mib: usize,
    disk: DiskProbe,
    shape: Shape,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut a = Args {
        dir: None,
        keep: false,
        bin: None,
        max_new_tokens: 32,
        budgets: vec!["100%".into(), "50%".into(), "25%".into()],
        json_out: None,
        no_engine: false,
        threads,
        memory_buffer_mib: 1024,
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
            "--max-new-tokens" => a.max_new_tokens = num()?,
            "--budgets" => a.budgets = value()?.split(',').map(|b| b.trim().to_string()).collect(),
            "--json-out" => a.json_out = Some(value()?.into()),
            "--no-engine" => a.no_engine = true,
            "--threads" => a.threads = num()?,
            "--memory-buffer-mib" => a.memory_buffer_mib = num()?,
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
        return Err("--max-new-tokens must be at least 2".into());
    }
    if a.threads == 0 || a.memory_buffer_mib == 0 || a.disk.random_reads == 0 {
        return Err("--threads, --memory-buffer-mib and --disk-random-reads must be positive".into());
    }
    if !a.no_engine && !a.budgets.iter().any(|b| b == report::FULL) {
        return Err(format!("--budgets must include {} (it defines the compute time)", report::FULL));
    }
    a.disk.threads = a.threads;
    Ok(a)
}

fn main() -> ExitCode {
    setup::main("e2e", parse_args, run)
}

fn run(args: Args) -> Result<bool, String> {
    let command = setup::command_line("e2e");
    let machine = probe::machine();
    let plan = Plan::new(args.shape.clone())?;
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => setup::default_bin()?,
    };
    if !args.no_engine {
        setup::check_bin(&bin)?;
    }
    let log = |m: &str| eprintln!("[e2e] {m}");
    let checkpoint =
        setup::prepare_checkpoint(&plan, args.dir.as_deref(), args.keep, args.threads, "e2e", &log)?;
    let dir = checkpoint.dir().to_owned();
    if !args.no_engine {
        log("stevedore inspect:");
        eprint!("{}", runner::inspect(&bin, &dir)?);
    }

    log("measuring memory bandwidth");
    let memory = probe::memory_bandwidth(args.memory_buffer_mib << 20, args.threads, 10);
    log(&format!(
        "memory: {:.1} GB/s one core, {:.1} GB/s all cores",
        memory.one_core_gb_s, memory.all_cores_gb_s
    ));
    let probe_disk = || -> Result<probe::DiskBandwidth, String> {
        log("measuring disk bandwidth");
        let d = probe::disk_bandwidth(&dir, &plan, args.disk)?;
        log(&format!(
            "disk (direct {}): sequential {:.2} GB/s, random {:.2} GB/s, random x{} {:.2} GB/s",
            d.direct_io, d.sequential_gb_s, d.random_gb_s, d.threads, d.random_parallel_gb_s
        ));
        Ok(d)
    };
    // The disk's speed drifts on shared machines: probe before and after the engine runs and
    // hold the engine to the best rate seen.
    let mut disk = vec![probe_disk()?];

    let prompt: Vec<u32> = (0..16u32).map(|i| (1 + i * 997) % args.shape.vocab_size as u32).collect();
    let runs = if args.no_engine { Vec::new() } else { run_budgets(&bin, &dir, &plan, &prompt, &args)? };
    if !runs.is_empty() {
        disk.push(probe_disk()?);
    }
    let floor_disk_gb_s = disk.iter().map(probe::DiskBandwidth::best_gb_s).fold(0.0, f64::max);
    let traffic = Traffic {
        expert_bytes_touched_per_token: plan.shape.expert_bytes_touched_per_token(),
        dense_bytes_touched_per_token: plan.dense_bytes_touched_per_token(),
    };
    let budgets =
        if runs.is_empty() { Vec::new() } else { report::evaluate(&runs, traffic, floor_disk_gb_s)? };
    let same_tokens = runs.windows(2).all(|w| w[0].long.generated_ids == w[1].long.generated_ids);
    let bars = report::bars(&budgets, &memory);
    let report = Report {
        command,
        commit: setup::git_commit(),
        machine,
        load_1min_at_end: probe::load_1min(),
        shape: plan.shape.clone(),
        checkpoint_bytes: plan.total_bytes(),
        expert_bytes_total: plan.expert_bytes_total(),
        expert_bytes: plan.shape.expert_bytes(),
        prompt_tokens: prompt.len(),
        max_new_tokens: args.max_new_tokens,
        memory,
        disk,
        floor_disk_gb_s,
        traffic,
        budgets,
        same_tokens_at_every_budget: same_tokens,
        bars,
    };
    print!("{}", report.markdown());
    if let Some(path) = &args.json_out {
        let text =
            serde_json::to_string_pretty(&report).map_err(|e| format!("cannot encode the report: {e}"))?;
        std::fs::write(path, text).map_err(|e| format!("{}: cannot write: {e}", path.display()))?;
    }
    Ok(same_tokens && report.bars.iter().all(|b| b.pass))
}

/// Two greedy runs (N and 2N new tokens) per budget, each starting with the checkpoint evicted
/// from the page cache so that no budget inherits another's warm pages.
fn run_budgets(
    bin: &Path,
    dir: &Path,
    plan: &Plan,
    prompt: &[u32],
    args: &Args,
) -> Result<Vec<BudgetRuns>, String> {
    let shards: Vec<PathBuf> = plan.shards.iter().map(|s| dir.join(&s.file_name)).collect();
    let mut out = Vec::new();
    for budget in &args.budgets {
        let one = |n: usize| -> Result<runner::Run, String> {
            probe::evict_from_page_cache(&shards)?;
            let r = runner::generate(bin, dir, prompt, n, budget)?;
            let c = &r.stats.expert_cache;
            eprintln!(
                "[e2e] {budget:>5} x{n:<4} decode {:.2} tok/s, prefill {:.1} tok/s, misses {}, read {:.2} GB, \
                 budget {:.2} GB, peak {:.2} GB, direct {}, wall {:.1} s, other load {:.2} cores",
                r.stats.decode_tokens_per_s,
                r.stats.prefill_tokens_per_s,
                c.misses,
                c.bytes_read as f64 / 1e9,
                c.budget_bytes as f64 / 1e9,
                c.peak_bytes as f64 / 1e9,
                c.direct_io,
                r.wall_seconds,
                r.other_cores.unwrap_or(f64::NAN)
            );
            Ok(r)
        };
        let short = one(args.max_new_tokens)?;
        let long = one(2 * args.max_new_tokens)?;
        out.push(BudgetRuns { host_cache: budget.clone(), short, long });
    }
    Ok(out)
}
