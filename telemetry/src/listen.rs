//! Listening sockets, bound here or handed down by a supervisor.
//!
//! `minimesh up` binds every child's listeners itself, so no port is ever
//! given to two processes, and passes them on with the systemd
//! socket-activation protocol (`LISTEN_FDS`, fds from 3), naming their
//! addresses in [`LISTEN_ADDRS_ENV`]. A child then takes the inherited socket
//! for an address it was told to listen on instead of binding it again.

use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use tokio::net::TcpListener;

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
