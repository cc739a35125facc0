//! Prometheus metrics of a service process, served over HTTP/1.1 at
//! `/metrics` (with `/live` for probes) on their own listener.

use crate::exposition::Format;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use tokio::net::TcpListener;

/// The label of the outcome counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// The outcome, e.g. an order status or `captured`/`declined`.
    pub status: String,
}

/// Business counters of one service plus the trace pipeline's own counts.
pub struct ServiceMetrics {
    registry: Registry,
    /// Orders reaching a status (order service) or payments by outcome (payment service).
    pub outcomes: Family<StatusLabel, Counter>,
}

impl ServiceMetrics {
    /// `outcome_name` is e.g. `minimesh_orders` (exported as `minimesh_orders_total`).
    pub fn new(outcome_name: &str, help: &str) -> Arc<Self> {
        let mut registry = Registry::default();
        let outcomes = Family::<StatusLabel, Counter>::default();
        registry.register(outcome_name, help, outcomes.clone());
        crate::telemetry::register_span_counters(&mut registry);
        Arc::new(Self { registry, outcomes })
    }

    /// Counts one outcome.
    pub fn count(&self, status: &str) {
        self.outcomes
            .get_or_create(&StatusLabel {
                status: status.to_owned(),
            })
            .inc();
    }

    /// Every series, in the format the scraper asked for.
    pub fn render(&self, format: Format) -> String {
        crate::exposition::encode(&[&self.registry], format)
    }
}

fn respond(metrics: &ServiceMetrics, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            let format = Format::negotiate(request.headers().get(http::header::ACCEPT));
            (
                StatusCode::OK,
                format.content_type(),
                metrics.render(format),
            )
        }
        (&Method::GET, "/live") => (StatusCode::OK, "text/plain", "live\n".to_owned()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

/// The metrics listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("binding the metrics listener to {addr}: {source}")]
pub struct MetricsError {
    addr: String,
    source: std::io::Error,
}

/// Binds `addr` (when given) and serves `/metrics` there in the background;
/// the listener stops when the returned guard is dropped.
pub async fn listen(
    addr: Option<&str>,
    metrics: Arc<ServiceMetrics>,
) -> Result<Option<AbortOnDrop>, MetricsError> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = crate::listen::bind(addr)
        .await
        .map_err(|source| MetricsError {
            addr: addr.to_owned(),
            source,
        })?;
    tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics listening");
    Ok(Some(AbortOnDrop(tokio::spawn(serve(listener, metrics)))))
}

/// Aborts a background task when dropped.
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<ServiceMetrics>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(%err, "metrics listener accept failed");
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = respond(&metrics, &request);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
