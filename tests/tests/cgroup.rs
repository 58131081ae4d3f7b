//! The automatic host budget reads a memory cgroup's limit (Docker, Kubernetes, systemd), not
//! only the machine's free memory: `stevedore inspect` run inside a real memory cgroup of 1 GiB
//! reports at most 1 GiB available. Needs permission to create a cgroup (root, cgroup v1 memory
//! controller or v2 with memory delegated); skipped with a message elsewhere.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{fixture_dir, inspect, PYDOC_MOE};

const LIMIT: u64 = 1 << 30;

/// A memory cgroup below this process's own, removed on drop.
struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    /// Creates one with a memory limit of `limit` bytes, or says why not.
    fn create(limit: u64) -> Result<Self, String> {
        let own =
            std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup: {e}"))?;
        let name = format!("stevedore-test-{}", std::process::id());
        for line in own.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) =
                (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let rel = path.trim_start_matches('/');
            let (base, limit_file) = if controllers.split(',').any(|c| c == "memory") {
                (PathBuf::from("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")
            } else if controllers.is_empty() && PathBuf::from("/sys/fs/cgroup/cgroup.controllers").exists() {
                (PathBuf::from("/sys/fs/cgroup"), "memory.max")
            } else {
                continue;
            };
            let dir = base.join(rel).join(&name);
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
            let cg = Cgroup { dir };
            if std::fs::write(cg.dir.join(limit_file), limit.to_string()).is_ok() {
                return Ok(cg);
            }
        }
        Err("cannot create a memory cgroup with a limit here".into())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn the_automatic_budget_sees_a_cgroup_memory_limit() {
    let dir = fixture_dir(PYDOC_MOE);
    let outside = inspect(&dir, &[]);
    let Some(free) = outside["available_memory_bytes"].as_u64() else {
        panic!("inspect reports no available memory: {outside}");
    };
    if free <= LIMIT {
        println!("skipped: the_automatic_budget_sees_a_cgroup_memory_limit: only {free} bytes available");
        return;
    }
    let cg = match Cgroup::create(LIMIT) {
        Ok(cg) => cg,
        Err(why) => {
            println!("skipped: the_automatic_budget_sees_a_cgroup_memory_limit: {why}");
            return;
        }
    };
    // The child joins the cgroup, then becomes stevedore.
    let procs = cg.dir.join("cgroup.procs");
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$0" && exec "$@""#)
        .arg(&procs)
        .arg(env!("CARGO_BIN_EXE_stevedore-e2e"))
        .args(["inspect", "--model", dir.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let inside = v["available_memory_bytes"].as_u64().unwrap();
    assert!(inside <= LIMIT, "inside a {LIMIT}-byte cgroup, {inside} bytes reported available");
    assert!(inside > 0, "{v}");
}
