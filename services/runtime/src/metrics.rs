//! Prometheus metrics of a service process, served at `/metrics` (with
//! `/live` for probes) by the telemetry crate's admin server.

use crate::exposition::Format;
use minimesh_telemetry::admin::Admin;
pub use minimesh_telemetry::admin::{AbortOnDrop, AdminError};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::Arc;

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

/// Binds `addr` (when given) and serves `/metrics` and `/live` there in the
/// background; the listener stops when the returned guard is dropped.
pub async fn listen(
    addr: Option<&str>,
    metrics: Arc<ServiceMetrics>,
) -> Result<Option<AbortOnDrop>, AdminError> {
    let Some(addr) = addr else { return Ok(None) };
    let admin = Admin::new(move |format| metrics.render(format));
    admin.listen(addr).await.map(Some)
}
