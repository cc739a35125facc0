//! What every minimesh process shares, services and proxies alike: log
//! setup, OTLP tracing and W3C trace propagation, Prometheus/OpenMetrics
//! exposition, listeners inherited from `up`, shutdown signals and handing
//! freed memory back. Nothing here knows about storage or the shop's APIs,
//! so the proxy can depend on it without them.

pub mod admin;
pub mod exposition;
pub mod listen;
pub mod logging;
pub mod memory;
pub mod process;
pub mod shutdown;
pub mod status;
pub mod telemetry;
pub mod trace;
