//! The fulfilment worker: moves paid orders one step every `step`, finishes
//! refunds that did not go through at cancel time, and settles orders left
//! PENDING by a charge that failed midway.
//!
//! All state lives in the database (`next_step_at_ms`, `refund_pending`), so
//! progress survives a restart, and every move is a compare-and-set, so
//! several replicas can run the worker on one database without an order
//! advancing twice.

use crate::Orders;
use crate::store::status;
use std::sync::Arc;
use std::time::Duration;

const BATCH: u32 = 200;

pub fn spawn(orders: Arc<Orders>, step: Duration) -> tokio::task::JoinHandle<()> {
    // Poll a few times per step so orders advance close to their due time.
    let tick = (step / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let step_ms = step.as_millis() as i64;
    let ticks_per_repair =
        (Duration::from_secs(1).as_millis() / tick.as_millis().max(1)).max(1) as u64;
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        loop {
            interval.tick().await;
            ticks += 1;
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
            // Repairs are rare; check for them about once a second.
            if ticks.is_multiple_of(ticks_per_repair) {
                orders.retry_refunds(BATCH).await;
                orders.settle_stale_pending(BATCH).await;
            }
        }
    })
}
