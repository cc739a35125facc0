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
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use std::io::IsTerminal;
use std::sync::LazyLock;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Spans that could not be exported (collector down or slow).
static DROPPED_SPANS: LazyLock<Counter> = LazyLock::new(Counter::default);
/// Spans exported successfully.
static EXPORTED_SPANS: LazyLock<Counter> = LazyLock::new(Counter::default);
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans go anywhere: an OTLP endpoint was configured.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Spans the exporter dropped because its queue was full, since start.
pub fn dropped_spans() -> u64 {
    DROPPED_SPANS.get()
}

/// Spans handed to the exporter, since start.
pub fn exported_spans() -> u64 {
    EXPORTED_SPANS.get()
}

/// Adds the trace pipeline's counters (`minimesh_spans_exported_total`,
/// `minimesh_spans_dropped_total`) to a process's registry.
pub fn register_span_counters(registry: &mut Registry) {
    registry.register(
        "minimesh_spans_exported",
        "Spans delivered to the OTLP collector",
        EXPORTED_SPANS.clone(),
    );
    registry.register(
        "minimesh_spans_dropped",
        "Spans lost because the OTLP collector could not be reached",
        DROPPED_SPANS.clone(),
    );
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built.
    #[error("building the OTLP exporter for {endpoint}: {source}")]
    Exporter {
        /// The OTLP endpoint given.
        endpoint: String,
        /// What the exporter builder said.
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// How log lines are written: `text` for people, `json` for machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One line per event, for people.
    Text,
    /// One JSON object per event, for log collectors.
    Json,
}

impl LogFormat {
    /// Text on a terminal, JSON otherwise (files, pipes, log collectors).
    pub fn for_stdout() -> Self {
        if std::io::stdout().is_terminal() {
            LogFormat::Text
        } else {
            LogFormat::Json
        }
    }

    /// The name the flag takes (`text`, `json`).
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        match raw {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format {other:?} is neither text nor json")),
        }
    }
}

/// Flushes and stops the trace pipeline; call before the process exits so
/// the last batch is not lost.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes the last spans and stops the exporter.
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
            Ok(()) => EXPORTED_SPANS.inc_by(len),
            Err(_) => DROPPED_SPANS.inc_by(len),
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
    log_format: LogFormat,
) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (json, text) = match log_format {
        LogFormat::Json => (
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .fmt_fields(LogSpanFields),
            ),
            None,
        ),
        LogFormat::Text => (
            None,
            Some(tracing_subscriber::fmt::layer().with_ansi(std::io::stdout().is_terminal())),
        ),
    };
    let Some(endpoint) = otlp_endpoint.filter(|e| !e.is_empty()) else {
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(json)
            .with(text)
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
    EXPORTING.store(true, Ordering::Relaxed);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(json)
        .with(text)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .try_init();
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// The span fields JSON log lines carry: the call's name and the ids that tie
/// a line to its trace. tracing-subscriber's JSON field formatter re-parses
/// and re-serialises a span's fields on every `Span::record`, which at the
/// default log level cost the sidecar a third of its calls per CPU-second
/// (BENCHMARKS.md); this one ignores other fields and appends the ids, which
/// are recorded once, without parsing. Spans keep every field for OpenTelemetry.
struct LogSpanFields;

const LOGGED_SPAN_FIELDS: [&str; 3] = ["otel.name", "trace_id", "span_id"];

/// Writes `"name":"value"` pairs, comma-separated, for the logged fields.
struct KeepLogged<'a> {
    out: &'a mut String,
}

impl tracing::field::Visit for KeepLogged<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if LOGGED_SPAN_FIELDS.contains(&field.name()) {
            if !self.out.is_empty() {
                self.out.push(',');
            }
            // Serialising a string cannot fail; the fallback is unreachable.
            self.out
                .push_str(&serde_json::to_string(field.name()).unwrap_or_default());
            self.out.push(':');
            self.out
                .push_str(&serde_json::to_string(value).unwrap_or_default());
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if LOGGED_SPAN_FIELDS.contains(&field.name()) {
            self.record_str(field, &format!("{value:?}"));
        }
    }
}

impl<'writer> tracing_subscriber::fmt::FormatFields<'writer> for LogSpanFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: tracing_subscriber::fmt::format::Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        let mut kept = String::new();
        fields.record(&mut KeepLogged { out: &mut kept });
        write!(writer, "{{{kept}}}")
    }

    fn add_fields(
        &self,
        current: &'writer mut tracing_subscriber::fmt::FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> std::fmt::Result {
        let mut kept = String::new();
        fields.record(&mut KeepLogged { out: &mut kept });
        if kept.is_empty() {
            return Ok(());
        }
        // `current` is a JSON object: add the new pairs before its closing brace.
        match current.fields.strip_suffix('}') {
            Some(open) if open.len() > 1 => current.fields = format!("{open},{kept}}}"),
            _ => current.fields = format!("{{{kept}}}"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod log_fields_tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn log_lines_carry_the_span_ids_and_name_and_nothing_else() {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .fmt_fields(LogSpanFields)
                .with_writer(move || sink.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "rpc",
                otel.name = "shop.v1.S/M",
                rpc.method = "M",
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty,
                status = tracing::field::Empty
            );
            span.record("status", 3);
            span.record(
                "trace_id",
                tracing::field::display("0af7651916cd43dd8448eb211c80319c"),
            );
            span.record("span_id", "b7ad6b7169203331");
            span.in_scope(|| tracing::info!(order = "o-1", "order \"quoted\" created"));
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        let span = &line["span"];
        assert_eq!(
            span["trace_id"], "0af7651916cd43dd8448eb211c80319c",
            "{line}"
        );
        assert_eq!(span["span_id"], "b7ad6b7169203331");
        assert_eq!(span["otel.name"], "shop.v1.S/M");
        assert!(
            span.get("rpc.method").is_none() && span.get("status").is_none(),
            "{line}"
        );
        assert_eq!(line["fields"]["message"], "order \"quoted\" created");
        assert_eq!(line["fields"]["order"], "o-1");
    }
}
