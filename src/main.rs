//! `minimesh`: the one binary. `up` runs the whole mesh locally by starting
//! copies of this binary with the component subcommands.

mod up;

use anyhow::Context;
use clap::{Parser, Subcommand};
use minimesh_runtime::{logging, shutdown};
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
    /// Run one service.
    #[command(subcommand)]
    Service(ServiceCommand),
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the Tokio runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Service(service) => run_service(service).await,
        }
    })
}

async fn run_service(command: ServiceCommand) -> anyhow::Result<()> {
    logging::init("info");
    if std::env::var_os(up::SUPERVISED_ENV).is_some() {
        shutdown::die_with_parent();
    }
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
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {service} listener to {addr}"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    tracing::info!(service, addr = %local, version = VERSION, "listening");
    Ok(listener)
}
