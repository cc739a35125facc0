//! The admin listener: `/live`, `/ready` and `/metrics` over HTTP/1.1, for
//! probes and Prometheus. Plaintext on purpose: kubelet probes carry no
//! client certificate.

use crate::metrics::Metrics;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use minimesh_telemetry::exposition::Format;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::net::TcpListener;

/// What `/ready` asks: `Ok` when the local service is SERVING, else why not.
pub type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

async fn respond(
    request: Request<Incoming>,
    metrics: Arc<Metrics>,
    ready: ReadyCheck,
) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "text/plain", "live\n".into()),
        (&Method::GET, "/ready") => match ready().await {
            Ok(()) => text(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        (&Method::GET, "/metrics") => {
            let format = Format::negotiate(request.headers().get(http::header::ACCEPT));
            text(
                StatusCode::OK,
                format.content_type(),
                metrics.render(format),
            )
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /live, /ready or /metrics\n".into(),
        ),
    }
}

/// Serves the admin endpoints until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, ready: ReadyCheck) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(%err, "admin accept failed");
                continue;
            }
        };
        let (metrics, ready) = (metrics.clone(), ready.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let (metrics, ready) = (metrics.clone(), ready.clone());
                async move { Ok::<_, std::convert::Infallible>(respond(request, metrics, ready).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
