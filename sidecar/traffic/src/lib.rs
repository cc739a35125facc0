//! Traffic policy of the minimesh proxy, one concern per module, each
//! testable without sockets:
//!
//! - [`discover`]: endpoint sets from a static list or DNS names re-resolved
//!   on an interval, as add/remove changes.
//! - [`balance`]: power of two choices over peak-EWMA latency, skipping
//!   ejected endpoints and the ones a retry must avoid.
//! - [`eject`]: consecutive-failure ejection with a growing, jittered back-off
//!   and a single probe to come back.
//! - [`endpoint`]: one endpoint's books (health, latency, attempts waiting),
//!   attempts as guards that record however they end, and the choice of
//!   endpoint per attempt (probes first, then P2C).
//! - [`retry`]: which attempts may be retried, and the retry budget.
//! - [`deadline`]: `grpc-timeout` parsing, formatting and propagation.
//! - [`replay`]: a request body kept (up to a cap) while it is forwarded, so
//!   an attempt the peer never saw can be sent again.

#![forbid(unsafe_code)]

pub mod balance;
pub mod deadline;
pub mod discover;
pub mod eject;
pub mod endpoint;
pub mod replay;
pub mod retry;
