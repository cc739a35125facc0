//! Helpers that more than one test file needs, so each exists once: free
//! loopback ports and readiness waits, a throwaway mesh CA, mTLS clients,
//! admin HTTP and Prometheus text, and (feature `sidecar`) proxies run
//! in-process. Waits poll for readiness (a port accepting, an answer); none
//! sleeps a fixed time in place of a condition.

#![forbid(unsafe_code)]

pub mod ca;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod net;
#[cfg(feature = "sidecar")]
pub mod sidecar;
pub mod tls;
pub mod wait;

pub use ca::TestCa;
pub use http::{http_get, metrics_text};
pub use net::{free_addr, loopback_listener, wait_listening};
pub use wait::eventually;
