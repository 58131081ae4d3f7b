//! What the operating system says about memory and cores.

use std::path::{Path, PathBuf};

/// Peak resident set size of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_kib(Path::new("/proc/self/status"), "VmHWM:")
}

/// Memory this process may still take without swapping or being killed: the machine's
/// MemAvailable, or less when a memory cgroup (Docker, Kubernetes, systemd) limits the process
/// (its limit minus its usage, at the tightest level of its hierarchy, cgroup v1 or v2).
pub fn available_memory_bytes() -> Option<u64> {
    let machine = proc_status_kib(Path::new("/proc/meminfo"), "MemAvailable:");
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| cgroup_room(&text, Path::new("/sys/fs/cgroup")));
    match (machine, cgroup) {
        (Some(m), Some(c)) => Some(m.min(c)),
        (m, c) => m.or(c),
    }
}

/// The room left under the memory limits of the cgroups named by `proc_self_cgroup` (the text
/// of `/proc/self/cgroup`), with the hierarchies mounted under `root`: the smallest
/// `limit - usage` from the process's cgroup up to the root (a parent's limit binds its
/// children too). `None` when no level has a limit.
pub fn cgroup_room(proc_self_cgroup: &str, root: &Path) -> Option<u64> {
    let mut best: Option<u64> = None;
    for line in proc_self_cgroup.lines() {
        // hierarchy-id:controllers:path; v2 is "0::/path", v1 memory is "N:memory:/path".
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        let (base, limit_file, usage_file) = if controllers.is_empty() {
            (root.to_path_buf(), "memory.max", "memory.current")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes", "memory.usage_in_bytes")
        } else {
            continue;
        };
        // A v2 line also appears on v1 machines (unified hierarchy mounted elsewhere, or none);
        // try both the plain root and `root/unified`.
        let bases: Vec<PathBuf> =
            if controllers.is_empty() { vec![base.clone(), root.join("unified")] } else { vec![base] };
        for base in bases {
            let mut dir = base.join(rel);
            loop {
                if let Some(limit) = read_u64(&dir.join(limit_file)) {
                    // v1 writes "no limit" as a huge page-rounded number.
                    if limit < (1 << 60) {
                        let usage = read_u64(&dir.join(usage_file)).unwrap_or(0);
                        let room = limit.saturating_sub(usage);
                        best = Some(best.map_or(room, |b| b.min(room)));
                    }
                }
                if dir == base || !dir.pop() || !dir.starts_with(&base) {
                    break;
                }
            }
        }
    }
    best
}

/// A file holding one number; `None` if absent, unreadable or not a number ("max" in v2).
fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Physical cores this process may run on: distinct (package, core) pairs of the CPUs in its
/// affinity mask, at most what `available_parallelism` allows (a cgroup CPU quota). SMT
/// siblings share a core's memory bandwidth and FMA units, so a memory-bound decode gains
/// nothing from them. Falls back to `available_parallelism` where the topology is unknown.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut cores = std::collections::HashSet::new();
    for cpu in allowed_cpus() {
        let topo = PathBuf::from(format!("/sys/devices/system/cpu/cpu{cpu}/topology"));
        let package = read_u64(&topo.join("physical_package_id"));
        let core = read_u64(&topo.join("core_id"));
        match (package, core) {
            (Some(p), Some(c)) => cores.insert((p, c)),
            _ => return logical,
        };
    }
    if cores.is_empty() {
        logical
    } else {
        cores.len().min(logical)
    }
}

/// The CPUs of this process's affinity mask.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `cpu_set_t` is plain data for which all-zero is a valid (empty) set;
    // `sched_getaffinity` writes at most `size_of::<cpu_set_t>()` bytes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

fn proc_status_kib(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn cgroup_v2_limit_minus_usage_and_the_tightest_ancestor() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        write(r, "a/b/memory.max", "2000\n");
        write(r, "a/b/memory.current", "500\n");
        write(r, "a/memory.max", "max\n");
        assert_eq!(cgroup_room("0::/a/b\n", r), Some(1500));
        write(r, "a/memory.max", "1200\n");
        write(r, "a/memory.current", "400\n");
        assert_eq!(cgroup_room("0::/a/b\n", r), Some(800));
        // No limit anywhere.
        assert_eq!(cgroup_room("0::/c\n", r), None);
    }

    #[test]
    fn cgroup_v1_memory_controller_and_its_no_limit_value() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        write(r, "memory/docker/x/memory.limit_in_bytes", "1610612736\n");
        write(r, "memory/docker/x/memory.usage_in_bytes", "610612736\n");
        write(r, "memory/memory.limit_in_bytes", "9223372036854771712\n");
        let text = "4:memory:/docker/x\n3:cpuset:/\n0::/\n";
        assert_eq!(cgroup_room(text, r), Some(1_000_000_000));
        assert_eq!(cgroup_room("4:memory:/\n", r), None);
    }

    #[test]
    fn physical_cores_is_at_least_one_and_at_most_the_logical_cpus() {
        let n = physical_cores();
        assert!(n >= 1 && n <= std::thread::available_parallelism().unwrap().get());
    }
}
