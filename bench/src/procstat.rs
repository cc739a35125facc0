//! CPU time and memory of a process, from /proc (Linux).

/// Clock ticks per second of /proc/<pid>/stat times; 100 on every Linux we target.
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ProcSample {
    /// User + system CPU seconds since the process started.
    pub cpu_seconds: f64,
    /// Peak resident set size, KiB (VmHWM).
    pub peak_rss_kib: u64,
    /// Current resident set size, KiB (VmRSS).
    pub rss_kib: u64,
}

/// Reads a process's CPU time and memory; None when it is gone or unreadable.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields start after the last ')'.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some(ProcSample {
        cpu_seconds: (utime + stime) / TICKS_PER_SECOND,
        peak_rss_kib: kib("VmHWM:")?,
        rss_kib: kib("VmRSS:")?,
    })
}

/// Resets a process's peak RSS to its current RSS (clear_refs, Linux 4.0+),
/// so the next sample's peak belongs to what ran in between.
pub fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        let me = super::sample(std::process::id()).expect("own /proc entry");
        assert!(me.peak_rss_kib >= me.rss_kib / 2 && me.rss_kib > 0);
        assert!(super::sample(u32::MAX).is_none());
    }
}
