//! The service kit: what the shop's services share beyond telemetry (storage
//! on SQLite or PostgreSQL, store health, the gRPC server scaffold, paging).

#![forbid(unsafe_code)]

pub use minimesh_telemetry::{exposition, listen, logging, memory, shutdown, telemetry, trace};

pub mod db;
pub mod grpc;
pub mod health;
pub mod limit;
pub mod metrics;
pub mod page;
pub mod pg;
mod pg_tls;
pub mod store;

use std::time::{SystemTime, UNIX_EPOCH};

/// A new opaque, time-ordered identifier such as `usr_0192f3…`.
///
/// UUIDv7 sorts by creation time, which keyset pagination relies on.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// Milliseconds since the Unix epoch, the unit every table stores times in.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An ISO 4217 code: three upper-case ASCII letters.
pub fn is_currency_code(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}
