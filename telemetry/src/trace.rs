//! Per-call spans for gRPC, as tower layers: one for servers (continues the
//! caller's W3C trace context) and one for clients (injects it).
//!
//! Spans follow the OpenTelemetry RPC conventions: name `pkg.Service/Method`,
//! kind SERVER or CLIENT, `rpc.system=grpc`, `rpc.service`, `rpc.method`,
//! `rpc.grpc.status_code`, and error status on a non-OK code. A span lasts
//! until the response body ends, so a stream is one span, and the status is
//! read from the trailers (or the headers of a trailers-only response) by
//! the one status-watching body, [`crate::status::StatusBody`].

use crate::status::{End, StatusBody, Watch, grpc_message};
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame};
use opentelemetry::propagation::{Extractor, Injector};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tracing::{Instrument, Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Which side of a call a span stands for (OpenTelemetry span kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The side that answers.
    Server,
    /// The side that calls.
    Client,
}

/// A tower layer that wraps every gRPC call in a span and propagates `traceparent`.
#[derive(Debug, Clone, Copy)]
pub struct RpcTraceLayer {
    kind: Kind,
}

impl RpcTraceLayer {
    /// Spans for calls served, continuing the caller's trace.
    pub fn server() -> Self {
        Self { kind: Kind::Server }
    }
    /// Spans for calls made, injecting `traceparent` into their headers.
    pub fn client() -> Self {
        Self { kind: Kind::Client }
    }
}

impl<S> tower::Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;
    fn layer(&self, inner: S) -> RpcTrace<S> {
        RpcTrace {
            inner,
            kind: self.kind,
        }
    }
}

/// The service [`RpcTraceLayer`] makes.
#[derive(Debug, Clone)]
pub struct RpcTrace<S> {
    inner: S,
    kind: Kind,
}

struct HeaderExtractor<'a>(&'a HeaderMap);
impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);
impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Continues the trace context carried by `headers` in `span`.
pub fn continue_trace(span: &Span, headers: &HeaderMap) {
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let _ = span.set_parent(parent);
}

/// Writes `span`'s trace context into `headers` (`traceparent`, `tracestate`).
pub fn inject_trace(span: &Span, headers: &mut HeaderMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers))
    });
}

/// Records the trace and span ids as plain fields, so JSON log lines written
/// inside the span carry them.
pub fn record_ids(span: &Span) {
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    let otel = cx.span();
    let sc = otel.span_context();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
        span.record("span_id", tracing::field::display(sc.span_id()));
    }
}

/// Splits `/pkg.Service/Method` into its service and method.
pub fn split_path(path: &str) -> (&str, &str) {
    let trimmed = path.trim_start_matches('/');
    trimmed.split_once('/').unwrap_or((trimmed, ""))
}

/// A span for a call to `path` with OpenTelemetry's RPC attributes; none for
/// health checks, whose constant polling would drown real traffic.
pub fn rpc_span(kind: Kind, path: &str) -> Span {
    if path.starts_with("/grpc.health.v1.Health/") {
        // Probes poll health constantly; their spans would drown real traffic.
        return Span::none();
    }
    let (service, method) = split_path(path);
    let name = path.trim_start_matches('/');
    match kind {
        Kind::Server => tracing::info_span!("rpc.server", otel.name = %name, otel.kind = "server",
            rpc.system = "grpc", rpc.service = %service, rpc.method = %method,
            rpc.grpc.status_code = Empty, otel.status_code = Empty, otel.status_description = Empty,
            rpc.request.messages = Empty, rpc.response.messages = Empty,
            trace_id = Empty, span_id = Empty),
        Kind::Client => tracing::info_span!("rpc.client", otel.name = %name, otel.kind = "client",
            rpc.system = "grpc", rpc.service = %service, rpc.method = %method,
            rpc.grpc.status_code = Empty, otel.status_code = Empty, otel.status_description = Empty,
            rpc.request.messages = Empty, rpc.response.messages = Empty,
            trace_id = Empty, span_id = Empty),
    }
}

/// Records the final gRPC status on `span`.
pub fn record_status(span: &Span, code: i32, message: Option<&str>) {
    span.record("rpc.grpc.status_code", code);
    if code != 0 {
        span.record("otel.status_code", "ERROR");
        if let Some(message) = message {
            span.record("otel.status_description", message);
        }
    }
}

/// Counts gRPC messages in a body by reading the 5-byte length prefixes,
/// whatever way the bytes are split into frames.
#[derive(Debug, Default, Clone)]
pub struct GrpcFrames {
    header: [u8; 5],
    header_len: usize,
    remaining: u64,
    messages: u64,
    largest: u64,
}

impl GrpcFrames {
    /// Reads more bytes of the body.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining.min(data.len() as u64)) as usize;
                data = &data[n..];
                self.remaining -= n as u64;
                continue;
            }
            let n = (5 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len == 5 {
                self.messages += 1;
                self.remaining = u64::from(u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]));
                self.largest = self.largest.max(self.remaining);
                self.header_len = 0;
            }
        }
    }

    /// Reads the bytes of a buffer without consuming it.
    pub fn feed_buf(&mut self, buf: &impl bytes::Buf) {
        let mut slices = [std::io::IoSlice::new(&[]); 16];
        let filled = buf.chunks_vectored(&mut slices);
        for slice in &slices[..filled] {
            self.feed(slice);
        }
    }

    /// Messages begun so far.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// The largest message length a prefix has announced so far.
    pub fn largest(&self) -> u64 {
        self.largest
    }
}

pin_project_lite::pin_project! {
    /// A request body that counts the gRPC messages passing through it.
    pub struct CountedBody<B> {
        #[pin]
        inner: B,
        frames: Arc<Mutex<GrpcFrames>>,
    }
}

impl<B: Body> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && let Ok(mut frames) = this.frames.lock()
        {
            frames.feed_buf(data);
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

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for RpcTrace<S>
where
    S: tower::Service<Request<tonic::body::Body>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ReqBody: Body<Data = bytes::Bytes> + Send + 'static,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<TracedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let span = rpc_span(self.kind, request.uri().path());
        match self.kind {
            Kind::Server => continue_trace(&span, request.headers()),
            Kind::Client => inject_trace(&span, request.headers_mut()),
        }
        record_ids(&span);
        let requests = Arc::new(Mutex::new(GrpcFrames::default()));
        let counted = requests.clone();
        let request = request.map(|body| {
            tonic::body::Body::new(CountedBody {
                inner: body,
                frames: counted,
            })
        });
        let future = self.inner.call(request).instrument(span.clone());
        Box::pin(async move {
            let response = future.await?;
            let (parts, body) = response.into_parts();
            let watch = SpanWatch {
                span,
                requests,
                responses: GrpcFrames::default(),
            };
            // A trailers-only response (an error before any message) carries the status in its headers.
            let body = StatusBody::new(body, &parts.headers, watch);
            Ok(Response::from_parts(parts, body))
        })
    }
}

/// A response body that keeps its call's span open until the body ends
/// and records the gRPC status on it.
pub type TracedBody<B> = StatusBody<B, SpanWatch>;

/// A call's span, with the messages counted each way.
pub struct SpanWatch {
    span: Span,
    requests: Arc<Mutex<GrpcFrames>>,
    responses: GrpcFrames,
}

impl Watch for SpanWatch {
    fn data<D: bytes::Buf>(&mut self, data: &D) {
        self.responses.feed_buf(data);
    }

    fn end(&mut self, end: End<'_>) {
        match end {
            End::Status { code, headers } => {
                record_status(&self.span, code as i32, grpc_message(headers).as_deref())
            }
            // The stream broke before a status: UNAVAILABLE, as a client would see it.
            End::Failed => record_status(&self.span, 14, Some("response stream failed")),
            End::Dropped => record_status(&self.span, 1, Some("cancelled")),
            End::NoStatus => {}
        }
    }
}

impl Drop for SpanWatch {
    /// The body ended or was dropped: the span closes with the message counts.
    fn drop(&mut self) {
        if let Ok(requests) = self.requests.lock() {
            self.span
                .record("rpc.request.messages", requests.messages());
        }
        self.span
            .record("rpc.response.messages", self.responses.messages());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            split_path("/shop.order.v1.OrderService/CreateOrder"),
            ("shop.order.v1.OrderService", "CreateOrder")
        );
        assert_eq!(split_path("/weird"), ("weird", ""));
    }

    #[test]
    fn grpc_frames_are_counted_across_splits() {
        let mut wire = Vec::new();
        for payload in [&b"abc"[..], b"", &[7u8; 300][..]] {
            wire.push(0);
            wire.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            wire.extend_from_slice(payload);
        }
        for split in [1, 2, 3, 5, 7, 64, wire.len()] {
            let mut frames = GrpcFrames::default();
            for chunk in wire.chunks(split) {
                frames.feed(chunk);
            }
            assert_eq!(frames.messages(), 3, "split {split}");
            assert_eq!(frames.largest(), 300, "split {split}");
        }
    }
}
