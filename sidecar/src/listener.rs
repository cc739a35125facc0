//! The one accept loop every proxy listener runs, with the limits that keep
//! a listener alive under abuse: a cap on open connections, a deadline for
//! a connection's first call (silent TCP, TLS without a preface, a preface
//! and nothing else), an idle timeout once calls stop, and accept errors
//! (e.g. out of file descriptors) backed off and logged at a bounded rate.
//! [`serve`] runs it for the mesh mTLS listener and the plain ones alike.

use crate::body::ProxyBody;
use crate::metrics::{INBOUND, Metrics};
use crate::tls::{Reloader, peer_identity};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use minimesh_spiffe::SpiffeId;
use minimesh_telemetry::listen::{AcceptBackoff, Throttled};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

/// Longest a mesh TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long calls still running may take once the proxy is told to stop.
const DRAIN_GRACE: Duration = Duration::from_secs(10);
/// How long a connection told to close may take to say goodbye.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Limits of one listener.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Limits {
    /// Close a connection that has made no call this long after it opened
    /// (silent TCP, TLS without HTTP/2, a preface and nothing else).
    #[arg(long, env = "MINIMESH_FIRST_CALL_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub first_call_timeout: Duration,
    /// Close a connection with no call in flight for this long.
    #[arg(long, env = "MINIMESH_IDLE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5m")]
    pub idle_timeout: Duration,
    /// Open connections per listener; past it, new ones wait in the kernel's backlog.
    #[arg(long, env = "MINIMESH_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Cancel a response whose reader has taken none of its data for this
    /// long, releasing what it holds (0s: never). A response waiting on its
    /// source (a quiet stream) is not stalled.
    #[arg(long, env = "MINIMESH_STALL_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub stall_timeout: Duration,
    /// HTTP/2 window of each stream, in bytes: what one slow or stalled
    /// reader can keep buffered in the proxy. Larger streams faster per CPU.
    #[arg(long, env = "MINIMESH_STREAM_WINDOW", default_value_t = crate::window::STREAM,
        value_parser = clap::value_parser!(u32).range(i64::from(crate::window::SMALLEST)..=i64::from(crate::window::LARGEST)))]
    pub stream_window: u32,
    /// HTTP/2 window of each connection, in bytes: the most it buffers in all.
    /// Below 256 stream windows, that many stalled readers starve the
    /// connection's other calls until they are cancelled (--stall-timeout).
    #[arg(long, env = "MINIMESH_CONNECTION_WINDOW", default_value_t = crate::window::CONNECTION,
        value_parser = clap::value_parser!(u32).range(i64::from(crate::window::SMALLEST)..=i64::from(crate::window::LARGEST)))]
    pub connection_window: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            first_call_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_connections: 10_000,
            stall_timeout: Duration::from_secs(30),
            stream_window: crate::window::STREAM,
            connection_window: crate::window::CONNECTION,
        }
    }
}

impl Limits {
    /// The HTTP/2 windows these limits give every connection.
    pub fn windows(&self) -> crate::window::Windows {
        crate::window::Windows {
            stream: self.stream_window,
            connection: self.connection_window,
        }
    }
}

/// Calls in flight on one connection, and when it last had one.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    any_call: AtomicBool,
    /// Milliseconds after `opened` when the last call ended.
    last_end_ms: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            any_call: AtomicBool::new(false),
            last_end_ms: AtomicU64::new(0),
        })
    }

    /// Marks a call in flight until the guard drops (its response ended or
    /// was abandoned).
    pub fn call(self: &Arc<Self>) -> CallGuard {
        self.any_call.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        CallGuard(self.clone())
    }

    /// How long this connection has been without a call, and the limit that applies.
    fn idle(&self, limits: &Limits) -> Option<(Duration, Duration)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let now = self.opened.elapsed();
        if self.any_call.load(Ordering::Relaxed) {
            let last = Duration::from_millis(self.last_end_ms.load(Ordering::Relaxed));
            Some((now.saturating_sub(last), limits.idle_timeout))
        } else {
            Some((now, limits.first_call_timeout))
        }
    }

    /// Resolves once the connection has been idle past its limit.
    pub async fn expired(&self, limits: Limits) {
        loop {
            let wait = match self.idle(&limits) {
                Some((idle, limit)) if idle >= limit => return,
                Some((idle, limit)) => limit - idle,
                None => limits.first_call_timeout.min(limits.idle_timeout),
            };
            tokio::time::sleep(wait.max(Duration::from_millis(50))).await;
        }
    }
}

/// One call in flight.
#[derive(Debug)]
pub struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        let ms = self.0.opened.elapsed().as_millis() as u64;
        self.0.last_end_ms.fetch_max(ms, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a connection's task gets: its activity, the limits, and the stop signal.
#[derive(Debug)]
pub struct Connection {
    /// Calls in flight on this connection, and when it last had one (idle close).
    pub activity: Arc<Activity>,
    /// The limits this connection is served with.
    pub limits: Limits,
    /// Turns true when the listener stops: finish in-flight calls and close.
    pub stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
}

/// How a listener's connections begin.
pub enum Handshake {
    /// h2c: the outbound listener and the gateway's edge.
    Plain,
    /// Mesh mTLS: the caller is named by its certificate (inbound).
    Mesh(Arc<Reloader>),
    /// TLS at the gateway's edge: a server certificate, no client one.
    Edge(Arc<crate::edge::EdgeTls>),
}

/// Serves gRPC calls on `listener` until `stop` turns true: every connection
/// from the accept loop, after its handshake, is one HTTP/2 connection whose
/// calls go to `handle` with the caller's mesh identity (None when plain).
pub async fn serve<H, Fut>(
    what: &'static str,
    listener: TcpListener,
    limits: Limits,
    handshake: Handshake,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
    handle: H,
) where
    H: Fn(Option<SpiffeId>, Request<Incoming>, CallGuard) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    accept_loop(what, listener, limits, stop, move |tcp, connection| {
        let (handle, metrics) = (handle.clone(), metrics.clone());
        let acceptor = match &handshake {
            Handshake::Plain => None,
            Handshake::Mesh(tls) => Some(tokio_rustls::TlsAcceptor::from(tls.current().server())),
            Handshake::Edge(tls) => Some(tokio_rustls::TlsAcceptor::from(tls.config())),
        };
        async move {
            let Some(acceptor) = acceptor else {
                let _guard = metrics.connection(INBOUND);
                return serve_calls(TokioIo::new(tcp), None, handle, connection).await;
            };
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    metrics.tls_failure(INBOUND);
                    tracing::info!(%err, "inbound TLS handshake refused");
                    return;
                }
                Err(_) => {
                    metrics.tls_failure(INBOUND);
                    tracing::info!("inbound TLS handshake timed out");
                    return;
                }
            };
            let _guard = metrics.connection(INBOUND);
            let caller = peer_identity(stream.get_ref().1);
            serve_calls(TokioIo::new(stream), caller, handle, connection).await;
        }
    })
    .await;
}

/// One HTTP/2 connection's calls, each handed to `handle`.
async fn serve_calls<I, H, Fut>(io: I, caller: Option<SpiffeId>, handle: H, connection: Connection)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    H: Fn(Option<SpiffeId>, Request<Incoming>, CallGuard) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let activity = connection.activity.clone();
    let service = hyper::service::service_fn(move |request| {
        // Boxed: hyper moves each stream's future into a task of its
        // own, and a large future costs a memcpy at every move.
        let call = Box::pin(handle(caller.clone(), request, activity.call()));
        async move { Ok::<_, std::convert::Infallible>(call.await) }
    });
    let windows = connection.limits.windows();
    serve_h2(&h2_server(windows), io, service, connection).await;
}

fn h2_server(
    windows: crate::window::Windows,
) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10))
        .initial_stream_window_size(windows.stream)
        .initial_connection_window_size(windows.connection)
        .max_concurrent_streams(crate::window::MAX_STREAMS);
    builder
}

/// Accepts on `listener` until `stop` turns true, runs `serve` for each
/// connection on its own task, then waits (at most [`DRAIN_GRACE`]) for
/// those tasks to finish.
async fn accept_loop<F, Fut>(
    what: &'static str,
    listener: TcpListener,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    serve: F,
) where
    F: Fn(TcpStream, Connection) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let tasks = TaskTracker::new();
    let mut backoff = AcceptBackoff::new(what);
    let mut full = Throttled::default();
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                full.warn(
                    what,
                    &format!("{} connections open, the limit", limits.max_connections),
                );
                tokio::select! {
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                    _ = stop.changed() => break,
                }
            }
        };
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    backoff.accepted();
                    tcp
                }
                Err(err) => {
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.failed(&err)) => {}
                        _ = stop.changed() => break,
                    }
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let connection = Connection {
            activity: Activity::new(),
            limits,
            stop: stop.clone(),
            _permit: permit,
        };
        tasks.spawn(serve(tcp, connection));
    }
    tasks.close();
    if tokio::time::timeout(DRAIN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = what,
            "calls still running after the drain grace period; closing"
        );
    }
}

/// Serves one HTTP/2 connection until it ends, closing it gracefully when
/// the proxy stops or the connection has been idle past its limit.
async fn serve_h2<I, S, B>(
    builder: &hyper::server::conn::http2::Builder<TokioExecutor>,
    io: I,
    service: S,
    mut connection: Connection,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B> + Send,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let activity = connection.activity.clone();
    let limits = connection.limits;
    let closing = tokio::select! {
        result = conn.as_mut() => {
            if let Err(err) = result {
                tracing::debug!(%err, "connection ended");
            }
            return;
        }
        _ = connection.stop.changed() => DRAIN_GRACE,
        _ = activity.expired(limits) => CLOSE_GRACE,
    };
    conn.as_mut().graceful_shutdown();
    // A peer that never answers the GOAWAY's PING must not keep it open.
    if tokio::time::timeout(closing, conn).await.is_err() {
        tracing::debug!("connection did not close in time; dropped");
    }
}

#[cfg(test)]
mod tests;
