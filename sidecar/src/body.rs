//! Bodies the proxy passes along, and the gRPC answers it makes itself.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use std::pin::Pin;
use std::task::{Context, Poll};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the proxy sends: streamed straight through from the other side,
/// or a small one it made itself. Boxed so both directions share one type.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

pub fn empty() -> ProxyBody {
    boxed(http_body_util::Empty::<Bytes>::new())
}

/// Percent-encodes a grpc-message value (spaces and non-printables).
fn encode_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// gRPC status codes the proxy answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    InvalidArgument = 3,
    Unimplemented = 12,
    Unavailable = 14,
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    Unauthenticated = 16,
    Internal = 13,
    ResourceExhausted = 8,
}

/// A trailers-only gRPC response: HTTP 200 with the status in the headers.
/// `proxy_error` marks answers the application never saw (see
/// `minimesh_traffic::retry::PROXY_ERROR_HEADER`), so a caller may retry them.
pub fn grpc_error(code: Code, message: &str, proxy_error: bool) -> Response<ProxyBody> {
    let mut response = Response::new(empty());
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from((code as u8) as u32));
    if let Ok(value) = HeaderValue::from_str(&encode_message(message)) {
        headers.insert("grpc-message", value);
    }
    if proxy_error {
        headers.insert(
            minimesh_traffic::retry::PROXY_ERROR_HEADER,
            HeaderValue::from_static("1"),
        );
    }
    response
}

/// The gRPC status in a header map (trailers, or a trailers-only response).
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

pin_project_lite::pin_project! {
    /// Passes a response body through and reports its final gRPC status once:
    /// from the trailers, or "cancelled"/"unavailable" when the body is
    /// dropped or fails first.
    pub struct Observed<B, F: FnOnce(u32)> {
        #[pin]
        inner: B,
        on_end: Option<F>,
    }

    impl<B, F: FnOnce(u32)> PinnedDrop for Observed<B, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(on_end) = this.on_end.take() {
                on_end(1); // CANCELLED: the stream ended without a status
            }
        }
    }
}

impl<B, F: FnOnce(u32)> Observed<B, F> {
    /// `status` is the status already known from the headers (trailers-only).
    pub fn new(inner: B, status: Option<u32>, on_end: F) -> Self {
        let mut on_end = Some(on_end);
        if let Some(code) = status
            && let Some(f) = on_end.take()
        {
            f(code);
        }
        Self { inner, on_end }
    }
}

impl<B: Body, F: FnOnce(u32)> Body for Observed<B, F> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status)
                    && let Some(f) = this.on_end.take()
                {
                    f(code);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(f) = this.on_end.take() {
                    f(14);
                }
            }
            Poll::Ready(None) => {
                if let Some(f) = this.on_end.take() {
                    // Ended cleanly without trailers: not valid gRPC, count as UNKNOWN.
                    f(2);
                }
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
    use std::sync::{Arc, Mutex};

    #[test]
    fn trailers_only_error_carries_status_message_and_marker() {
        let response = grpc_error(
            Code::PermissionDenied,
            "caller spiffe://x/ns/y/sa/z is not allowed",
            false,
        );
        assert_eq!(response.status(), http::StatusCode::OK);
        assert_eq!(grpc_status(response.headers()), Some(7));
        assert_eq!(
            response.headers()["grpc-message"],
            "caller spiffe://x/ns/y/sa/z is not allowed"
        );
        assert!(
            !response
                .headers()
                .contains_key(minimesh_traffic::retry::PROXY_ERROR_HEADER)
        );
        let refused = grpc_error(Code::Unavailable, "100% down\n", true);
        assert_eq!(refused.headers()["grpc-message"], "100%25 down%0A");
        assert!(
            refused
                .headers()
                .contains_key(minimesh_traffic::retry::PROXY_ERROR_HEADER)
        );
    }

    #[tokio::test]
    async fn observed_body_reports_the_trailer_status_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("5"));
        let frames = vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"x"))),
            Ok(Frame::trailers(trailers)),
        ];
        let inner = http_body_util::StreamBody::new(futures::stream::iter(frames));
        let log = seen.clone();
        let body = Observed::new(inner, None, move |code| log.lock().unwrap().push(code));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().and_then(grpc_status), Some(5));
        assert_eq!(*seen.lock().unwrap(), [5]);

        let log = seen.clone();
        drop(Observed::new(
            http_body_util::Empty::<Bytes>::new(),
            None,
            move |code| log.lock().unwrap().push(code),
        ));
        assert_eq!(
            *seen.lock().unwrap(),
            [5, 1],
            "dropped early counts as CANCELLED"
        );
    }
}
