//! The minimesh proxy: the sidecar beside every service and the gateway at
//! the edge, built from small parts that are each tested alone:
//!
//! - [`tls`]: mesh mTLS configurations, SPIFFE identity checks, reloading;
//! - [`authz`]: the allow-list of caller identities;
//! - [`route`]: gRPC service name → upstream;
//! - [`client`]: one HTTP/2 connection per endpoint;
//! - [`upstream`]: discovery, balancing, ejection, retries and deadlines for
//!   one upstream (policy from `minimesh-traffic`);
//! - [`body`]: streaming bodies and the proxy's own gRPC answers;
//! - [`metrics`], [`admin`]: Prometheus series and `/live`, `/ready`, `/metrics`;
//! - [`server`]: the listeners that compose all of the above.

pub mod admin;
pub mod authz;
pub mod body;
pub mod client;
pub mod config;
pub mod identity;
pub mod listener;
pub mod metrics;
pub mod route;
pub mod server;
pub mod strict;
pub mod tls;
pub mod upstream;

/// HTTP/2 flow-control windows for every connection the proxy serves or
/// opens. Fixed rather than adaptive: a proxy buffers up to a window per
/// stream, so the window bounds its memory (see BENCHMARKS.md).
pub mod window {
    pub const STREAM: u32 = 256 * 1024;
    pub const CONNECTION: u32 = 1024 * 1024;
}

pub use server::{GatewayArgs, SidecarArgs, SidecarError, run_gateway, run_sidecar};
