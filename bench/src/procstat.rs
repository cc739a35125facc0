//! CPU time and memory of a process, from /proc (Linux).

/// Clock ticks per second of /proc/<pid>/stat times; 100 on every Linux we target.
const TICKS_PER_SECOND: f64 = 100.0;

/// One reading of a process's CPU time and memory.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ProcSample {
    /// User + system CPU seconds since the process started.
    pub cpu_seconds: f64,
    /// Peak resident set size, KiB (VmHWM).
    pub peak_rss_kib: u64,
    /// Current resident set size, KiB (VmRSS).
    pub rss_kib: u64,
    /// Current private anonymous memory, KiB (RssAnon): the heap and stacks,
    /// without the binary's code pages, which every process of the same
    /// binary shares through the page cache.
    pub anon_kib: u64,
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
        anon_kib: kib("RssAnon:")?,
    })
}

/// Resets a process's peak RSS to its current RSS (clear_refs, Linux 4.0+),
/// so the next sample's peak belongs to what ran in between.
pub fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Samples the processes' anonymous memory every 20 ms until dropped and
/// keeps each one's highest reading (the kernel keeps no peak for it).
pub struct AnonPeaks {
    peaks: std::sync::Arc<Vec<std::sync::atomic::AtomicU64>>,
    task: tokio::task::JoinHandle<()>,
}

impl AnonPeaks {
    /// Starts sampling `pids`.
    pub fn start(pids: &[u32]) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        let peaks: std::sync::Arc<Vec<AtomicU64>> =
            std::sync::Arc::new(pids.iter().map(|_| AtomicU64::new(0)).collect());
        let (pids, shared) = (pids.to_vec(), peaks.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
            loop {
                tick.tick().await;
                for (pid, peak) in pids.iter().zip(shared.iter()) {
                    if let Some(now) = sample(*pid) {
                        peak.fetch_max(now.anon_kib, Ordering::Relaxed);
                    }
                }
            }
        });
        Self { peaks, task }
    }

    /// Stops sampling; the peak anonymous memory of each pid (KiB), in the order given.
    pub fn finish(self) -> Vec<u64> {
        self.task.abort();
        self.peaks
            .iter()
            .map(|p| p.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    }
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
