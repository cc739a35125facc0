//! Giving memory back to the system after a burst.
//!
//! glibc's allocator keeps freed memory in its arenas (one per thread that
//! allocated), so a proxy that served a flood of connections stayed at its
//! peak long after they closed (27.7 → 59 MiB, and 59 MiB 30 s later, for a
//! gateway after 2,000 connections). `malloc_trim` returns the free pages
//! of every arena; doing it every few seconds costs a few microseconds
//! when there is nothing to return. No crate wraps it beyond `libc`.

use std::time::Duration;

/// How often free memory is handed back.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Returns the allocator's free memory to the system every [`TRIM_EVERY`],
/// for as long as the runtime runs.
pub fn spawn_trimmer() {
    tokio::spawn(async {
        let mut ticker = tokio::time::interval(TRIM_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            trim();
        }
    });
}

/// Hands free heap pages back to the kernel now.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // No safe wrapper exists for malloc_trim.
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim takes no pointers and only walks the allocator's
    // own free lists under its locks; it is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
