//! When a call may be sent again, and how often.
//!
//! Only calls that never reached the peer's application are retried: the
//! connection could not be made, the peer refused the stream before reading
//! it (HTTP/2 REFUSED_STREAM), or the peer's proxy answered UNAVAILABLE
//! without forwarding (it marks such answers with [`PROXY_ERROR_HEADER`]).
//! A request is sent again only from a complete copy (the proxy keeps one,
//! up to [`MAX_REPLAY_BYTES`], while a retry is possible), and never once the
//! response has started.

use http::HeaderMap;
use rand::Rng;
use std::time::Duration;
use tower::retry::budget::{Budget, TpsBudget};

/// Set by a minimesh proxy on an error it generated itself, so the caller's
/// proxy knows the application never saw the request.
pub const PROXY_ERROR_HEADER: &str = "minimesh-proxy-error";

/// Largest request body kept for replay (as Linkerd's proxy).
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

/// How an attempt failed before any response from the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection to the endpoint (refused, reset, TLS failure, timeout).
    Connect,
    /// The peer refused the HTTP/2 stream before processing it.
    RefusedStream,
    /// The peer's proxy could not deliver to its application.
    PeerUnavailable,
    /// The peer's proxy refused the call: its application has as many calls
    /// open as it allows. The endpoint is healthy, only full.
    PeerBusy,
}

/// Classifies a response's headers: a trailers-only UNAVAILABLE or
/// RESOURCE_EXHAUSTED that the peer's proxy generated means the application
/// never saw the call.
pub fn classify_response(headers: &HeaderMap) -> Option<Failure> {
    if !headers.contains_key(PROXY_ERROR_HEADER) {
        return None;
    }
    match headers.get("grpc-status")?.as_bytes() {
        b"14" => Some(Failure::PeerUnavailable),
        b"8" => Some(Failure::PeerBusy),
        _ => None,
    }
}

/// When retries may be made and how far apart.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included.
    pub max_attempts: u32,
    /// The first retry's back-off ceiling; it doubles per retry.
    pub backoff_base: Duration,
    /// The largest back-off ceiling.
    pub backoff_max: Duration,
    /// Retries allowed as a fraction of recent requests...
    pub budget_ratio: f32,
    /// ...plus this many per second regardless.
    pub budget_min_per_second: u32,
    /// Window the budget counts requests over.
    pub budget_window: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff_base: Duration::from_millis(5),
            backoff_max: Duration::from_millis(100),
            budget_ratio: 0.2,
            budget_min_per_second: 10,
            budget_window: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// Jittered exponential back-off before retry number `retry` (1-based):
    /// uniformly random up to base * 2^(retry-1), capped ("full jitter").
    pub fn backoff(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self
            .backoff_base
            .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
            .min(self.backoff_max);
        ceiling.mul_f64(rng.random_range(0.0..=1.0))
    }

    /// A fresh budget with this policy's ratio, floor and window.
    pub fn budget(&self) -> RetryBudget {
        RetryBudget(TpsBudget::new(
            self.budget_window,
            self.budget_min_per_second,
            self.budget_ratio,
        ))
    }
}

/// The retry budget of one upstream: every request deposits, every retry
/// withdraws, so retries stay a bounded share of traffic and a failing
/// upstream cannot set off a retry storm. Backed by tower's `TpsBudget`.
#[derive(Debug)]
pub struct RetryBudget(TpsBudget);

impl RetryBudget {
    /// Records a request, which earns a share of a retry.
    pub fn deposit(&self) {
        self.0.deposit();
    }

    /// True when a retry may be made now (and takes it from the budget).
    pub fn withdraw(&self) -> bool {
        self.0.withdraw()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn only_proxy_generated_unavailable_is_retryable() {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", HeaderValue::from_static("14"));
        assert_eq!(
            classify_response(&headers),
            None,
            "the application's own UNAVAILABLE may have had effects"
        );
        headers.insert(
            PROXY_ERROR_HEADER,
            HeaderValue::from_static("no route to app"),
        );
        assert_eq!(classify_response(&headers), Some(Failure::PeerUnavailable));
        headers.insert("grpc-status", HeaderValue::from_static("8"));
        assert_eq!(classify_response(&headers), Some(Failure::PeerBusy));
        headers.insert("grpc-status", HeaderValue::from_static("4"));
        assert_eq!(
            classify_response(&headers),
            None,
            "DEADLINE_EXCEEDED is never retried"
        );
    }

    #[test]
    fn budget_allows_the_floor_plus_a_share_of_requests() {
        let policy = RetryPolicy {
            budget_min_per_second: 2,
            budget_ratio: 0.2,
            ..RetryPolicy::default()
        };
        let budget = policy.budget();
        for _ in 0..100 {
            budget.deposit();
        }
        let mut granted = 0;
        while budget.withdraw() {
            granted += 1;
            assert!(granted < 1000, "budget must run out");
        }
        // 20% of 100 requests plus the per-second floor over the window.
        assert!((20..=20 + 2 * 10).contains(&granted), "granted {granted}");
        assert!(!budget.withdraw());
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let policy = RetryPolicy::default();
        let mut rng = StdRng::seed_from_u64(3);
        for retry in 1..10 {
            let ceiling = (policy.backoff_base * (1 << (retry - 1))).min(policy.backoff_max);
            for _ in 0..50 {
                assert!(policy.backoff(retry, &mut rng) <= ceiling);
            }
        }
    }
}
