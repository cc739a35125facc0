//! The small runtime every minimesh service shares.

pub mod db;
pub mod exposition;
pub mod grpc;
pub mod health;
pub mod listen;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod page;
pub mod pg;
mod pg_tls;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod trace;

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
