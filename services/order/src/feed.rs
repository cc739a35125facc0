//! The change feed: one task per process tails `order_events` and fans every
//! new row out to the watchers of this process.
//!
//! Tailing the table, rather than broadcasting in-process writes, is what lets
//! a watcher on one replica see changes another replica made. Local writes
//! nudge the tailer so their events go out without waiting for the next poll.
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
        let mut last = store.last_seq().await?;
        let feed = Self {
            sender: sender.clone(),
            nudge: nudge.clone(),
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = nudge.notified() => {}
                    _ = tokio::time::sleep(poll) => {}
                }
                if sender.receiver_count() == 0 && sender.is_empty() {
                    // Nobody listens: skip the read but keep our position current.
                    match store.last_seq().await {
                        Ok(seq) => last = seq,
                        Err(err) => tracing::warn!(%err, "change feed: cannot read position"),
                    }
                    continue;
                }
                loop {
                    match store.events_after(last, None, BATCH).await {
                        Ok(events) => {
                            let full = events.len() == BATCH as usize;
                            for event in events {
                                last = event.seq;
                                // No receivers is fine: nobody is watching right now.
                                let _ = sender.send(Arc::new(event));
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
        });
        Ok(feed)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EventRecord>> {
        self.sender.subscribe()
    }

    /// Wakes the tailer after a local write.
    pub fn nudge(&self) {
        self.nudge.notify_one();
    }
}
