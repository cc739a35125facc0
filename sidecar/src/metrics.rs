//! The proxy's Prometheus series, with the labels of CONTRACT §3.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub direction: &'static str,
    pub service: String,
    pub method: String,
    pub grpc_status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub direction: &'static str,
    pub service: String,
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub direction: &'static str,
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

pub const INBOUND: &str = "inbound";
pub const OUTBOUND: &str = "outbound";

pub struct Metrics {
    registry: Registry,
    requests: Family<CallLabels, Counter>,
    durations: Family<LatencyLabels, Histogram>,
    retries: Family<ServiceLabels, Counter>,
    ejections: Family<ServiceLabels, Counter>,
    tls_failures: Family<DirectionLabels, Counter>,
    open_connections: Family<DirectionLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Splits `/pkg.Service/Method` into the service and method labels.
pub fn labels_of(path: &str) -> (String, String) {
    let trimmed = path.trim_start_matches('/');
    match trimmed.split_once('/') {
        Some((service, method)) => (service.to_owned(), method.to_owned()),
        None => (trimmed.to_owned(), String::new()),
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let requests = Family::<CallLabels, Counter>::default();
        registry.register(
            "minimesh_requests",
            "Proxied gRPC calls by final status",
            requests.clone(),
        );
        // 100 µs to ~13 s in doubling buckets.
        let durations = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        registry.register_with_unit(
            "minimesh_request_duration",
            "Time from receiving a call to the end of its response",
            prometheus_client::registry::Unit::Seconds,
            durations.clone(),
        );
        let retries = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "minimesh_retries",
            "Attempts re-sent after a failure that never reached the application",
            retries.clone(),
        );
        let ejections = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "minimesh_endpoint_ejections",
            "Endpoints taken out of rotation after consecutive failures",
            ejections.clone(),
        );
        let tls_failures = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "minimesh_tls_handshake_failures",
            "TLS handshakes that failed",
            tls_failures.clone(),
        );
        let open_connections = Family::<DirectionLabels, Gauge>::default();
        registry.register(
            "minimesh_open_connections",
            "Connections currently open",
            open_connections.clone(),
        );
        // Failure counters are visible at zero before the first failure.
        for direction in [INBOUND, OUTBOUND] {
            let _ = tls_failures.get_or_create(&DirectionLabels { direction });
            let _ = open_connections.get_or_create(&DirectionLabels { direction });
        }
        Arc::new(Self {
            registry,
            requests,
            durations,
            retries,
            ejections,
            tls_failures,
            open_connections,
        })
    }

    pub fn request_done(
        &self,
        direction: &'static str,
        path: &str,
        grpc_status: u32,
        elapsed: std::time::Duration,
    ) {
        let (service, method) = labels_of(path);
        self.durations
            .get_or_create(&LatencyLabels {
                direction,
                service: service.clone(),
                method: method.clone(),
            })
            .observe(elapsed.as_secs_f64());
        self.requests
            .get_or_create(&CallLabels {
                direction,
                service,
                method,
                grpc_status: grpc_status.to_string(),
            })
            .inc();
    }

    pub fn retry(&self, direction: &'static str, upstream: &str) {
        self.retries
            .get_or_create(&ServiceLabels {
                direction,
                service: upstream.to_owned(),
            })
            .inc();
    }

    pub fn ejection(&self, direction: &'static str, upstream: &str) {
        self.ejections
            .get_or_create(&ServiceLabels {
                direction,
                service: upstream.to_owned(),
            })
            .inc();
    }

    pub fn tls_failure(&self, direction: &'static str) {
        self.tls_failures
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    /// Counts a connection open until the guard drops.
    pub fn connection(self: &Arc<Self>, direction: &'static str) -> ConnectionGuard {
        self.open_connections
            .get_or_create(&DirectionLabels { direction })
            .inc();
        ConnectionGuard {
            metrics: self.clone(),
            direction,
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode_registry(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out.push_str("# HELP minimesh_spans_dropped_total Spans lost because the OTLP collector could not be reached.\n");
        out.push_str("# TYPE minimesh_spans_dropped_total counter\n");
        out.push_str(&format!(
            "minimesh_spans_dropped_total {}\n",
            minimesh_runtime::telemetry::dropped_spans()
        ));
        out.push_str("# EOF\n");
        out
    }
}

pub struct ConnectionGuard {
    metrics: Arc<Metrics>,
    direction: &'static str,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.metrics
            .open_connections
            .get_or_create(&DirectionLabels {
                direction: self.direction,
            })
            .dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_carry_the_contract_labels() {
        let metrics = Metrics::new();
        metrics.request_done(
            INBOUND,
            "/shop.payment.v1.PaymentService/Charge",
            0,
            std::time::Duration::from_millis(3),
        );
        metrics.request_done(
            INBOUND,
            "/shop.payment.v1.PaymentService/Charge",
            7,
            std::time::Duration::from_millis(3),
        );
        metrics.retry(OUTBOUND, "payment");
        metrics.ejection(OUTBOUND, "payment");
        metrics.tls_failure(INBOUND);
        let guard = metrics.connection(INBOUND);
        let text = metrics.render();
        assert!(text.contains(r#"minimesh_requests_total{direction="inbound",service="shop.payment.v1.PaymentService",method="Charge",grpc_status="0"} 1"#), "{text}");
        assert!(text.contains(r#"grpc_status="7"} 1"#));
        assert!(text.contains("minimesh_request_duration_seconds_bucket"));
        assert!(
            text.contains(r#"minimesh_retries_total{direction="outbound",service="payment"} 1"#)
        );
        assert!(text.contains(
            r#"minimesh_endpoint_ejections_total{direction="outbound",service="payment"} 1"#
        ));
        assert!(text.contains(r#"minimesh_tls_handshake_failures_total{direction="inbound"} 1"#));
        assert!(text.contains(r#"minimesh_open_connections{direction="inbound"} 1"#));
        drop(guard);
        assert!(
            metrics
                .render()
                .contains(r#"minimesh_open_connections{direction="inbound"} 0"#)
        );
    }
}
