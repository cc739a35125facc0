//! The proxy as a process: its flags around [`SidecarArgs`] and
//! [`GatewayArgs`], telemetry set up and shut down around the run. Both
//! `minimesh sidecar` and the proxy-only `minimesh-proxy sidecar` start here,
//! so the two accept the same flags and behave the same.

use crate::{GatewayArgs, SidecarArgs, SidecarError};
use minimesh_telemetry::process::{TelemetryArgs, follow_supervisor};
use minimesh_telemetry::telemetry::{self, TelemetryError};
use minimesh_telemetry::{memory, shutdown};
use opentelemetry::KeyValue;

/// Why a proxy process stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Logging or trace export could not be set up.
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    /// The proxy could not start or failed while running.
    #[error(transparent)]
    Proxy(#[from] SidecarError),
}

/// A proxy's flags: telemetry, runtime threads, and the proxy's own `T`.
#[derive(clap::Args, Debug)]
pub struct ProxyArgs<T: clap::Args> {
    /// Trace export and log settings.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// Runtime worker threads. A sidecar defaults to 1: it shares its pod's
    /// CPU with the application, and one thread spares every cross-thread
    /// wake-up (see BENCHMARKS.md). The gateway defaults to one per core.
    #[arg(long, env = "MINIMESH_PROXY_THREADS")]
    pub threads: Option<usize>,
    /// The proxy's own flags.
    #[command(flatten)]
    pub proxy: T,
}

impl ProxyArgs<SidecarArgs> {
    /// Worker threads for a sidecar: one unless asked otherwise.
    pub fn runtime_threads(&self) -> Option<usize> {
        Some(self.threads.unwrap_or(1))
    }
}

impl ProxyArgs<GatewayArgs> {
    /// Worker threads for the gateway: one per core unless asked otherwise.
    pub fn runtime_threads(&self) -> Option<usize> {
        self.threads
    }
}

/// Runs a sidecar until SIGTERM or SIGINT; `version` goes into its traces.
pub async fn run_sidecar(
    args: ProxyArgs<SidecarArgs>,
    version: &'static str,
) -> Result<(), ProcessError> {
    let service = args
        .proxy
        .service
        .clone()
        .unwrap_or_else(|| "unknown".to_owned());
    let telemetry = telemetry::init(
        &format!("minimesh-sidecar-{service}"),
        args.telemetry.otlp_endpoint.as_deref(),
        vec![
            KeyValue::new("minimesh.service", service),
            KeyValue::new("minimesh.replica", i64::from(args.telemetry.replica)),
            KeyValue::new("service.version", version),
        ],
        args.telemetry.log_format(),
    )?;
    follow_supervisor();
    memory::spawn_trimmer();
    let result = crate::server::run_sidecar(args.proxy, shutdown::signal()).await;
    telemetry.shutdown();
    Ok(result?)
}

/// Runs the gateway until SIGTERM or SIGINT; `version` goes into its traces.
pub async fn run_gateway(
    args: ProxyArgs<GatewayArgs>,
    version: &'static str,
) -> Result<(), ProcessError> {
    let telemetry = telemetry::init(
        "minimesh-gateway",
        args.telemetry.otlp_endpoint.as_deref(),
        vec![
            KeyValue::new("minimesh.replica", i64::from(args.telemetry.replica)),
            KeyValue::new("service.version", version),
        ],
        args.telemetry.log_format(),
    )?;
    follow_supervisor();
    memory::spawn_trimmer();
    let result = crate::server::run_gateway(args.proxy, shutdown::signal()).await;
    telemetry.shutdown();
    Ok(result?)
}
