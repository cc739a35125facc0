//! The one admin HTTP server every minimesh process runs beside its gRPC
//! ports: `/live`, `/metrics`, and `/ready` where the process has a
//! readiness of its own (the proxies). Plaintext HTTP/1.1 on purpose: kubelet
//! probes and Prometheus speak it and carry no mesh certificate.

use crate::exposition::Format;
use crate::listen::AcceptBackoff;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// What `/ready` asks: `Ok` when the process can take traffic, else why not.
pub type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// Every series of the process, in the format the scraper asked for.
pub type Render = Arc<dyn Fn(Format) -> String + Send + Sync>;

/// A scraper or prober that has not sent its request headers by then is
/// dropped, so idle connections cannot pile up on the admin port.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What one admin listener serves.
#[derive(Clone)]
pub struct Admin {
    render: Render,
    ready: Option<ReadyCheck>,
    header_read_timeout: Duration,
}

impl Admin {
    /// `/live` and `/metrics`, the latter from `render`.
    pub fn new(render: impl Fn(Format) -> String + Send + Sync + 'static) -> Self {
        Self {
            render: Arc::new(render),
            ready: None,
            header_read_timeout: HEADER_READ_TIMEOUT,
        }
    }

    /// Serves `/ready` too, answered by `ready`.
    pub fn with_ready(mut self, ready: ReadyCheck) -> Self {
        self.ready = Some(ready);
        self
    }

    async fn respond(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/live") => text(StatusCode::OK, "text/plain", "live\n".into()),
            (&Method::GET, "/metrics") => {
                let format = Format::negotiate(request.headers().get(http::header::ACCEPT));
                text(StatusCode::OK, format.content_type(), (self.render)(format))
            }
            (&Method::GET, "/ready") => match &self.ready {
                Some(check) => match check().await {
                    Ok(()) => text(StatusCode::OK, "text/plain", "ready\n".into()),
                    Err(why) => text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!("not ready: {why}\n"),
                    ),
                },
                None => self.not_found(),
            },
            _ => self.not_found(),
        }
    }

    fn not_found(&self) -> Response<Full<Bytes>> {
        let paths = if self.ready.is_some() {
            "/live, /ready or /metrics"
        } else {
            "/live or /metrics"
        };
        text(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("not found: try {paths}\n"),
        )
    }

    /// Serves on `listener` until the task is dropped.
    pub async fn serve(self, listener: TcpListener) {
        let admin = Arc::new(self);
        let mut backoff = AcceptBackoff::new("admin");
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => {
                    backoff.accepted();
                    stream
                }
                Err(err) => {
                    tokio::time::sleep(backoff.failed(&err)).await;
                    continue;
                }
            };
            let admin = admin.clone();
            tokio::spawn(async move {
                let timeout = admin.header_read_timeout;
                let service = hyper::service::service_fn(move |request| {
                    let admin = admin.clone();
                    async move { Ok::<_, std::convert::Infallible>(admin.respond(request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(timeout)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    /// Binds `addr` (an inherited socket when `up` passed one) and serves
    /// there in the background until the returned guard is dropped.
    pub async fn listen(self, addr: &str) -> Result<AbortOnDrop, AdminError> {
        let listener = crate::listen::bind(addr)
            .await
            .map_err(|source| AdminError {
                addr: addr.to_owned(),
                source,
            })?;
        tracing::info!(
            addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            "admin listening"
        );
        Ok(AbortOnDrop(tokio::spawn(self.serve(listener))))
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

/// The admin listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("binding the admin listener (/live, /metrics) to {addr}: {source}")]
pub struct AdminError {
    addr: String,
    source: std::io::Error,
}

/// Aborts a background task when dropped.
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        (status, body)
    }

    async fn start(admin: Admin) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(admin.serve(listener));
        addr
    }

    #[tokio::test]
    async fn a_process_without_readiness_serves_live_and_metrics_only() {
        let addr = start(Admin::new(|_| "up 1\n".to_owned())).await;
        assert_eq!(get(addr, "/live").await, (200, "live\n".to_owned()));
        assert_eq!(get(addr, "/metrics").await, (200, "up 1\n".to_owned()));
        let (status, body) = get(addr, "/ready").await;
        assert_eq!(status, 404);
        assert!(body.contains("/live or /metrics"), "{body}");
    }

    #[tokio::test]
    async fn ready_answers_with_the_reason_it_is_not() {
        let ready: ReadyCheck =
            Arc::new(|| Box::pin(async { Err("no endpoints yet for user".to_owned()) }));
        let addr = start(Admin::new(|_| String::new()).with_ready(ready)).await;
        let (status, body) = get(addr, "/ready").await;
        assert_eq!(status, 503);
        assert_eq!(body, "not ready: no endpoints yet for user\n");
    }

    #[tokio::test]
    async fn a_client_that_never_sends_its_headers_is_dropped() {
        use tokio::io::AsyncReadExt;
        let mut admin = Admin::new(|_| String::new());
        admin.header_read_timeout = Duration::from_millis(200);
        let addr = start(admin).await;
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf)).await;
        assert!(
            read.is_ok(),
            "a connection that sent nothing was still open after 10 s"
        );
    }
}
