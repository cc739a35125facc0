//! WatchOrder and TrackOrders: server streams fed by the change feed.

use crate::store::{EventRecord, status};
use crate::{Orders, event_to_proto};
use minimesh_proto::order::v1::{OrderEvent, TrackRequest, track_request};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::{Stream, StreamExt};
use tonic::{Status, Streaming};

pub(crate) type EventStream =
    Pin<Box<dyn Stream<Item = Result<OrderEvent, Status>> + Send + 'static>>;

/// Events queued per stream before the stream's task waits for the client.
const STREAM_BUFFER: usize = 16;
/// Most events re-read at once after a watcher lagged.
const RESYNC_LIMIT: u32 = 10_000;
/// Most orders one TrackOrders stream may follow.
const MAX_TRACKED: usize = 10_000;

type Sender = mpsc::Sender<Result<OrderEvent, Status>>;

/// Sends the events of `order_id` after `last` from the table (after a lag).
async fn resync(orders: &Orders, order_id: &str, last: &mut i64, tx: &Sender) -> Result<bool, ()> {
    let events = orders
        .store
        .events_after(*last, Some(order_id.to_owned()), RESYNC_LIMIT)
        .await
        .map_err(|err| tracing::warn!(%err, "watch resync failed"))?;
    let mut terminal = false;
    for event in events {
        *last = event.seq;
        terminal = status::is_terminal(event.status);
        tx.send(Ok(event_to_proto(&event))).await.map_err(|_| ())?;
    }
    Ok(terminal)
}

pub(crate) async fn watch_one(orders: Arc<Orders>, id: String) -> Result<EventStream, Status> {
    // Subscribe before reading the current status, so no change falls between.
    let mut feed = orders.feed.subscribe();
    let current = orders
        .store
        .latest_event(id.clone())
        .await
        .map_err(|e| orders.store_status(e))?
        .ok_or_else(|| Status::not_found(format!("order {id} not found")))?;
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        let mut last = current.seq;
        if tx.send(Ok(event_to_proto(&current))).await.is_err()
            || status::is_terminal(current.status)
        {
            return;
        }
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                next = feed.recv() => match next {
                    Ok(event) => {
                        if event.order_id != id || event.seq <= last {
                            continue;
                        }
                        last = event.seq;
                        if tx.send(Ok(event_to_proto(&event))).await.is_err() || status::is_terminal(event.status) {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(skipped)) => {
                        tracing::debug!(skipped, order_id = %id, "watcher lagged; re-reading its events");
                        match resync(&orders, &id, &mut last, &tx).await {
                            Ok(false) => {}
                            Ok(true) | Err(()) => return,
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = tx.send(Err(Status::unavailable("order service is shutting down"))).await;
                        return;
                    }
                },
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// One bidirectional stream following many orders.
pub(crate) fn track(orders: Arc<Orders>, mut requests: Streaming<TrackRequest>) -> EventStream {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let mut feed = orders.feed.subscribe();
    tokio::spawn(async move {
        // order id -> last event seq sent
        let mut watched: HashMap<String, i64> = HashMap::new();
        let mut client_done = false;
        loop {
            if client_done && watched.is_empty() {
                return; // nothing left to follow and nothing more will be asked
            }
            tokio::select! {
                _ = tx.closed() => return,
                request = requests.next(), if !client_done => match request {
                    None => client_done = true,
                    Some(Err(status)) => {
                        tracing::debug!(code = ?status.code(), "track stream closed by client");
                        return;
                    }
                    Some(Ok(TrackRequest { action: Some(track_request::Action::Watch(id)) })) => {
                        if watched.contains_key(&id) {
                            continue;
                        }
                        if watched.len() >= MAX_TRACKED {
                            let _ = tx.send(Err(Status::resource_exhausted(format!("one stream may follow at most {MAX_TRACKED} orders")))).await;
                            return;
                        }
                        match orders.store.latest_event(id.clone()).await {
                            Ok(Some(current)) => {
                                if tx.send(Ok(event_to_proto(&current))).await.is_err() {
                                    return;
                                }
                                if !status::is_terminal(current.status) {
                                    watched.insert(id, current.seq);
                                }
                            }
                            Ok(None) => {
                                let _ = tx.send(Err(Status::not_found(format!("order {id} not found")))).await;
                                return;
                            }
                            Err(err) => {
                                let _ = tx.send(Err(orders.store_status(err))).await;
                                return;
                            }
                        }
                    }
                    Some(Ok(TrackRequest { action: Some(track_request::Action::Unwatch(id)) })) => {
                        watched.remove(&id);
                    }
                    Some(Ok(TrackRequest { action: None })) => {
                        let _ = tx.send(Err(Status::invalid_argument("TrackRequest needs watch or unwatch"))).await;
                        return;
                    }
                },
                next = feed.recv() => match next {
                    Ok(event) => {
                        if forward(&mut watched, &event, &tx).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let ids: Vec<String> = watched.keys().cloned().collect();
                        for id in ids {
                            let Some(last) = watched.get_mut(&id) else { continue };
                            match resync(&orders, &id, last, &tx).await {
                                Ok(false) => {}
                                Ok(true) => { watched.remove(&id); }
                                Err(()) => return,
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = tx.send(Err(Status::unavailable("order service is shutting down"))).await;
                        return;
                    }
                },
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

async fn forward(
    watched: &mut HashMap<String, i64>,
    event: &EventRecord,
    tx: &Sender,
) -> Result<(), ()> {
    let Some(last) = watched.get_mut(&event.order_id) else {
        return Ok(());
    };
    if event.seq <= *last {
        return Ok(());
    }
    *last = event.seq;
    tx.send(Ok(event_to_proto(event))).await.map_err(|_| ())?;
    if status::is_terminal(event.status) {
        watched.remove(&event.order_id);
    }
    Ok(())
}
