//! Listening sockets, bound here or handed down by a supervisor.
//!
//! `minimesh up` binds every child's listeners itself, so no port is ever
//! given to two processes, and passes them on with the systemd
//! socket-activation protocol (`LISTEN_FDS`, fds from 3), naming their
//! addresses in [`LISTEN_ADDRS_ENV`]. A child then takes the inherited socket
//! for an address it was told to listen on instead of binding it again.

use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// Comma-separated addresses of the inherited sockets, in fd order.
pub const LISTEN_ADDRS_ENV: &str = "MINIMESH_LISTEN_ADDRS";

type Inherited = Vec<(SocketAddr, Option<std::net::TcpListener>)>;

static INHERITED: OnceLock<Mutex<Inherited>> = OnceLock::new();

/// Claims the sockets a supervisor passed down. Call first thing in `main`,
/// before any thread starts: it reads and clears `LISTEN_FDS`.
pub fn adopt_inherited() {
    let addrs: Vec<SocketAddr> = std::env::var(LISTEN_ADDRS_ENV)
        .unwrap_or_default()
        .split(',')
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    let mut fds = listenfd::ListenFd::from_env();
    let mut inherited = Vec::new();
    for (index, addr) in addrs.into_iter().enumerate() {
        match fds.take_tcp_listener(index) {
            Ok(Some(listener)) => inherited.push((addr, Some(listener))),
            Ok(None) => {}
            Err(err) => eprintln!("ignoring inherited socket {index} for {addr}: {err}"),
        }
    }
    let _ = INHERITED.set(Mutex::new(inherited));
}

/// The inherited socket for `addr`, once.
fn take_inherited(addr: &str) -> Option<std::net::TcpListener> {
    let wanted: SocketAddr = addr.parse().ok()?;
    let mut inherited = INHERITED.get()?.lock().ok()?;
    inherited
        .iter_mut()
        .find(|(a, l)| *a == wanted && l.is_some())
        .and_then(|(_, l)| l.take())
}

/// A listener on `addr`: the inherited one when a supervisor passed it,
/// else a new bind.
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    if let Some(listener) = take_inherited(addr) {
        listener.set_nonblocking(true)?;
        return TcpListener::from_std(listener);
    }
    TcpListener::bind(addr).await
}

/// At most one log line per this long about a failing or full listener.
const LOG_EVERY: Duration = Duration::from_secs(5);
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A warning about listener `what`, logged at most every 5 s with how many
/// were held back, so a listener under attack cannot flood the log.
#[derive(Debug, Default)]
pub struct Throttled {
    last: Option<Instant>,
    held: u64,
}

impl Throttled {
    /// Logs `err` unless a line went out less than 5 s ago.
    pub fn warn(&mut self, what: &str, err: &dyn std::fmt::Display) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|at| now.duration_since(at) < LOG_EVERY)
        {
            self.held += 1;
            return;
        }
        tracing::warn!(listener = what, %err, suppressed = self.held, "accept failed; backing off");
        self.last = Some(now);
        self.held = 0;
    }
}

/// Failed accepts of one listener (out of file descriptors and the like):
/// retrying at once would spin, so each failure says how long to wait,
/// doubling from 5 ms to 1 s until an accept succeeds, and warns at a
/// bounded rate.
#[derive(Debug)]
pub struct AcceptBackoff {
    what: &'static str,
    next: Duration,
    warnings: Throttled,
}

impl AcceptBackoff {
    /// For the listener named `what` (`inbound`, `admin`, …).
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            next: ACCEPT_BACKOFF_FIRST,
            warnings: Throttled::default(),
        }
    }

    /// An accept succeeded: the next failure waits the shortest time again.
    pub fn accepted(&mut self) {
        self.next = ACCEPT_BACKOFF_FIRST;
    }

    /// An accept failed with `err`: how long to wait before the next.
    pub fn failed(&mut self, err: &dyn std::fmt::Display) -> Duration {
        self.warnings.warn(self.what, err);
        let wait = self.next;
        self.next = (self.next * 2).min(ACCEPT_BACKOFF_MAX);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_accepts_wait_longer_each_time_up_to_a_second_and_start_over_after_one_succeeds() {
        let mut backoff = AcceptBackoff::new("test");
        let err = std::io::Error::from_raw_os_error(24);
        let waits: Vec<u128> = (0..10).map(|_| backoff.failed(&err).as_millis()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        backoff.accepted();
        assert_eq!(backoff.failed(&err), Duration::from_millis(5));
    }
}
