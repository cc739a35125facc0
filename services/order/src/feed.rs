//! The change feed: one task per process tails `order_events` and fans every
//! new row out to the watchers of this process.
//!
//! Tailing the table, rather than broadcasting in-process writes, is what lets
//! a watcher on one replica see changes another replica made. Local writes
//! nudge the tailer so their events go out without waiting for the next poll;
//! on PostgreSQL, so do other replicas' commits, through LISTEN/NOTIFY.
//! The broadcast channel is bounded: a watcher that falls behind is told it
//! lagged and re-reads its orders' events from the table, so a slow watcher
//! never blocks the writer or other watchers.

use crate::store::{EventRecord, OrderStore};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, broadcast};

/// Events buffered per process before slow watchers start lagging.
const FEED_CAPACITY: usize = 1024;
/// Rows read from the table per poll.
const BATCH: u32 = 500;

/// The change feed: one task tails `order_events` and fans each new event out to watchers.
#[derive(Clone)]
pub struct Feed {
    sender: broadcast::Sender<Arc<EventRecord>>,
    nudge: Arc<Notify>,
}

impl Feed {
    /// Starts tailing from the current end of the log, polling every `poll`.
    pub async fn start(
        store: OrderStore,
        poll: Duration,
    ) -> Result<Self, crate::store::StoreError> {
        let (sender, _) = broadcast::channel(FEED_CAPACITY);
        let nudge = Arc::new(Notify::new());
        let mut tailer = Tailer {
            last: store.last_seq().await?,
            store,
            sender: sender.clone(),
        };
        let feed = Self {
            sender,
            nudge: nudge.clone(),
        };
        // PostgreSQL: other replicas' commits wake the tailer at once.
        let notifications = tailer.store.listen(nudge.clone())?;
        tokio::spawn(async move {
            let _notifications = notifications;
            loop {
                tokio::select! {
                    _ = nudge.notified() => {}
                    _ = tokio::time::sleep(poll) => {}
                }
                tailer.pass(async {}).await;
            }
        });
        Ok(feed)
    }

    /// A receiver of every event committed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EventRecord>> {
        self.sender.subscribe()
    }

    /// Wakes the tailer after a local write.
    pub fn nudge(&self) {
        self.nudge.notify_one();
    }
}

/// The tailing task's state: the seq of the last event sent (or skipped).
struct Tailer {
    store: OrderStore,
    sender: broadcast::Sender<Arc<EventRecord>>,
    last: i64,
}

impl Tailer {
    /// One pass: sends every event after `last`, or, while nobody listens,
    /// moves `last` to the end of the log without reading the events.
    ///
    /// Why skipping cannot lose an event a watcher needs: the end of the log
    /// is read *before* the tailer checks for receivers. A watcher subscribes
    /// before it reads its order's current status (`watch_one`). If the
    /// tailer saw no receiver, the watcher subscribed after the end was read,
    /// so its status read sees every event up to that end, and every later
    /// event is sent to it by a later pass (which starts from that end). If
    /// the tailer saw a receiver, nothing is skipped. Checking first and
    /// reading the end afterwards (as before) lost the events committed
    /// between a watcher's status read and the end read, and a watcher
    /// waiting for a terminal event then hung. `between` runs between the two
    /// steps, for the test that pins this order down.
    async fn pass(&mut self, between: impl std::future::Future<Output = ()>) {
        let end = match self.store.last_seq().await {
            Ok(end) => end,
            Err(err) => {
                tracing::warn!(%err, "change feed: cannot read position");
                return;
            }
        };
        between.await;
        if self.sender.receiver_count() == 0 && self.sender.is_empty() {
            // Nobody listens: skip the read but keep our position current.
            self.last = self.last.max(end);
            return;
        }
        loop {
            match self.store.events_after(self.last, None, BATCH).await {
                Ok(events) => {
                    let full = events.len() == BATCH as usize;
                    for event in events {
                        self.last = event.seq;
                        // No receivers is fine: nobody is watching right now.
                        let _ = self.sender.send(Arc::new(event));
                    }
                    if !full {
                        break;
                    }
                }
                Err(err) => {
                    tracing::warn!(%err, "change feed: cannot read events");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Created, ItemRecord, NewOrder, Transition, status};

    /// Issue 14, point 6: a first watcher subscribing while the tailer is
    /// idle must still get an event committed right after its status read.
    #[tokio::test]
    async fn first_watcher_misses_nothing_while_the_tailer_skips() {
        let store = OrderStore::in_memory().unwrap();
        let new = NewOrder {
            user_id: "usr".into(),
            items: vec![ItemRecord {
                sku: "a".into(),
                quantity: 1,
                unit_price_cents: 5,
            }],
            total_cents: 5,
            currency: "EUR".into(),
            idempotency_key: None,
            request_hash: "h".into(),
            legacy_hash: None,
        };
        let Created::New(order) = store.create_pending(new, 0).await.unwrap() else {
            panic!("new order");
        };
        let (sender, _) = broadcast::channel(16);
        let mut tailer = Tailer {
            store: store.clone(),
            sender: sender.clone(),
            last: store.last_seq().await.unwrap(),
        };
        // The worst moment: between the tailer's two steps, a watcher
        // subscribes and reads the current status, then the order is
        // cancelled (a terminal event the watcher waits for).
        let mut receiver = None;
        let id = order.id.clone();
        tailer
            .pass(async {
                receiver = Some(sender.subscribe());
                let current = store.latest_event(id.clone()).await.unwrap().unwrap();
                assert_eq!(current.status, status::PENDING);
                let cancel = Transition {
                    from: status::PENDING,
                    to: status::CANCELLED,
                    reason: String::new(),
                    payment_id: None,
                    next_step_at_ms: None,
                    refund_pending: false,
                    retry_at_ms: None,
                };
                store.transition(id.clone(), cancel).await.unwrap();
            })
            .await;
        tailer.pass(async {}).await;
        let mut receiver = receiver.unwrap();
        let event = receiver.try_recv().expect("the cancel reaches the watcher");
        assert_eq!(
            (event.order_id.as_str(), event.status),
            (order.id.as_str(), status::CANCELLED)
        );
    }
}
