//! Whether a service's store can serve: calls that hit a storage fault say
//! so at once, and a probe confirms when it is back. gRPC health follows it,
//! so the sidecar's `/ready` takes the replica out while its store is down.

use crate::db::DbError;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// Probe period while the store is serving.
const PROBE_UP: Duration = Duration::from_secs(1);
/// Probe period while it is down: recovery should show within a second.
const PROBE_DOWN: Duration = Duration::from_millis(250);

/// Whether the store is up, shared by every request and the health service.
#[derive(Clone)]
pub struct StoreHealth {
    /// `Some(reason)` while the store is down.
    state: Arc<watch::Sender<Option<String>>>,
    wake: Arc<Notify>,
}

impl Default for StoreHealth {
    fn default() -> Self {
        Self::new()
    }
}

impl StoreHealth {
    /// A store taken to be up until a failure says otherwise.
    pub fn new() -> Self {
        Self {
            state: Arc::new(watch::channel(None).0),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Marks the store down when `err` says it is, and wakes the probe.
    pub fn report(&self, err: &DbError) {
        if err.is_store_down() {
            let reason = err.to_string();
            self.state.send_if_modified(|state| {
                if state.is_none() {
                    tracing::warn!(%reason, "store is down");
                    *state = Some(reason);
                    true
                } else {
                    false
                }
            });
            self.wake.notify_one();
        }
    }

    fn set_up(&self) {
        self.state.send_if_modified(|state| {
            if state.take().is_some() {
                tracing::info!("store is back");
                true
            } else {
                false
            }
        });
    }

    /// The reason the store is down, if it is.
    pub fn down_reason(&self) -> Option<String> {
        self.state.borrow().clone()
    }

    /// Changes of the down reason (`None` when up), for the health service.
    pub fn subscribe(&self) -> watch::Receiver<Option<String>> {
        self.state.subscribe()
    }

    /// Probes the store until the returned handle is dropped: every second
    /// while it serves, four times a second while it is down.
    pub fn start_probing<P, F>(&self, probe: P) -> ProbeHandle
    where
        P: Fn() -> F + Send + 'static,
        F: Future<Output = Result<(), DbError>> + Send,
    {
        let health = self.clone();
        let task = tokio::spawn(async move {
            loop {
                let period = if health.down_reason().is_some() {
                    PROBE_DOWN
                } else {
                    PROBE_UP
                };
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = health.wake.notified() => {
                        // A call just failed: give the store a moment before probing.
                        tokio::time::sleep(PROBE_DOWN).await;
                    }
                }
                match tokio::time::timeout(Duration::from_secs(5), probe()).await {
                    Ok(Ok(())) => health.set_up(),
                    Ok(Err(err)) if err.is_store_down() => health.report(&err),
                    Ok(Err(err)) => tracing::warn!(%err, "store probe failed"),
                    Err(_) => {
                        health.report(&DbError::Down("store probe timed out after 5s".into()))
                    }
                }
            }
        });
        ProbeHandle { task }
    }
}

/// Stops the probe when dropped.
pub struct ProbeHandle {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ProbeHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn a_fault_marks_down_until_the_probe_succeeds() {
        let health = StoreHealth::new();
        let broken = Arc::new(AtomicBool::new(true));
        let probe_broken = broken.clone();
        let _probe = health.start_probing(move || {
            let broken = probe_broken.load(Ordering::SeqCst);
            async move {
                if broken {
                    Err(DbError::Down("disk on fire".into()))
                } else {
                    Ok(())
                }
            }
        });
        let mut changes = health.subscribe();
        health.report(&DbError::Down("disk on fire".into()));
        assert!(health.down_reason().unwrap().contains("disk on fire"));
        // Not a storage fault: does not change anything.
        health.report(&DbError::Task("x".into()));
        broken.store(false, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(5), changes.wait_for(|s| s.is_none()))
            .await
            .expect("the probe brings it back")
            .unwrap();
    }
}
