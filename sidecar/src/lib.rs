//! The minimesh proxy: the sidecar beside every service and the gateway at
//! the edge, built from small parts that are each tested alone:
//!
//! - [`tls`]: mesh mTLS configurations, SPIFFE identity checks, reloading;
//! - [`authz`]: the allow-list of caller identities;
//! - [`route`]: `:authority` or a configured path prefix → upstream (no protos);
//! - [`client`]: one HTTP/2 connection per endpoint;
//! - [`upstream`]: discovery, balancing, ejection, retries and deadlines for
//!   one upstream (policy from `minimesh-traffic`, including its `replay`
//!   body: a request kept up to a cap so a call can be sent again);
//! - [`body`]: streaming bodies and the proxy's own gRPC answers;
//! - [`metrics`]: Prometheus series, served with `/live` and `/ready` by
//!   the admin server every process shares (`minimesh_telemetry::admin`);
//! - [`listener`]: the one accept loop, its limits, and HTTP/2 serving;
//! - `stall`: responses whose reader stopped taking data, cancelled;
//! - [`handle`]: what the inbound, outbound and gateway listeners do with a call;
//! - [`args`], [`config`], [`resolve`], [`dump`]: flags and file, resolved
//!   and printed back (`--check-config`);
//! - `app_health`: whether the local application can take calls (`/ready`);
//! - [`server`]: start-up, composing all of the above;
//! - [`process`]: the proxy as a process (telemetry, runtime threads), as
//!   `minimesh sidecar` and the proxy-only `minimesh-proxy` both run it.

#![forbid(unsafe_code)]

mod app_health;
pub mod args;
pub mod authz;
pub mod body;
pub mod client;
pub mod config;
mod dump;
pub mod edge;
mod handle;
pub mod identity;
pub mod listener;
pub mod metrics;
pub mod process;
mod resolve;
pub mod route;
pub mod server;
mod stall;
pub mod strict;
pub mod tls;
pub mod upstream;

/// HTTP/2 flow control for every connection the proxy serves or opens.
///
/// Fixed rather than adaptive: a proxy buffers at most a stream window per
/// stream whose reader is slower than its writer, so the stream window bounds
/// its memory (see BENCHMARKS.md). The connection window covers every stream
/// the connection may carry at once, as Envoy sizes it: a few stalled readers
/// then hold only their own streams' windows, never the whole connection's,
/// so they cannot starve the other calls multiplexed on it (a connection of
/// 1 MiB froze every call after four stalled 256 KiB streams). Streams get
/// HTTP/2's default 64 KiB, Envoy's edge setting: with 256 KiB, 64 busy bidi
/// streams of 100 B messages took a sidecar from 15 to 60 MiB (small frames
/// cost more memory than their bytes). Both are flags (`--stream-window`,
/// `--connection-window`): larger stream windows stream with less CPU, a
/// smaller connection window bounds memory, each at the price BENCHMARKS.md
/// measures.
pub mod window {
    /// Per-stream window: what one stalled stream can hold buffered.
    pub const STREAM: u32 = 64 * 1024;
    /// Concurrent streams per connection, in both directions.
    pub const MAX_STREAMS: u32 = 256;
    /// 16 MiB: the most one connection can ever hold buffered.
    pub const CONNECTION: u32 = STREAM * MAX_STREAMS;
    /// HTTP/2's largest window (RFC 9113 §6.9.1).
    pub const LARGEST: u32 = (1 << 31) - 1;
    /// HTTP/2's initial window, the smallest the proxy accepts.
    pub const SMALLEST: u32 = 65_535;

    /// The windows of one proxy's connections, served and opened alike.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Windows {
        /// Initial window of every stream.
        pub stream: u32,
        /// Window of the connection as a whole.
        pub connection: u32,
    }

    impl Default for Windows {
        fn default() -> Self {
            Self {
                stream: STREAM,
                connection: CONNECTION,
            }
        }
    }

    impl Windows {
        /// Stalled streams that fill the connection window, starving every
        /// other call on it until the stall watch cancels them; None when
        /// even [`MAX_STREAMS`] stalled streams leave room.
        pub fn stalls_to_starve(&self) -> Option<u32> {
            let fit = self.connection / self.stream.max(1);
            (fit < MAX_STREAMS).then_some(fit.max(1))
        }
    }
}

pub use server::{GatewayArgs, SidecarArgs, SidecarError, run_gateway, run_sidecar};
