//! `minimesh up`: the local mesh supervisor.
//!
//! Every component is a copy of this binary started with a subcommand, so a
//! plain `cargo run -- up` needs no other build step. Ports are picked once at
//! start and kept across restarts, so peers' configuration stays valid when a
//! child is restarted.
//!
//! - [`shop`]: the shop's services, whom each calls and who may call it
//!   (`helm/minimesh/shop.yaml`, which the chart and the tests read too);
//! - [`plan`] (with [`ports`]): the topology, every child's command line;
//! - [`child`]: starting and stopping one child process;
//! - [`probe`]: whether children are ready;
//! - [`supervise`]: starting the mesh, restarting children, stopping it;
//! - [`mesh_file`]: writing `mesh.json`;
//! - [`lock`]: one `up` per data dir.

mod child;
mod lock;
mod mesh_file;
mod plan;
mod ports;
mod probe;
mod shop;
mod supervise;

use anyhow::Context;
use lock::DataDirLock;
use minimesh_identity::bootstrap::BootstrapKey;
use minimesh_runtime::telemetry::LogFormat;
use plan::{bind_gateway, plan, prepare_certs, validate};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const TRUST_DOMAIN: &str = "minimesh.local";
/// How often an owed `mesh.json` write is tried again (e.g. disk full).
const MESH_FILE_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct UpArgs {
    /// Where SQLite files, certificates, logs and mesh.json go.
    #[arg(long, env = "MINIMESH_DATA_DIR", default_value = "./.minimesh")]
    pub data_dir: PathBuf,
    /// The gateway's listen address (h2c).
    #[arg(long, env = "MINIMESH_GATEWAY_ADDR", default_value = "127.0.0.1:50051")]
    pub gateway_addr: SocketAddr,
    /// Replicas per service, e.g. `payment=3,order=2` (others default to 1).
    #[arg(long, env = "MINIMESH_REPLICAS", value_parser = parse_replicas, default_value = "")]
    pub replicas: Replicas,
    /// How long a paid order waits before each fulfilment step.
    #[arg(long, env = "MINIMESH_FULFILMENT_STEP", value_parser = humantime::parse_duration, default_value = "2s")]
    pub fulfilment_step: Duration,
    /// Services the gateway serves to callers outside the mesh; the others
    /// answer PERMISSION_DENIED at the edge.
    #[arg(
        long,
        env = "MINIMESH_EXPOSE",
        value_delimiter = ',',
        default_value = "user,order"
    )]
    pub expose: Vec<String>,
    /// Lifetime of every workload certificate (renewed at about 70% of it).
    #[arg(long, env = "MINIMESH_CERT_TTL", value_parser = humantime::parse_duration, default_value = "24h")]
    pub cert_ttl: Duration,
    /// OTLP/gRPC endpoint every service and sidecar exports traces to.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// A PostgreSQL URL: every service keeps its data there, each in its own
    /// schema, and no SQLite file is created. Without it, SQLite files in
    /// the data dir. Handed to the services in their environment, so the
    /// password shows in no command line.
    #[arg(long, env = "MINIMESH_DATABASE_URL", value_parser = parse_database_url, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Wait before restarting a child that died (doubles while it keeps dying).
    #[arg(long, env = "MINIMESH_RESTART_DELAY", value_parser = humantime::parse_duration, default_value = "100ms")]
    pub restart_delay: Duration,
    /// The executable sidecars and the gateway run as (`sidecar …`, `gateway …`).
    /// Default: `minimesh-proxy` beside this binary when it is there (it
    /// maps 4 MiB less code into every proxy), else this binary itself.
    #[arg(long, env = "MINIMESH_PROXY_BIN")]
    pub proxy_bin: Option<std::path::PathBuf>,
    /// Log format of `up` itself and of the children's log files
    /// (default: up's own text on a terminal; the files JSON).
    #[arg(long, env = "MINIMESH_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Test-only: make one instance slow, e.g. `payment-1=50ms` (passed as its --debug-delay).
    #[arg(long, hide = true, value_delimiter = ',')]
    pub debug_delay: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Replicas(BTreeMap<String, u16>);

impl Replicas {
    fn of(&self, service: &str) -> u16 {
        self.0.get(service).copied().unwrap_or(1)
    }
}

fn parse_replicas(raw: &str) -> Result<Replicas, String> {
    let mut map = BTreeMap::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (service, count) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not SERVICE=N"))?;
        let shop = shop::shop().map_err(|e| e.to_string())?;
        if shop.get(service).is_none() {
            let names: Vec<_> = shop.names().collect();
            return Err(format!(
                "unknown service {service:?}; expected one of {names:?}"
            ));
        }
        let count: u16 = count
            .parse()
            .map_err(|_| format!("replica count {count:?} of {service} is not a number"))?;
        if !(1..=16).contains(&count) {
            return Err(format!(
                "replicas of {service} must be 1 to 16, got {count}"
            ));
        }
        map.insert(service.to_owned(), count);
    }
    Ok(Replicas(map))
}

pub(crate) async fn run(args: UpArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data dir {}", args.data_dir.display()))?;
    let data_dir = args
        .data_dir
        .canonicalize()
        .with_context(|| format!("resolving data dir {}", args.data_dir.display()))?;
    // Before anything in the data dir is touched: one `up` per data dir.
    let _lock = DataDirLock::acquire(&data_dir)?;
    let gateway_listener = bind_gateway(args.gateway_addr)?;
    let logs = data_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let certs = data_dir.join("certs");
    // Shared with the issuer only: it checks the one-time tokens minted
    // from it for each proxy this `up` starts.
    let bootstrap = BootstrapKey::generate();
    let plan = plan(
        &args,
        &data_dir,
        &certs,
        &logs,
        gateway_listener,
        &bootstrap,
    )?;
    validate(&plan.children)?;
    prepare_certs(&certs)?;
    let programs = child::Programs::find(args.proxy_bin)?;
    supervise::supervise(
        plan,
        &programs,
        &data_dir,
        &certs,
        &bootstrap,
        args.restart_delay,
    )
    .await
}

fn init_logging(format: Option<LogFormat>) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let terminal = std::io::stderr().is_terminal();
    let format = format.unwrap_or(if terminal {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(terminal);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn parse_database_url(value: &str) -> Result<String, String> {
    if minimesh_runtime::pg::is_postgres_url(value) {
        Ok(value.to_owned())
    } else {
        Err("expected a postgres:// or postgresql:// URL".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_parse_and_reject_nonsense() {
        let r = parse_replicas("payment=3, order=2").unwrap();
        assert_eq!((r.of("payment"), r.of("order"), r.of("user")), (3, 2, 1));
        assert!(parse_replicas("").unwrap().0.is_empty());
        for bad in [
            "payment",
            "payment=x",
            "shipping=2",
            "payment=0",
            "payment=99",
        ] {
            assert!(parse_replicas(bad).is_err(), "{bad}");
        }
    }
}
