//! The proxy's Prometheus series, with the labels of CONTRACT §3.

use minimesh_telemetry::exposition::Format;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// Labels of `minimesh_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The gRPC service called (or `unrouted`).
    pub service: Arc<str>,
    /// The gRPC method called (or `unrouted`).
    pub method: Arc<str>,
    /// The final gRPC status code, as a number.
    pub grpc_status: u32,
    /// The caller's identity name (`gateway`, `order`, …).
    pub client_id: Arc<str>,
}

/// Labels of `minimesh_request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The gRPC service called (or `unrouted`).
    pub service: Arc<str>,
    /// The gRPC method called (or `unrouted`).
    pub method: Arc<str>,
    /// The caller's identity name (`gateway`, `order`, …).
    pub client_id: Arc<str>,
}

/// Labels every series of one proxy carries: what it is and what it fronts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyLabels {
    /// `sidecar` or `gateway`.
    pub role: &'static str,
    /// The mesh service this proxy fronts (its identity's name).
    pub service: String,
}

/// Labels of the per-upstream counters (retries, ejections).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The upstream (or local service) concerned.
    pub service: String,
}

/// Labels of the per-direction series (TLS failures, open connections).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
}

/// The `direction` of calls coming into the proxy's local service.
pub const INBOUND: &str = "inbound";
/// The `direction` of calls going out to the mesh.
pub const OUTBOUND: &str = "outbound";
/// The `service` and `method` label of calls that were not forwarded (no
/// route, refused caller): a raw path would let any client mint series.
pub const UNROUTED: &str = "unrouted";

/// The `service`/`method` labels of one call, fixed once it is known where
/// the call goes. Shared strings: counting a call clones no label text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallName {
    /// The gRPC service, e.g. `shop.order.v1.OrderService`.
    pub service: Arc<str>,
    /// The method, e.g. `CreateOrder`.
    pub method: Arc<str>,
}

impl CallName {
    /// `/pkg.Service/Method` split into its service and method.
    pub fn of(path: &str) -> Self {
        let trimmed = path.trim_start_matches('/');
        let (service, method) = trimmed.split_once('/').unwrap_or((trimmed, ""));
        Self {
            service: service.into(),
            method: method.into(),
        }
    }

    /// The labels of a call that was not forwarded.
    pub fn unrouted() -> Self {
        Self {
            service: UNROUTED.into(),
            method: UNROUTED.into(),
        }
    }
}

/// The proxy's Prometheus registry and every series it records.
pub struct Metrics {
    registry: Registry,
    requests: Family<CallLabels, Counter>,
    durations: Family<LatencyLabels, Histogram>,
    retries: Family<ServiceLabels, Counter>,
    ejections: Family<ServiceLabels, Counter>,
    tls_failures: Family<DirectionLabels, Counter>,
    open_connections: Family<DirectionLabels, Gauge>,
    app_calls: Gauge,
    stalls_cancelled: Counter,
    certificate_expiry: Gauge,
    renewals: Family<ResultLabels, Counter>,
}

/// Labels of `minimesh_identity_renewals_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// The series of one proxy: `role` is `sidecar` or `gateway`, `service`
    /// the name of its own identity, `upstreams` the services it calls (their
    /// retry and ejection counters exist at zero from the start).
    pub fn new(role: &'static str, service: &str, upstreams: &[String]) -> Arc<Self> {
        let mut registry = Registry::default();
        let info = Family::<ProxyLabels, Gauge>::default();
        registry.register(
            "minimesh_proxy",
            "Which proxy this is (always 1): role and the mesh service it fronts",
            info.clone(),
        );
        info.get_or_create(&ProxyLabels {
            role,
            service: service.to_owned(),
        })
        .set(1);
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
        let app_calls = Gauge::default();
        registry.register(
            "minimesh_app_calls_in_flight",
            "Calls this sidecar has open to its local service (bounded by --max-app-streams)",
            app_calls.clone(),
        );
        let stalls_cancelled = Counter::default();
        registry.register(
            "minimesh_stalled_responses_cancelled",
            "Responses cancelled because their reader took no data for --stall-timeout",
            stalls_cancelled.clone(),
        );
        // Failure counters are visible at zero before the first failure.
        for direction in [INBOUND, OUTBOUND] {
            let _ = tls_failures.get_or_create(&DirectionLabels { direction });
            let _ = open_connections.get_or_create(&DirectionLabels { direction });
        }
        for upstream in upstreams {
            let labels = ServiceLabels {
                direction: OUTBOUND,
                service: upstream.clone(),
            };
            let _ = retries.get_or_create(&labels);
            let _ = ejections.get_or_create(&labels);
        }
        let certificate_expiry = Gauge::default();
        registry.register(
            "minimesh_identity_certificate_expiry_timestamp_seconds",
            "When this proxy's mesh certificate expires (seconds since the Unix epoch)",
            certificate_expiry.clone(),
        );
        let renewals = Family::<ResultLabels, Counter>::default();
        registry.register(
            "minimesh_identity_renewals",
            "Attempts to renew this proxy's certificate with the identity issuer, by result",
            renewals.clone(),
        );
        for result in ["ok", "error"] {
            let _ = renewals.get_or_create(&ResultLabels { result });
        }
        minimesh_telemetry::telemetry::register_span_counters(&mut registry);
        Arc::new(Self {
            registry,
            requests,
            durations,
            retries,
            ejections,
            tls_failures,
            open_connections,
            app_calls,
            stalls_cancelled,
            certificate_expiry,
            renewals,
        })
    }

    /// The current certificate's expiry (seconds since the epoch).
    pub fn certificate_expires(&self, unix: i64) {
        self.certificate_expiry.set(unix);
    }

    /// Counts one certificate renewal attempt.
    pub fn renewal(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.renewals.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts one finished call. `client_id` is the caller's identity name
    /// (inbound) or this proxy's own (outbound).
    pub fn request_done(
        &self,
        direction: &'static str,
        name: &CallName,
        client_id: &Arc<str>,
        grpc_status: u32,
        elapsed: std::time::Duration,
    ) {
        self.durations
            .get_or_create(&LatencyLabels {
                direction,
                service: name.service.clone(),
                method: name.method.clone(),
                client_id: client_id.clone(),
            })
            .observe(elapsed.as_secs_f64());
        self.requests
            .get_or_create(&CallLabels {
                direction,
                service: name.service.clone(),
                method: name.method.clone(),
                grpc_status,
                client_id: client_id.clone(),
            })
            .inc();
    }

    /// Counts one retry to `upstream`.
    pub fn retry(&self, direction: &'static str, upstream: &str) {
        self.retries
            .get_or_create(&ServiceLabels {
                direction,
                service: upstream.to_owned(),
            })
            .inc();
    }

    /// Counts one endpoint ejection in `upstream`.
    pub fn ejection(&self, direction: &'static str, upstream: &str) {
        self.ejections
            .get_or_create(&ServiceLabels {
                direction,
                service: upstream.to_owned(),
            })
            .inc();
    }

    /// Counts one failed TLS handshake.
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

    /// The gauge of calls open to the local service.
    pub fn app_calls(&self) -> Gauge {
        self.app_calls.clone()
    }

    /// The counter of responses cancelled for a stalled reader.
    pub fn stalls_cancelled(&self) -> Counter {
        self.stalls_cancelled.clone()
    }

    /// Every series, in the format the scraper asked for.
    pub fn render(&self, format: Format) -> String {
        minimesh_telemetry::exposition::encode(&[&self.registry], format)
    }
}

/// Counts a connection in `minimesh_open_connections` until dropped.
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
mod tests;
