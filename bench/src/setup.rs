//! What the benchmark binaries (`e2e`, `batch`) share around their measurements: the shape
//! flags, where the `stevedore` binary is, which commit it was built from, and the checkpoint
//! directory (written once, reused when it already holds the same checkpoint, deleted afterwards
//! unless kept).

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::checkpoint::{Plan, Shape};
use crate::TempDir;

/// Usage lines of the shape flags (see [`shape_field`]).
pub const SHAPE_USAGE: &str = concat!(
    "  shape: --hidden N --layers N --heads N --kv-heads N --experts N --top-k N --intermediate N\n",
    "         --vocab N --layers-per-shard N (defaults: 2048 16 16 4 32 8 768 32000 4)"
);

/// The field of `shape` a shape flag (`--hidden`, `--layers`, ...) sets, or `None` for any other
/// flag.
pub fn shape_field<'a>(shape: &'a mut Shape, flag: &str) -> Option<&'a mut usize> {
    Some(match flag {
        "--hidden" => &mut shape.hidden_size,
        "--layers" => &mut shape.num_hidden_layers,
        "--heads" => &mut shape.num_attention_heads,
        "--kv-heads" => &mut shape.num_key_value_heads,
        "--experts" => &mut shape.num_experts,
        "--top-k" => &mut shape.num_experts_per_tok,
        "--intermediate" => &mut shape.intermediate_size,
        "--vocab" => &mut shape.vocab_size,
        "--layers-per-shard" => &mut shape.layers_per_shard,
        _ => return None,
    })
}

/// A benchmark binary's `main`: parses the arguments (a usage error exits 2), runs, and exits 0
/// when every bar passed, 1 when one failed, 2 on an error (prefixed with `name`).
pub fn main<A>(
    name: &str,
    parse: impl FnOnce(std::iter::Skip<std::env::Args>) -> Result<A, String>,
    run: impl FnOnce(A) -> Result<bool, String>,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::from(2)
        }
    }
}

/// The command line as the report prints it: `name` and this run's arguments.
pub fn command_line(name: &str) -> String {
    std::iter::once(name.to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" ")
}

/// Parses one positive whole number given to `flag`.
pub fn positive(flag: &str, v: &str) -> Result<usize, String> {
    v.trim()
        .parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{flag}: `{v}` is not a positive number"))
}

/// Parses a comma-separated list of positive whole numbers (`1,4,16`).
pub fn positive_list(flag: &str, v: &str) -> Result<Vec<usize>, String> {
    let list: Vec<usize> = v
        .split(',')
        .map(|x| match x.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{flag}: `{}` is not a positive whole number", x.trim())),
        })
        .collect::<Result<_, _>>()?;
    if list.is_empty() {
        return Err(format!("{flag} needs at least one value"));
    }
    Ok(list)
}

/// `stevedore` next to the running executable (both are built into `target/release`).
pub fn default_bin() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate this executable: {e}"))?;
    Ok(exe.with_file_name("stevedore"))
}

/// An error naming how to get the binary, unless `bin` is a file.
pub fn check_bin(bin: &Path) -> Result<(), String> {
    if bin.is_file() {
        return Ok(());
    }
    Err(format!(
        "{}: no such binary; build it with `cargo build --release -p stevedore-engine` or pass --bin",
        bin.display()
    ))
}

/// The checked-out commit (read-only git calls), or `None` outside a git tree.
pub fn git_commit() -> Option<String> {
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git").args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let head = git(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{head}+dirty") } else { head })
}

/// The checkpoint's directory. On drop it deletes the checkpoint's files (never anything else)
/// and then the directory if it is empty, unless kept.
pub struct Checkpoint<'a> {
    dir: PathBuf,
    plan: &'a Plan,
    keep: bool,
}

impl Checkpoint<'_> {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The shard files, for [`crate::probe::evict_from_page_cache`].
    pub fn shard_paths(&self) -> Vec<PathBuf> {
        self.plan.shards.iter().map(|s| self.dir.join(&s.file_name)).collect()
    }
}

impl Drop for Checkpoint<'_> {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("keeping the checkpoint in {}", self.dir.display());
            return;
        }
        let names = ["config.json", "model.safetensors.index.json"];
        for name in self.plan.shards.iter().map(|s| s.file_name.as_str()).chain(names) {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Writes `plan` into `dir` (default: a new temporary directory named after `prefix`) unless
/// the directory already holds it. The returned guard deletes what was written unless `keep`;
/// it is made before writing, so a failed write is cleaned up too.
pub fn prepare_checkpoint<'a>(
    plan: &'a Plan,
    dir: Option<&Path>,
    keep: bool,
    threads: usize,
    prefix: &str,
    log: &dyn Fn(&str),
) -> Result<Checkpoint<'a>, String> {
    let dir = match dir {
        Some(d) => d.to_owned(),
        None => {
            let mut t = TempDir::new(prefix)?;
            t.keep(); // `Checkpoint` removes exactly what was written
            t.path().to_owned()
        }
    };
    let checkpoint = Checkpoint { dir, plan, keep };
    let dir = checkpoint.dir();
    if plan.is_written_in(dir) {
        log(&format!("reusing the checkpoint in {}", dir.display()));
    } else {
        log(&format!("writing {:.2} GB of checkpoint to {}", plan.total_bytes() as f64 / 1e9, dir.display()));
        let t0 = Instant::now();
        plan.write(dir, threads, &mut |m| log(m))?;
        log(&format!("checkpoint written in {:.1} s", t0.elapsed().as_secs_f64()));
    }
    Ok(checkpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_flags_name_every_field() {
        let mut s = Shape::default();
        for (i, flag) in [
            "--hidden",
            "--layers",
            "--heads",
            "--kv-heads",
            "--experts",
            "--top-k",
            "--intermediate",
            "--vocab",
            "--layers-per-shard",
        ]
        .iter()
        .enumerate()
        {
            *shape_field(&mut s, flag).unwrap() = 1000 + i;
            assert!(SHAPE_USAGE.contains(flag), "{flag}");
        }
        assert_eq!((s.hidden_size, s.layers_per_shard, s.vocab_size), (1000, 1008, 1007));
        assert!(shape_field(&mut s, "--keep").is_none());
    }

    #[test]
    fn lists_are_positive_numbers() {
        assert_eq!(positive_list("--x", "1, 4,16").unwrap(), vec![1, 4, 16]);
        assert!(positive_list("--x", "1,0").unwrap_err().contains("`0`"));
        assert!(positive_list("--x", "a").unwrap_err().contains("`a`"));
    }

    #[test]
    fn a_checkpoint_is_written_once_and_deleted_unless_kept() {
        let shape = Shape {
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 2,
            num_experts: 4,
            num_experts_per_tok: 2,
            intermediate_size: 16,
            vocab_size: 16,
            layers_per_shard: 1,
        };
        let plan = Plan::new(shape).unwrap();
        let parent = TempDir::new("setup-test").unwrap();
        let dir = parent.path().join("ckpt");
        let logged = std::cell::RefCell::new(Vec::new());
        let log = |m: &str| logged.borrow_mut().push(m.to_string());
        drop(prepare_checkpoint(&plan, Some(&dir), true, 1, "t", &log).unwrap());
        assert!(plan.is_written_in(&dir));
        let c = prepare_checkpoint(&plan, Some(&dir), false, 1, "t", &log).unwrap();
        assert_eq!(c.shard_paths().len(), 2);
        assert!(logged.borrow().iter().any(|m| m.starts_with("reusing")), "{:?}", logged.borrow());
        drop(c);
        assert!(!dir.exists());
    }
}
