//! Background work, on three independent tasks so a slow dependency can only
//! slow the work that needs it:
//!
//! - fulfilment moves paid orders one step every `step`; it only touches the
//!   database, so a hung payment service cannot delay it;
//! - settlement charges PENDING orders whose charge outcome was unknown;
//! - compensation refunds charges of cancelled orders (including charges
//!   that landed after the cancel).
//!
//! Settlement and compensation each run at most `CONCURRENCY` attempts at
//! once, every attempt under its own deadline. All state lives in the
//! database (`next_step_at_ms`, `retry_at_ms`, `refund_pending`), so progress
//! survives a restart, and every move is a compare-and-set or a claim, so
//! several replicas can run the workers on one database.

use crate::Orders;
use crate::store::{Schedule, Work, status};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

const BATCH: u32 = 200;
/// Attempts of settlement (and, separately, of compensation) in flight at once per process.
const CONCURRENCY: usize = 8;
/// How often settlement and compensation look for due work.
const POLL: Duration = Duration::from_millis(200);
/// First wait before an order whose attempt failed is tried again; doubles per attempt.
const BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub(crate) fn spawn(orders: Arc<Orders>, step: Duration) -> Vec<JoinHandle<()>> {
    vec![
        spawn_fulfilment(orders.clone(), step),
        spawn_owed(orders.clone(), Work::Settle),
        spawn_owed(orders, Work::Compensate),
    ]
}

fn spawn_fulfilment(orders: Arc<Orders>, step: Duration) -> JoinHandle<()> {
    // Poll a few times per step so orders advance close to their due time.
    let tick = (step / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let step_ms = crate::millis(step);
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            match orders
                .store
                .advance_due(minimesh_runtime::now_millis(), step_ms, BATCH)
                .await
            {
                Ok(moved) if moved.is_empty() => {}
                Ok(moved) => {
                    tracing::debug!(moved = moved.len(), "fulfilment advanced orders");
                    for status in moved {
                        orders.metrics.count(status::metric_name(status));
                    }
                    orders.feed.nudge();
                }
                Err(err) => tracing::warn!(%err, "fulfilment pass failed"),
            }
        }
    })
}

/// Runs owed `work` as it falls due: claims due orders (as many as there are
/// free slots) and works each on its own task under a deadline. A claim
/// pushes the order's due time past that deadline, so if this process dies
/// mid-attempt the order becomes due again for any replica.
fn spawn_owed(orders: Arc<Orders>, work: Work) -> JoinHandle<()> {
    // One attempt is at most two calls (a charge, then a refund).
    let deadline = orders.upstream_timeout * 2 + Duration::from_millis(500);
    let schedule = Schedule {
        lease_ms: crate::millis(deadline + Duration::from_secs(1)),
        backoff_ms: crate::millis(BACKOFF),
        max_backoff_ms: crate::millis(MAX_BACKOFF),
    };
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(CONCURRENCY));
        loop {
            match work {
                Work::Compensate => {
                    tokio::select! {
                        _ = orders.compensate_now.notified() => {}
                        _ = tokio::time::sleep(POLL) => {}
                    }
                }
                Work::Settle => tokio::time::sleep(POLL).await,
            }
            let free = slots.available_permits();
            if free == 0 {
                continue;
            }
            let now = minimesh_runtime::now_millis();
            let claimed = match orders
                .store
                .claim_due(work, now, schedule, free as u32)
                .await
            {
                Ok(claimed) => claimed,
                Err(err) => {
                    tracing::warn!(%err, ?work, "cannot claim owed work");
                    continue;
                }
            };
            for claimed in claimed {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let orders = orders.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let id = claimed.order.id.clone();
                    let attempts = claimed.attempts + 1;
                    let done = tokio::time::timeout(deadline, orders.work(work, claimed))
                        .await
                        .unwrap_or(false);
                    if !done {
                        // Try again after the back-off, not only once the lease runs out.
                        let at = minimesh_runtime::now_millis() + schedule.backoff_ms(attempts);
                        if let Err(err) = orders.store.reschedule(id.clone(), work, at).await {
                            tracing::warn!(%err, order_id = %id, "cannot reschedule owed work");
                        }
                        tracing::debug!(order_id = %id, ?work, attempts, "owed work not done yet");
                    }
                });
            }
        }
    })
}
