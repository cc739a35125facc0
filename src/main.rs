//! `minimesh`: the one binary. `up` runs the whole mesh locally by starting
//! copies of this binary with the component subcommands.

#![forbid(unsafe_code)]

mod observe;
mod reconcile;
mod up;

use anyhow::Context;
use clap::{Parser, Subcommand};
use minimesh_runtime::{shutdown, telemetry};
use minimesh_sidecar::process::ProxyArgs;
use minimesh_telemetry::process::TelemetryArgs;
use opentelemetry::KeyValue;
use tokio::net::TcpListener;

const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("MINIMESH_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(name = "minimesh", version = VERSION, about = "A minimal gRPC service mesh you can read end to end")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole mesh on this machine: every service, sidecar and the gateway as its own process.
    Up(up::UpArgs),
    /// Golden metrics of every edge of the mesh (caller → service), read from the proxies.
    Stat(observe::StatArgs),
    /// The same edges live in the terminal, refreshed every second, until q.
    Top(observe::TopArgs),
    /// Run one service.
    Service(ServiceArgs),
    /// The sidecar proxy beside one service instance.
    Sidecar(ProxyArgs<minimesh_sidecar::SidecarArgs>),
    /// The edge proxy: callers outside the mesh in, mTLS into the mesh.
    Gateway(ProxyArgs<minimesh_sidecar::GatewayArgs>),
    /// The identity issuer: short-lived workload certificates for proxies that prove who they are.
    Identity(IdentityCmd),
    /// Benchmarks: an echo backend, a load generator, and the side-by-side suite.
    #[cfg(feature = "bench")]
    Bench(minimesh_bench::BenchArgs),
    /// The mesh CA: create it, issue identities.
    #[command(subcommand)]
    Certs(minimesh_certs::CertsCommand),
    /// Check that order and payment records agree (no money without an order, no order without its money); exits 1 on any violation.
    Reconcile(reconcile::ReconcileArgs),
}

#[derive(clap::Args)]
struct IdentityCmd {
    #[command(flatten)]
    telemetry: TelemetryArgs,
    /// Plain HTTP listener for /live and /metrics.
    #[arg(long, env = "MINIMESH_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    #[command(flatten)]
    issuer: minimesh_identity::issuer::IssuerArgs,
}

#[derive(clap::Args)]
struct ServiceArgs {
    #[command(flatten)]
    telemetry: TelemetryArgs,
    #[command(subcommand)]
    service: ServiceCommand,
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Accounts: shop.user.v1.UserService.
    User(minimesh_user::UserConfig),
    /// Orders, fulfilment and status streams: shop.order.v1.OrderService.
    Order(minimesh_order::OrderConfig),
    /// Charges and refunds: shop.payment.v1.PaymentService.
    Payment(minimesh_payment::PaymentConfig),
}

fn main() -> std::process::ExitCode {
    // Before any thread exists: this reads and clears LISTEN_FDS.
    minimesh_runtime::listen::adopt_inherited();
    let cli = Cli::parse();
    minimesh_telemetry::process::exit_code(run(cli).map_err(Into::into))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let threads = match &cli.command {
        Command::Sidecar(args) => args.runtime_threads(),
        Command::Gateway(args) => args.runtime_threads(),
        _ => None,
    };
    let runtime =
        minimesh_telemetry::process::runtime(threads).context("starting the Tokio runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Stat(args) => observe::stat(args).await,
            Command::Top(args) => observe::top(args).await,
            Command::Service(service) => run_service(service).await,
            Command::Certs(command) => Ok(minimesh_certs::run(command)?),
            #[cfg(feature = "bench")]
            Command::Bench(args) => minimesh_bench::run(args).await,
            Command::Sidecar(args) => {
                Ok(minimesh_sidecar::process::run_sidecar(args, VERSION).await?)
            }
            Command::Identity(args) => run_identity(args).await,
            Command::Gateway(args) => {
                Ok(minimesh_sidecar::process::run_gateway(args, VERSION).await?)
            }
            Command::Reconcile(args) => {
                if !reconcile::run(args).await? {
                    std::process::exit(1);
                }
                Ok(())
            }
        }
    })
}

async fn run_identity(args: IdentityCmd) -> anyhow::Result<()> {
    let telemetry = telemetry::init(
        "minimesh-identity",
        args.telemetry.otlp_endpoint.as_deref(),
        vec![KeyValue::new("service.version", VERSION)],
        args.telemetry.log_format(),
    )?;
    minimesh_telemetry::process::follow_supervisor();
    let metrics = minimesh_runtime::metrics::ServiceMetrics::new(
        "minimesh_identity_certificates",
        "Certificate requests by outcome (issued, refused)",
    );
    for outcome in ["issued", "refused"] {
        let _ = metrics
            .outcomes
            .get_or_create(&minimesh_runtime::metrics::StatusLabel {
                status: outcome.to_owned(),
            });
    }
    let counted = metrics.clone();
    let issuer = std::sync::Arc::new(minimesh_identity::issuer::Issuer::new(
        &args.issuer,
        std::sync::Arc::new(move |outcome| counted.count(outcome)),
    )?);
    let listener = bind("identity", &args.issuer.listen).await?;
    // Listening before /live answers, so a probe of /live means ready.
    let _metrics =
        minimesh_runtime::metrics::listen(args.metrics_listen.as_deref(), metrics).await?;
    let result = minimesh_identity::issuer::serve(
        issuer,
        listener,
        &args.issuer.server_names,
        shutdown::signal(),
    )
    .await;
    telemetry.shutdown();
    Ok(result?)
}

async fn run_service(args: ServiceArgs) -> anyhow::Result<()> {
    let name = match &args.service {
        ServiceCommand::User(_) => "user",
        ServiceCommand::Order(_) => "order",
        ServiceCommand::Payment(_) => "payment",
    };
    let telemetry = telemetry::init(
        &format!("minimesh-{name}"),
        args.telemetry.otlp_endpoint.as_deref(),
        vec![
            KeyValue::new("minimesh.service", name),
            KeyValue::new("minimesh.replica", i64::from(args.telemetry.replica)),
            KeyValue::new("service.version", VERSION),
        ],
        args.telemetry.log_format(),
    )?;
    minimesh_telemetry::process::follow_supervisor();
    let result = serve_one(args.service).await;
    telemetry.shutdown();
    result
}

async fn serve_one(command: ServiceCommand) -> anyhow::Result<()> {
    match command {
        ServiceCommand::User(config) => {
            let listener = bind("user", &config.listen).await?;
            minimesh_user::serve(listener, config, shutdown::signal()).await?;
        }
        ServiceCommand::Order(config) => {
            let listener = bind("order", &config.listen).await?;
            minimesh_order::serve(listener, config, shutdown::signal()).await?;
        }
        ServiceCommand::Payment(config) => {
            let listener = bind("payment", &config.listen).await?;
            minimesh_payment::serve(listener, config, shutdown::signal()).await?;
        }
    }
    tracing::info!("stopped");
    Ok(())
}

async fn bind(service: &str, addr: &str) -> anyhow::Result<TcpListener> {
    let listener = minimesh_runtime::listen::bind(addr)
        .await
        .with_context(|| format!("binding the {service} listener to {addr}"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    tracing::info!(service, addr = %local, version = VERSION, "listening");
    Ok(listener)
}
