//! `minimesh-proxy`: the sidecar and the gateway alone, the same flags as
//! `minimesh sidecar` and `minimesh gateway`. A binary of its own because a
//! proxy runs beside every service instance: linking only the proxy keeps
//! its code pages, which count in every proxy's resident memory, at 4.4 MiB
//! instead of the whole CLI's 8.0 (BENCHMARKS.md, "Memory").

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use minimesh_sidecar::process::ProxyArgs;
use minimesh_sidecar::{GatewayArgs, SidecarArgs};
use minimesh_telemetry::process;

const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("MINIMESH_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(name = "minimesh-proxy", version = VERSION, about = "The minimesh proxy: a sidecar or the gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The sidecar proxy beside one service instance.
    Sidecar(ProxyArgs<SidecarArgs>),
    /// The edge proxy: callers outside the mesh in, mTLS into the mesh.
    Gateway(ProxyArgs<GatewayArgs>),
}

fn main() -> std::process::ExitCode {
    // Before any thread exists: this reads and clears LISTEN_FDS.
    minimesh_telemetry::listen::adopt_inherited();
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Sidecar(args) => args.runtime_threads(),
        Command::Gateway(args) => args.runtime_threads(),
    };
    let result = process::runtime(threads)
        .map_err(|err| format!("starting the Tokio runtime: {err}").into())
        .and_then(|runtime| {
            runtime
                .block_on(async move {
                    match cli.command {
                        Command::Sidecar(args) => {
                            minimesh_sidecar::process::run_sidecar(args, VERSION).await
                        }
                        Command::Gateway(args) => {
                            minimesh_sidecar::process::run_gateway(args, VERSION).await
                        }
                    }
                })
                .map_err(Into::into)
        });
    process::exit_code(result)
}
