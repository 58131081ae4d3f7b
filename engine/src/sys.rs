//! What the operating system says about memory.

/// Peak resident set size of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_kib("/proc/self/status", "VmHWM:")
}

/// Memory available to new allocations without swapping (MemAvailable), in bytes.
pub fn available_memory_bytes() -> Option<u64> {
    proc_status_kib("/proc/meminfo", "MemAvailable:")
}

fn proc_status_kib(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}
