//! The request message size limit, answered RESOURCE_EXHAUSTED as the gRPC
//! status code guide asks. tonic's own limit answers OUT_OF_RANGE and says
//! why only in its message text, so this layer reads each message's length
//! prefix before tonic does and fails the body with the status itself;
//! tonic hands a body error that is a `Status` to the caller unchanged.

use crate::trace::GrpcFrames;
use bytes::Bytes;
use http::Request;
use http_body::{Body, Frame};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tonic::Status;

/// Refuses request messages larger than `limit` bytes.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimitLayer {
    limit: usize,
}

impl MessageLimitLayer {
    /// A layer refusing request messages over `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { limit }
    }
}

impl<S> tower::Layer<S> for MessageLimitLayer {
    type Service = MessageLimit<S>;
    fn layer(&self, inner: S) -> MessageLimit<S> {
        MessageLimit {
            inner,
            limit: self.limit,
        }
    }
}

/// The service [`MessageLimitLayer`] makes.
#[derive(Debug, Clone)]
pub struct MessageLimit<S> {
    inner: S,
    limit: usize,
}

impl<S, B> tower::Service<Request<B>> for MessageLimit<S>
where
    S: tower::Service<Request<tonic::body::Body>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let limit = self.limit as u64;
        self.inner.call(request.map(|inner| {
            tonic::body::Body::new(Limited {
                inner,
                frames: GrpcFrames::default(),
                limit,
                refused: false,
            })
        }))
    }
}

pin_project_lite::pin_project! {
    /// A request body that fails with RESOURCE_EXHAUSTED, instead of passing
    /// the data on, once a length prefix announces a message over the limit.
    struct Limited<B> {
        #[pin]
        inner: B,
        frames: GrpcFrames,
        limit: u64,
        refused: bool,
    }
}

impl<B> Body for Limited<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        if *this.refused {
            return Poll::Ready(None);
        }
        let frame = match ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(err)) => return Poll::Ready(Some(Err(Status::from_error(err.into())))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            this.frames.feed(data);
            let largest = this.frames.largest();
            if largest > *this.limit {
                *this.refused = true;
                return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                    "a request message of {largest} bytes is larger than the limit of {} bytes",
                    this.limit
                )))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.refused || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn framed(len: usize, split: usize) -> Vec<Result<Frame<Bytes>, Status>> {
        let mut wire = vec![0];
        wire.extend_from_slice(&(len as u32).to_be_bytes());
        wire.resize(5 + len, 7);
        wire.chunks(split)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect()
    }

    async fn read(frames: Vec<Result<Frame<Bytes>, Status>>, limit: u64) -> Result<usize, Status> {
        let body = Limited {
            inner: http_body_util::StreamBody::new(futures::stream::iter(frames)),
            frames: GrpcFrames::default(),
            limit,
            refused: false,
        };
        Ok(body.collect().await?.to_bytes().len())
    }

    #[tokio::test]
    async fn a_message_over_the_limit_is_resource_exhausted_before_its_bytes_pass() {
        for split in [1, 3, 5, 64] {
            assert_eq!(read(framed(100, split), 100).await.unwrap(), 105);
            let err = read(framed(101, split), 100).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{split}");
            assert!(err.message().contains("101 bytes"), "{}", err.message());
        }
    }
}
