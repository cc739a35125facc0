//! The final gRPC status of a response, watched as its body passes through.
//! One wrapper for everyone who needs it: the proxy's metrics and spans, and
//! the services' spans ([`crate::trace`]).
//!
//! The status comes from a trailers-only response's headers or from the
//! trailers; a body that fails, ends without one, or is dropped first ends
//! without a status, which [`End::code`] maps to what a client would see.

use http::HeaderMap;
use http_body::{Body, Frame};
use std::pin::Pin;
use std::task::{Context, Poll};

/// The gRPC status in a header map (trailers, or a trailers-only response).
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// The status message in a header map, percent-decoded as it is on the wire.
pub fn grpc_message(headers: &HeaderMap) -> Option<String> {
    let raw = headers.get("grpc-message")?.as_bytes();
    Some(
        percent_encoding::percent_decode(raw)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// How a response ended.
#[derive(Debug, Clone, Copy)]
pub enum End<'a> {
    /// With a gRPC status; `headers` are the trailers, or the headers of a
    /// trailers-only response, and hold the status and its message.
    Status {
        /// The `grpc-status` code.
        code: u32,
        /// Where it was found, with `grpc-message`.
        headers: &'a HeaderMap,
    },
    /// The body failed before a status.
    Failed,
    /// The body ended cleanly without a status: not valid gRPC.
    NoStatus,
    /// The body was dropped before a status: the caller went away.
    Dropped,
}

impl End<'_> {
    /// The status code a client sees: the status, else UNAVAILABLE for a
    /// failed body, UNKNOWN for a missing status, CANCELLED when dropped.
    pub fn code(&self) -> u32 {
        match self {
            End::Status { code, .. } => *code,
            End::Failed => 14,
            End::NoStatus => 2,
            End::Dropped => 1,
        }
    }
}

/// What a [`StatusBody`] tells as its response passes.
pub trait Watch {
    /// Each data frame, in order.
    fn data<D: bytes::Buf>(&mut self, _data: &D) {}
    /// How the response ended; called exactly once. The watcher itself is
    /// dropped when the body ends or is dropped, whichever comes first.
    fn end(&mut self, end: End<'_>);
}

/// A [`Watch`] that is one closure, called (and dropped) at the end.
pub struct OnEnd<F>(Option<F>);

/// Watches only for the end, with `f`.
pub fn on_end<F: FnOnce(End<'_>)>(f: F) -> OnEnd<F> {
    OnEnd(Some(f))
}

impl<F: FnOnce(End<'_>)> Watch for OnEnd<F> {
    fn end(&mut self, end: End<'_>) {
        if let Some(f) = self.0.take() {
            f(end);
        }
    }
}

pin_project_lite::pin_project! {
    /// Passes a response body through and tells its watcher how it ends.
    pub struct StatusBody<B, W: Watch> {
        #[pin]
        inner: B,
        watch: Option<W>,
        ended: bool,
    }

    impl<B, W: Watch> PinnedDrop for StatusBody<B, W> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !*this.ended
                && let Some(watch) = this.watch.as_mut()
            {
                watch.end(End::Dropped);
            }
        }
    }
}

impl<B, W: Watch> StatusBody<B, W> {
    /// `headers` are the response's: a trailers-only response has its status
    /// there, and the watcher hears of it at once.
    pub fn new(inner: B, headers: &HeaderMap, mut watch: W) -> Self {
        let ended = match grpc_status(headers) {
            Some(code) => {
                watch.end(End::Status { code, headers });
                true
            }
            None => false,
        };
        Self {
            inner,
            watch: Some(watch),
            ended,
        }
    }
}

impl<B: Body, W: Watch> Body for StatusBody<B, W> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        let Some(watch) = this.watch.as_mut() else {
            return polled;
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    watch.data(data);
                }
                if let Some(headers) = frame.trailers_ref()
                    && let Some(code) = grpc_status(headers)
                    && !*this.ended
                {
                    *this.ended = true;
                    watch.end(End::Status { code, headers });
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if !*this.ended {
                    *this.ended = true;
                    watch.end(End::Failed);
                }
            }
            Poll::Ready(None) => {
                if !*this.ended {
                    *this.ended = true;
                    watch.end(End::NoStatus);
                }
                *this.watch = None;
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::HeaderValue;
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};

    fn logged(log: &Arc<Mutex<Vec<u32>>>) -> OnEnd<impl FnOnce(End<'_>)> {
        let log = log.clone();
        on_end(move |end| log.lock().unwrap().push(end.code()))
    }

    #[tokio::test]
    async fn the_trailer_status_is_reported_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("5"));
        let frames = vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"x"))),
            Ok(Frame::trailers(trailers)),
        ];
        let inner = http_body_util::StreamBody::new(futures::stream::iter(frames));
        let body = StatusBody::new(inner, &HeaderMap::new(), logged(&seen));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().and_then(grpc_status), Some(5));
        assert_eq!(*seen.lock().unwrap(), [5]);
    }

    #[tokio::test]
    async fn a_body_without_a_status_ends_unknown_cancelled_or_from_its_headers() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let empty = || http_body_util::Empty::<Bytes>::new();
        drop(StatusBody::new(empty(), &HeaderMap::new(), logged(&seen)));
        let ended = StatusBody::new(empty(), &HeaderMap::new(), logged(&seen));
        ended.collect().await.unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", HeaderValue::from_static("7"));
        let trailers_only = StatusBody::new(empty(), &headers, logged(&seen));
        trailers_only.collect().await.unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [1, 2, 7],
            "dropped early: CANCELLED; ended without a status: UNKNOWN"
        );
    }

    #[test]
    fn grpc_message_is_percent_decoded() {
        let mut headers = HeaderMap::new();
        assert_eq!(grpc_message(&headers), None);
        for (wire, message) in [
            ("user%20usr_1%20not%20found", "user usr_1 not found"),
            ("100%", "100%"),
            ("caf%C3%A9%20%25", "café %"),
        ] {
            headers.insert("grpc-message", HeaderValue::from_static(wire));
            assert_eq!(grpc_message(&headers).as_deref(), Some(message), "{wire}");
        }
    }
}
