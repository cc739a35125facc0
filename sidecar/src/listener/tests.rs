//! Tests of the parent module, kept apart so the module reads as one job.
use super::*;

#[tokio::test(start_paused = true)]
async fn a_connection_without_a_call_expires_after_the_first_call_timeout() {
    let limits = Limits {
        first_call_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(300),
        max_connections: 1,
        ..Limits::default()
    };
    let activity = Activity::new();
    let started = Instant::now();
    activity.expired(limits).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn calls_in_flight_keep_it_open_and_idleness_counts_from_the_last_end() {
    let limits = Limits {
        first_call_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(60),
        max_connections: 1,
        ..Limits::default()
    };
    let activity = Activity::new();
    let call = activity.call();
    let expired = tokio::time::timeout(Duration::from_secs(120), activity.expired(limits)).await;
    assert!(expired.is_err(), "a call in flight keeps the connection");
    drop(call);
    let ended = Instant::now();
    activity.expired(limits).await;
    let idle = ended.elapsed();
    assert!(
        idle >= Duration::from_secs(60) && idle < Duration::from_secs(61),
        "{idle:?}"
    );
}
