//! Waiting for a condition a test checks by polling.

use std::time::Duration;

/// Polls `check` until it returns `Some`, and returns that value.
///
/// # Panics
/// After `within` without one: this is a test assertion, named by `what`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(crate::net::POLL).await;
    }
}
