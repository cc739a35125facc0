//! What every minimesh executable does around its component: the telemetry
//! flags, the Tokio runtime, the supervised-child contract with `up`, and
//! the one error line `up` quotes. Shared by `minimesh` and `minimesh-proxy`
//! so both start a component the same way.

use crate::telemetry::LogFormat;
use std::process::ExitCode;

/// Set in every child's environment by `up`: the child then dies with its supervisor.
pub const SUPERVISED_ENV: &str = "MINIMESH_SUPERVISED";
/// The line a component prints on stderr when it fails, which `up` quotes.
pub const ERROR_PREFIX: &str = "minimesh: error: ";

/// Trace export and log settings every component shares.
#[derive(clap::Args, Debug, Clone)]
pub struct TelemetryArgs {
    /// OTLP/gRPC collector endpoint (e.g. http://127.0.0.1:4317); no export without it.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    /// Replica number, recorded as a resource attribute.
    #[arg(long, env = "MINIMESH_REPLICA", global = true, default_value_t = 0)]
    pub replica: u32,
    /// Log lines as `text` or `json` (default: text on a terminal, JSON otherwise).
    #[arg(long, env = "MINIMESH_LOG_FORMAT", global = true)]
    pub log_format: Option<LogFormat>,
}

impl TelemetryArgs {
    /// The format asked for, else the one that suits stdout.
    pub fn log_format(&self) -> LogFormat {
        self.log_format.unwrap_or_else(LogFormat::for_stdout)
    }
}

/// Under `up`: die with it, so a supervisor killed with SIGKILL leaves no orphans.
pub fn follow_supervisor() {
    if std::env::var_os(SUPERVISED_ENV).is_some() {
        crate::shutdown::die_with_parent();
    }
}

/// A runtime with `threads` workers: one means a current-thread runtime (no
/// cross-thread wake-ups), none means one worker per core.
pub fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) if n > 1 => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
}

/// The exit code for a component's result; a failure is printed as one
/// [`ERROR_PREFIX`] line with its whole cause chain (`up` quotes it), no backtrace.
pub fn exit_code(result: Result<(), Box<dyn std::error::Error + Send + Sync>>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{ERROR_PREFIX}{}", one_line(&*err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text its
/// wrapper already quotes (many error types print their source too).
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut cause = Some(err);
    while let Some(current) = cause {
        let text = current.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        cause = current.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading config: {0}")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn a_cause_the_wrapper_already_quotes_is_not_repeated() {
        let err = Outer(std::io::Error::other("no such file"));
        assert_eq!(one_line(&err), "reading config: no such file");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("starting the sidecar")]
    struct Bare(#[source] std::io::Error);

    #[test]
    fn every_cause_is_on_the_line() {
        let err = Bare(std::io::Error::other("address in use"));
        assert_eq!(one_line(&err), "starting the sidecar: address in use");
    }
}
