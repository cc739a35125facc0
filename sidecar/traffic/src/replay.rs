//! A request body that can be sent again, without knowing the call's
//! protobuf schema: frames are forwarded as they are read while a copy is
//! kept, up to a cap, for as long as a retry is still possible (the idea of
//! linkerd2-proxy's `ReplayBody`; written here because that crate is not
//! published on its own).
//!
//! Every copy of the body walks the same shared list of frames: whichever
//! attempt reads further pulls the next frame from the original body and
//! appends it, so a replay sees exactly the frames the first attempt saw,
//! then the rest. Once the copy passes the cap it is dropped and no new
//! replay can be made; an attempt already behind the head then fails.

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// The error every attempt's body reports: the original's, or the replay's own.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body a proxy usually forwards: any body, boxed.
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

struct Shared<B> {
    /// Every data frame read from the original so far, while replay is possible.
    copy: Vec<Bytes>,
    copied_bytes: usize,
    /// Frames read from the original in total.
    head: usize,
    cap: usize,
    /// The copy went over the cap (or replay was given up): it is incomplete.
    capped: bool,
    original: Option<B>,
    /// A frame read from the original ahead of time (see `look_ahead`).
    lookahead: Option<Result<Frame<Bytes>, BoxError>>,
    /// The original ended (its trailers, if any, are kept for a replay).
    ended: bool,
    trailers: Option<HeaderMap>,
}

impl<B> Shared<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// The original's next frame: the one read ahead, if any, else a fresh one.
    fn next_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(frame) = self.lookahead.take() {
            return Poll::Ready(Some(frame));
        }
        let Some(original) = self.original.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(original).poll_frame(cx) {
            Poll::Ready(None) => {
                self.ended = true;
                self.original = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => Poll::Ready(Some(frame.map_err(Into::into))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Reads one frame ahead after a data frame, so that an end already
    /// received is known now and END_STREAM rides on that data frame. A
    /// client's END_STREAM often comes as its own empty DATA frame in the
    /// same read as the data; h2 queues it, so without this look the proxy
    /// spent a second write on every unary call. A frame with content is
    /// kept for the next read; nothing waits here.
    fn look_ahead(&mut self, cx: &mut Context<'_>) {
        match self.next_frame(cx) {
            Poll::Pending | Poll::Ready(None) => {}
            Poll::Ready(Some(Ok(frame))) if frame.data_ref().is_some_and(Bytes::is_empty) => {
                // An empty DATA frame carries nothing but, maybe, the end.
                if self.original.as_ref().is_some_and(|o| o.is_end_stream()) {
                    self.ended = true;
                    self.original = None;
                }
            }
            Poll::Ready(Some(frame)) => self.lookahead = Some(frame),
        }
    }
}

/// One attempt's view of the request body `B`: the first attempt reads the
/// original, later ones the copy and then whatever of the original is left.
pub struct ReplayBody<B = BoxBody> {
    shared: Arc<Mutex<Shared<B>>>,
    /// Frames of the copy this attempt has sent.
    position: usize,
    trailers_sent: bool,
}

/// Makes replays while a retry is possible; dropping it frees the copy.
pub struct Replay<B = BoxBody> {
    shared: Arc<Mutex<Shared<B>>>,
}

impl<B> ReplayBody<B> {
    /// The first attempt's body and the handle that makes replays of it,
    /// keeping a copy of at most `cap` bytes of data.
    pub fn new(original: B, cap: usize) -> (Self, Replay<B>) {
        let shared = Arc::new(Mutex::new(Shared {
            copy: Vec::new(),
            copied_bytes: 0,
            head: 0,
            cap,
            capped: false,
            original: Some(original),
            lookahead: None,
            ended: false,
            trailers: None,
        }));
        (
            Self {
                shared: shared.clone(),
                position: 0,
                trailers_sent: false,
            },
            Replay { shared },
        )
    }
}

impl<B> Replay<B> {
    /// The same request again from its first frame, or None when the copy
    /// is incomplete (the body was larger than the cap).
    pub fn replay(&self) -> Option<ReplayBody<B>> {
        let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        (!shared.capped).then(|| ReplayBody {
            shared: self.shared.clone(),
            position: 0,
            trailers_sent: false,
        })
    }

    /// True when the whole request has been read and is in the copy.
    pub fn is_complete(&self) -> bool {
        let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.ended && !shared.capped
    }
}

impl<B> Drop for Replay<B> {
    fn drop(&mut self) {
        // No retry can come any more: stop copying and free the copy.
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.capped = true;
        shared.copy = Vec::new();
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut shared = this.shared.lock().unwrap_or_else(|p| p.into_inner());
        if this.position < shared.head {
            // Behind the head: replay from the copy.
            if shared.capped {
                return Poll::Ready(Some(Err(
                    "request body too large to send again (over the replay cap)".into(),
                )));
            }
            let Some(chunk) = shared.copy.get(this.position).cloned() else {
                return Poll::Ready(Some(Err("replay copy out of step".into())));
            };
            this.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if shared.ended {
            if !this.trailers_sent
                && let Some(trailers) = shared.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            return Poll::Ready(None);
        }
        match shared.next_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err))),
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    shared.head += 1;
                    this.position = shared.head;
                    // Known to be the last frame: say so now, so END_STREAM
                    // rides on this DATA frame. An empty DATA frame after it
                    // for every call trips h2's flood guard on the peer
                    // ("too_many_data_frames") on a busy connection.
                    if shared.original.as_ref().is_some_and(|o| o.is_end_stream()) {
                        shared.ended = true;
                        shared.original = None;
                    } else if !shared.capped {
                        // Only while a retry is still possible (a unary call
                        // before its answer): a long stream is not charged
                        // an extra poll per frame.
                        shared.look_ahead(cx);
                    }
                    if !shared.capped {
                        shared.copied_bytes += data.len();
                        if shared.copied_bytes > shared.cap {
                            shared.capped = true;
                            shared.copy = Vec::new();
                        } else {
                            shared.copy.push(data.clone());
                        }
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => {
                    // Trailers end the body; other frames have no meaning in gRPC.
                    if let Some(trailers) = frame.trailers_ref() {
                        shared.trailers = Some(trailers.clone());
                        this.trailers_sent = true;
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.ended
            && self.position >= shared.head
            && (self.trailers_sent || shared.trailers.is_none())
            || (self.position == 0
                && shared.head == 0
                && shared
                    .original
                    .as_ref()
                    .is_some_and(|original| original.is_end_stream()))
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        match (&shared.original, self.position, shared.head) {
            (Some(original), 0, 0) => original.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn chunks(parts: &[&'static str]) -> BoxBody {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
    }

    /// A body that knows its end as soon as its last frame is queued, as
    /// h2's receive side does once END_STREAM has arrived.
    struct Queued(std::collections::VecDeque<Frame<Bytes>>);

    impl Body for Queued {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    fn queued(frames: Vec<Frame<Bytes>>) -> BoxBody {
        Queued(frames.into()).boxed_unsync()
    }

    fn data(text: &'static str) -> Frame<Bytes> {
        Frame::data(Bytes::from_static(text.as_bytes()))
    }

    async fn read_all(body: ReplayBody) -> Result<String, BoxError> {
        let bytes = body.collect().await?.to_bytes();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn a_replay_sends_what_the_first_attempt_sent_then_the_rest() {
        let (mut first, replay) = ReplayBody::new(chunks(&["ab", "cd", "ef"]), 1024);
        // The first attempt read one frame, then failed before the peer saw it.
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        drop(first);
        let second = replay.replay().expect("under the cap");
        assert_eq!(read_all(second).await.unwrap(), "abcdef");
        assert!(replay.is_complete());
        let third = replay.replay().expect("still complete");
        assert_eq!(read_all(third).await.unwrap(), "abcdef");
    }

    #[tokio::test]
    async fn over_the_cap_no_replay_is_made_and_the_first_attempt_is_unharmed() {
        let (first, replay) = ReplayBody::new(chunks(&["12345", "67890", "abc"]), 8);
        assert_eq!(read_all(first).await.unwrap(), "1234567890abc");
        assert!(replay.replay().is_none());
        assert!(!replay.is_complete());
    }

    #[tokio::test]
    async fn a_replay_behind_the_head_fails_once_the_copy_is_given_up() {
        let (mut first, replay) = ReplayBody::new(chunks(&["12345", "67890"]), 8);
        let mut second = replay.replay().unwrap();
        first.frame().await.unwrap().unwrap();
        first.frame().await.unwrap().unwrap(); // over the cap now
        assert!(second.frame().await.unwrap().is_err());
    }

    #[tokio::test]
    async fn dropping_the_handle_frees_the_copy() {
        let (mut first, replay) = ReplayBody::new(chunks(&["ab", "cd"]), 1024);
        first.frame().await.unwrap().unwrap();
        drop(replay);
        assert!(first.shared.lock().unwrap().copy.is_empty());
        assert_eq!(read_all(first).await.unwrap(), "cd");
    }

    #[tokio::test]
    async fn an_end_already_received_rides_on_the_last_data_frame() {
        // DATA then an empty DATA with END_STREAM, both received.
        let (mut first, replay) = ReplayBody::new(queued(vec![data("abc"), data("")]), 1024);
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "abc");
        assert!(first.is_end_stream(), "the end is known with the data");
        assert!(first.frame().await.is_none());
        assert!(replay.is_complete());
        assert_eq!(read_all(replay.replay().unwrap()).await.unwrap(), "abc");
    }

    #[tokio::test]
    async fn a_frame_read_ahead_is_sent_next_and_replayed_in_order() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-end", http::HeaderValue::from_static("1"));
        let frames = vec![data("ab"), data("cd"), Frame::trailers(trailers)];
        let (mut first, replay) = ReplayBody::new(queued(frames), 1024);
        assert_eq!(
            first.frame().await.unwrap().unwrap().into_data().unwrap(),
            "ab"
        );
        assert!(!first.is_end_stream());
        drop(first);
        // The replay reads the copy, then the frame read ahead, then the rest.
        let mut second = replay.replay().unwrap();
        assert_eq!(
            second.frame().await.unwrap().unwrap().into_data().unwrap(),
            "ab"
        );
        assert_eq!(
            second.frame().await.unwrap().unwrap().into_data().unwrap(),
            "cd"
        );
        let last = second.frame().await.unwrap().unwrap();
        assert_eq!(last.trailers_ref().unwrap()["x-end"], "1");
        assert!(second.frame().await.is_none());
        let third = replay.replay().unwrap().collect().await.unwrap();
        assert_eq!(third.trailers().unwrap()["x-end"], "1");
        assert_eq!(third.to_bytes(), "abcd");
    }
}
