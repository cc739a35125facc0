//! Process telemetry: JSON logs on stdout and, when an OTLP endpoint is
//! configured, OpenTelemetry traces exported over OTLP/gRPC in batches.
//!
//! The standard variables apply: `OTEL_EXPORTER_OTLP_ENDPOINT` (via the
//! `--otlp-endpoint` flags' `env`), `OTEL_SERVICE_NAME` (overrides the
//! default name), `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG` (read by the
//! SDK; parent-based ratio sampling is `parentbased_traceidratio`).

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Spans that could not be exported (collector down or slow).
static DROPPED_SPANS: AtomicU64 = AtomicU64::new(0);
/// Spans exported successfully.
static EXPORTED_SPANS: AtomicU64 = AtomicU64::new(0);

pub fn dropped_spans() -> u64 {
    DROPPED_SPANS.load(Ordering::Relaxed)
}

pub fn exported_spans() -> u64 {
    EXPORTED_SPANS.load(Ordering::Relaxed)
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("building the OTLP exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Flushes and stops the trace pipeline; call before the process exits so
/// the last batch is not lost.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(err) = provider.shutdown()
        {
            tracing::warn!(%err, "trace pipeline shutdown");
        }
    }
}

/// Counts what the OTLP exporter delivers and what it loses.
#[derive(Debug)]
struct CountingExporter<E>(E);

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let len = batch.len() as u64;
        let result = self.0.export(batch).await;
        match &result {
            Ok(()) => EXPORTED_SPANS.fetch_add(len, Ordering::Relaxed),
            Err(_) => DROPPED_SPANS.fetch_add(len, Ordering::Relaxed),
        };
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.0.set_resource(resource);
    }
}

/// Installs logging and, with an endpoint, tracing. Must run inside the Tokio
/// runtime (the batch exporter runs on it).
///
/// `default_name` is used unless `OTEL_SERVICE_NAME` is set; `attributes`
/// become resource attributes (replica, identity, ...).
pub fn init(
    default_name: &str,
    otlp_endpoint: Option<&str>,
    attributes: Vec<KeyValue>,
) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(true)
        .with_span_list(false);
    let Some(endpoint) = otlp_endpoint.filter(|e| !e.is_empty()) else {
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .try_init();
        return Ok(Telemetry { provider: None });
    };
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(3))
        .build()
        .map_err(|source| TelemetryError::Exporter {
            endpoint: endpoint.to_owned(),
            source,
        })?;
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| default_name.to_owned());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name.clone())
        .with_attributes(attributes)
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(CountingExporter(exporter))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer(name);
    opentelemetry::global::set_tracer_provider(provider.clone());
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .try_init();
    Ok(Telemetry {
        provider: Some(provider),
    })
}
