//! `minimesh bench`: a load generator in the spirit of ghz, an echo backend
//! to aim it at, the suite that compares the mesh with direct calls,
//! HAProxy and nginx, and a CreateOrder workload for a whole running mesh.

pub mod backend;
pub mod load;
pub mod orders;
pub mod orders_table;
pub mod procstat;
pub mod soak;
pub mod suite;

use std::path::PathBuf;
use std::time::Duration;

/// `minimesh bench`: one of the benchmark tools.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Which tool to run.
    #[command(subcommand)]
    pub command: BenchCommand,
}

/// The benchmark tools.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Serve the echo backend the benchmarks call.
    Backend {
        /// Address to serve on (port 0 picks a free one, printed).
        #[arg(long, env = "MINIMESH_LISTEN", default_value = "127.0.0.1:0")]
        listen: String,
    },
    /// Load one target and report.
    Load(LoadArgs),
    /// CreateOrder through a running mesh (e.g. its gateway): real orders, one user per worker.
    Orders(orders::OrdersArgs),
    /// Fold `orders --json` files into one table with ratios (orders.json, orders.md).
    OrdersTable(orders_table::OrdersTableArgs),
    /// Run every scenario side by side and write results.json and results.md.
    Suite(suite::SuiteArgs),
    /// Mixed traffic through a running mesh for minutes, replicas killed with SIGKILL, every
    /// proxy's RSS and descriptors sampled (bench/soak.sh).
    Soak(soak::SoakArgs),
}

/// `minimesh bench load`: one workload against one target.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Target, e.g. http://127.0.0.1:50051.
    #[arg(long)]
    pub target: String,
    /// Unary, server-streaming or bidirectional calls.
    #[arg(long, value_enum, default_value = "unary")]
    pub call: load::Call,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Concurrent calls or streams.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Connections to spread them over.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Open loop: calls per second on a fixed schedule (unary only).
    #[arg(long)]
    pub rate: Option<f64>,
    /// How long to run (default 10s; with --count, no limit but an hour).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this many calls (unary) or messages received (streams).
    #[arg(long)]
    pub count: Option<u64>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Runs the chosen tool to the end, printing (or writing) its report.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Backend { listen } => {
            let listener = tokio::net::TcpListener::bind(&listen).await?;
            eprintln!("echo backend listening on {}", listener.local_addr()?);
            backend::serve(listener).await?;
            Ok(())
        }
        BenchCommand::Load(args) => {
            let workload = load::Workload {
                call: args.call,
                payload: args.payload,
                concurrency: args.concurrency,
                connections: args.connections,
                rate: args.rate,
                duration: args.duration.unwrap_or(if args.count.is_some() {
                    Duration::from_secs(3600)
                } else {
                    Duration::from_secs(10)
                }),
                count: args.count,
            };
            let report = load::run(&args.target, &workload).await?;
            let json = serde_json::to_string_pretty(
                &serde_json::json!({"workload": workload, "report": report}),
            )?;
            if let Some(path) = args.json {
                std::fs::write(path, &json)?;
            }
            println!("{json}");
            Ok(())
        }
        BenchCommand::Orders(args) => orders::command(args).await,
        BenchCommand::OrdersTable(args) => orders_table::command(args),
        BenchCommand::Soak(args) => soak::command(args).await,
        BenchCommand::Suite(args) => {
            // Returning (rather than dying) on a signal drops the suite's
            // processes and scratch directory, which cleans them up.
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                result = suite::run(args) => result,
                _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
                _ = terminate.recv() => anyhow::bail!("terminated"),
            }
        }
    }
}
