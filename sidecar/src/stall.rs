//! Responses whose reader stopped taking data. Per-stream windows keep a
//! stalled reader from freezing other streams, but its own streams would
//! stay open for as long as it keeps the connection: each holds up to a
//! window of buffered data here and, at a sidecar, one of the local
//! service's `--max-app-streams` slots. A response that has data the reader
//! has not taken for `--stall-timeout` is cancelled: its source (the local
//! service, or the upstream) gets RST_STREAM CANCEL and its buffers are
//! freed. A response that is idle because its source has nothing to send
//! (a quiet WatchOrder) is not stalled and is left alone.
//!
//! hyper polls a response body only when the stream has send window, so a
//! stalled body is never polled and cannot notice its own stall: a sweeper
//! task per proxy checks every watched body instead.

use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use slab::Slab;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

trait Expire: Send + Sync {
    /// One sweep: cancels the response if its reader has been holding the
    /// same data for `stale_sweeps` sweeps in a row; None once finished.
    fn expire(&self, stale_sweeps: u32) -> Option<bool>;
}

struct Watched<B> {
    /// The response being sent; taken (and dropped) on a stall.
    inner: Mutex<Option<B>>,
    /// Data frames handed to the reader, shifted left one; the low bit is
    /// set while the reader holds the last one without asking for more.
    /// Counting rather than timestamping keeps clock reads off the path of
    /// every frame; the sweeper measures time in sweeps.
    progress: AtomicU64,
    /// `progress` as the last sweep saw it, and for how many sweeps it stood.
    seen: AtomicU64,
    stale: AtomicU32,
}

impl<B: Send> Expire for Watched<B> {
    fn expire(&self, stale_sweeps: u32) -> Option<bool> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.as_ref()?;
        let now = self.progress.load(Ordering::Relaxed);
        let waiting = now & 1 == 1;
        if waiting && self.seen.swap(now, Ordering::Relaxed) == now {
            if self.stale.fetch_add(1, Ordering::Relaxed) + 1 >= stale_sweeps {
                // Dropping the body resets its source's stream and frees its buffers.
                *inner = None;
                return Some(true);
            }
        } else {
            self.stale.store(0, Ordering::Relaxed);
        }
        Some(false)
    }
}

/// The watch over one proxy's responses.
#[derive(Clone)]
pub(crate) struct StallWatch {
    state: Arc<WatchState>,
}

struct WatchState {
    timeout: Duration,
    /// Sweeps a reader may hold the same data before it counts as stalled.
    stale_sweeps: u32,
    /// Open responses; each leaves when it is dropped (a list swept once a
    /// second kept every call of that second: +5 MiB at 20k calls/s).
    watched: Mutex<Slab<Weak<dyn Expire>>>,
    cancelled: Counter,
}

impl StallWatch {
    /// A watch cancelling responses stalled for `timeout` (zero: never);
    /// spawns its sweeper, which ends when the last clone is dropped.
    pub(crate) fn start(timeout: Duration, cancelled: Counter) -> Self {
        let every = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let stale_sweeps = timeout.as_millis().div_ceil(every.as_millis().max(1)) as u32;
        let state = Arc::new(WatchState {
            timeout,
            stale_sweeps: stale_sweeps.max(1),
            watched: Mutex::new(Slab::new()),
            cancelled,
        });
        if !timeout.is_zero() {
            let weak = Arc::downgrade(&state);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(state) = weak.upgrade() else { return };
                    state.sweep();
                }
            });
        }
        Self { state }
    }

    /// `body`, cancelled if its reader stalls.
    pub(crate) fn watch<B>(&self, body: B) -> Stallable<B>
    where
        B: Body + Send + 'static,
    {
        let watched = Arc::new(Watched {
            inner: Mutex::new(Some(body)),
            progress: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            stale: AtomicU32::new(0),
        });
        let key = (!self.state.timeout.is_zero()).then(|| {
            let weak: Weak<dyn Expire> = Arc::downgrade(&watched) as Weak<dyn Expire>;
            self.state
                .watched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(weak)
        });
        Stallable {
            watched,
            timeout: self.state.timeout,
            registered: key.map(|key| (key, self.state.clone())),
        }
    }
}

impl WatchState {
    fn sweep(&self) {
        let mut cancelled = 0;
        // Cancelled ones stay until their body is dropped, which removes them.
        for (_, weak) in self
            .watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            if weak.upgrade().and_then(|w| w.expire(self.stale_sweeps)) == Some(true) {
                cancelled += 1;
            }
        }
        if cancelled > 0 {
            self.cancelled.inc_by(cancelled);
            tracing::info!(
                streams = cancelled,
                timeout_ms = self.timeout.as_millis() as u64,
                "cancelled responses whose reader took no data"
            );
        }
    }
}

/// A response body under a [`StallWatch`].
pub(crate) struct Stallable<B> {
    watched: Arc<Watched<B>>,
    timeout: Duration,
    /// Its place in the watch, given back on drop.
    registered: Option<(usize, Arc<WatchState>)>,
}

impl<B> Drop for Stallable<B> {
    fn drop(&mut self) {
        if let Some((key, state)) = self.registered.take() {
            state
                .watched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .try_remove(key);
        }
    }
}

/// Why a stalled response ended.
#[derive(Debug, thiserror::Error)]
#[error("the response was cancelled: its reader took no data for {0:?}")]
pub(crate) struct Stalled(Duration);

impl<B> Body for Stallable<B>
where
    B: Body + Unpin,
    B::Error: Into<crate::body::BoxError>,
{
    type Data = B::Data;
    type Error = crate::body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        // Asked for more: whatever it was given has been taken.
        this.watched.progress.fetch_and(!1, Ordering::Relaxed);
        let mut inner = this.watched.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(body) = inner.as_mut() else {
            return Poll::Ready(Some(Err(Stalled(this.timeout).into())));
        };
        match Pin::new(body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_data() {
                    // Next count, waiting bit set (a single writer: this body).
                    let count = this.watched.progress.load(Ordering::Relaxed) >> 1;
                    this.watched
                        .progress
                        .store(((count + 1) << 1) | 1, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                // Finished: nothing left to watch.
                *inner = None;
                drop(inner);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        // A cancelled body still has its error to report.
        self.watched
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.watched
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or_else(SizeHint::default, |b| b.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::atomic::AtomicBool;

    /// A body that yields `frames` data frames, then stays open, and notes being dropped.
    struct Source {
        frames: usize,
        dropped: Arc<AtomicBool>,
    }

    impl Body for Source {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.frames == 0 {
                return Poll::Pending;
            }
            self.frames -= 1;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
        }
    }

    impl Drop for Source {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    fn source(frames: usize) -> (Source, Arc<AtomicBool>) {
        let dropped = Arc::new(AtomicBool::new(false));
        (
            Source {
                frames,
                dropped: dropped.clone(),
            },
            dropped,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn data_the_reader_does_not_take_is_cancelled_after_the_timeout() {
        let counter = Counter::default();
        let watch = StallWatch::start(Duration::from_secs(2), counter.clone());
        let (body, dropped) = source(1);
        let mut body = watch.watch(body);
        // The reader takes one frame, then stops asking.
        assert!(body.frame().await.is_some());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            !dropped.load(Ordering::SeqCst),
            "cancelled before the timeout"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            dropped.load(Ordering::SeqCst),
            "the source was not released"
        );
        assert_eq!(counter.get(), 1);
        let next = body.frame().await.expect("an error frame");
        assert!(next.unwrap_err().to_string().contains("took no data"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_source_is_not_a_stalled_reader() {
        let counter = Counter::default();
        let watch = StallWatch::start(Duration::from_secs(2), counter.clone());
        let (body, dropped) = source(1);
        let mut body = watch.watch(body);
        assert!(body.frame().await.is_some());
        // The reader asks again; the source has nothing for a long time.
        let waiting = tokio::time::timeout(Duration::from_secs(30), body.frame()).await;
        assert!(waiting.is_err());
        assert!(!dropped.load(Ordering::SeqCst));
        assert_eq!(counter.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn finished_bodies_leave_the_watch() {
        let watch = StallWatch::start(Duration::from_secs(1), Counter::default());
        let frames = futures::stream::iter([Ok::<_, std::convert::Infallible>(Frame::data(
            Bytes::from_static(b"done"),
        ))]);
        let body = watch.watch(StreamBody::new(frames));
        let collected = body.collect().await.expect("whole body").to_bytes();
        assert_eq!(&collected[..], b"done");
        assert!(
            watch.state.watched.lock().unwrap().is_empty(),
            "a finished body leaves the watch when dropped"
        );
    }
}
