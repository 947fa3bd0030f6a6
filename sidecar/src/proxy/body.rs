//! Body wrappers of the request path, generic over the inner body type.
//!
//! - [`ReplayBody`]: the request body as sent to an endpoint. It streams the
//!   client's body through while keeping a copy of up to `cap` bytes, so a
//!   retry can send the same bytes again. A larger body keeps streaming but
//!   stops being replayable. An empty body costs nothing.
//! - [`ResponseBody`]: the response body as sent to the client, carrying the
//!   endpoint's [`InFlight`] guard so the least-connections count falls when
//!   the last byte has gone out, or a sidecar-made error body. A gRPC
//!   response body also counts its `grpc-status` when its trailers pass.

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::pool::Checkin;
use crate::endpoints::InFlight;
use crate::metrics::GrpcCounters;

pub type BoxError = Box<dyn StdError + Send + Sync>;

/// A later attempt took over the body; this (abandoned) attempt must stop.
#[derive(Debug, thiserror::Error)]
#[error("request body taken over by a retry")]
pub struct Superseded;

struct ReplayState<B> {
    body: B,
    /// The inner body has ended.
    done: bool,
    /// Data read so far, while it fits in `cap`.
    buf: Vec<Bytes>,
    buffered: usize,
    cap: usize,
    /// More than `cap` bytes were read: `buf` was dropped, no replay.
    capped: bool,
    trailers: Option<HeaderMap>,
    /// The attempt allowed to read; older ones get [`Superseded`].
    generation: u64,
}

/// The request body of one attempt.
pub struct ReplayBody<B> {
    inner: Option<Replay<B>>,
}

struct Replay<B> {
    state: Arc<Mutex<ReplayState<B>>>,
    generation: u64,
    /// Next chunk of `buf` this attempt has to (re)send.
    pos: usize,
    trailers_sent: bool,
    hint: SizeHint,
}

impl<B: Body> ReplayBody<B> {
    /// Wraps a client's body; the result is the first attempt's body.
    pub fn new(body: B, cap: usize) -> Self {
        if body.is_end_stream() {
            return ReplayBody { inner: None };
        }
        let hint = body.size_hint();
        let state = ReplayState {
            body,
            done: false,
            buf: Vec::new(),
            buffered: 0,
            cap,
            capped: false,
            trailers: None,
            generation: 1,
        };
        ReplayBody {
            inner: Some(Replay {
                state: Arc::new(Mutex::new(state)),
                generation: 1,
                pos: 0,
                trailers_sent: false,
                hint,
            }),
        }
    }
}

fn lock<B>(state: &Mutex<ReplayState<B>>) -> MutexGuard<'_, ReplayState<B>> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl<B> ReplayBody<B> {
    #[cfg(test)]
    pub fn empty() -> Self {
        ReplayBody { inner: None }
    }

    /// The client sent no body: every attempt can be sent in full, even at once.
    pub fn is_empty(&self) -> bool {
        self.inner.is_none()
    }

    /// Whether the whole body can still be sent again.
    pub fn is_replayable(&self) -> bool {
        self.inner.as_ref().is_none_or(|r| !lock(&r.state).capped)
    }

    /// The body for the next attempt: replays what was read, then continues
    /// reading the client's body. The previous attempt's body stops working.
    pub fn retry(&self) -> Self {
        let Some(r) = &self.inner else {
            return ReplayBody { inner: None };
        };
        let mut st = lock(&r.state);
        st.generation += 1;
        ReplayBody {
            inner: Some(Replay {
                state: Arc::clone(&r.state),
                generation: st.generation,
                pos: 0,
                trailers_sent: false,
                hint: r.hint,
            }),
        }
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
        let Some(r) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let mut st = lock(&r.state);
        if st.generation != r.generation {
            return Poll::Ready(Some(Err(Box::new(Superseded))));
        }
        if !st.capped && r.pos < st.buf.len() {
            let chunk = st.buf[r.pos].clone();
            r.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if st.done {
            if !r.trailers_sent {
                r.trailers_sent = true;
                if let Some(t) = st.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        let frame = match ready!(Pin::new(&mut st.body).poll_frame(cx)) {
            None => {
                st.done = true;
                r.trailers_sent = true;
                return Poll::Ready(None);
            }
            Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            Some(Ok(frame)) => frame,
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                if !st.capped {
                    if st.buffered + data.len() <= st.cap {
                        st.buffered += data.len();
                        st.buf.push(data.clone());
                        r.pos = st.buf.len();
                    } else {
                        st.capped = true;
                        st.buf = Vec::new();
                    }
                }
                Frame::data(data)
            }
            Err(frame) => {
                if let Some(t) = frame.trailers_ref() {
                    st.trailers = Some(t.clone());
                    st.done = true;
                    r.trailers_sent = true;
                }
                frame
            }
        };
        Poll::Ready(Some(Ok(frame)))
    }

    /// Exact once the client's body is known to be done, so an HTTP/2 sender
    /// puts END_STREAM on the last DATA frame instead of sending an empty one
    /// after it (h2 servers count small non-final DATA frames against a flood
    /// budget).
    fn is_end_stream(&self) -> bool {
        let Some(r) = self.inner.as_ref() else {
            return true;
        };
        let st = lock(&r.state);
        if st.generation != r.generation || (!st.capped && r.pos < st.buf.len()) {
            return false;
        }
        if st.done {
            return r.trailers_sent || st.trailers.is_none();
        }
        st.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), |r| r.hint)
    }
}

pin_project! {
    /// The body of a response to the client.
    #[project = ResponseBodyProj]
    pub enum ResponseBody<B> {
        /// Relayed from an endpoint; the guard keeps it counted as in flight.
        Upstream {
            #[pin] body: B,
            guard: Option<InFlight>,
            grpc: Option<Arc<GrpcCounters>>,
            // The pooled HTTP/1.1 connection it came over, returned once the body ends.
            conn: Option<Checkin>,
        },
        /// Made by the sidecar (an error).
        Full { data: Option<Bytes> },
    }
}

impl<B: Body> ResponseBody<B> {
    /// `conn`: the pooled connection the response came over; it goes back to
    /// the pool when the body has been read to the end (at once if it is empty).
    pub fn upstream(body: B, guard: InFlight, conn: Option<Checkin>) -> Self {
        ResponseBody::Upstream { conn: released_if_done(&body, conn), body, guard: Some(guard), grpc: None }
    }

    /// Like [`ResponseBody::upstream`], and counts the `grpc-status` of the
    /// trailers (`other` when the body ends or fails without one).
    pub fn upstream_grpc(body: B, guard: InFlight, grpc: Arc<GrpcCounters>, conn: Option<Checkin>) -> Self {
        ResponseBody::Upstream {
            conn: released_if_done(&body, conn),
            body,
            guard: Some(guard),
            grpc: Some(grpc),
        }
    }
}

/// hyper does not poll a body that says it has ended, so the connection is
/// given back as soon as that is known.
fn released_if_done<B: Body>(body: &B, mut conn: Option<Checkin>) -> Option<Checkin> {
    if body.is_end_stream() {
        if let Some(c) = conn.as_mut() {
            c.release();
        }
        return None;
    }
    conn
}

impl<B> ResponseBody<B> {
    /// No body at all (a `101 Switching Protocols`).
    pub fn empty() -> Self {
        ResponseBody::Full { data: None }
    }

    pub fn full(data: Bytes) -> Self {
        ResponseBody::Full { data: Some(data) }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            ResponseBodyProj::Upstream { mut body, guard, grpc, conn } => {
                let res = ready!(body.as_mut().poll_frame(cx));
                match &res {
                    Some(Ok(frame)) => {
                        if let Some(t) = frame.trailers_ref() {
                            if let Some(g) = grpc.take() {
                                g.record(t.get("grpc-status").map(|v| v.as_bytes()));
                            }
                        }
                    }
                    Some(Err(_)) | None => {
                        if let Some(g) = grpc.take() {
                            g.record(None);
                        }
                    }
                }
                match &res {
                    None => {
                        // Ended: stop counting now rather than whenever the server drops us.
                        guard.take();
                        if let Some(mut c) = conn.take() {
                            c.release();
                        }
                    }
                    Some(Ok(_)) if body.is_end_stream() => {
                        if let Some(mut c) = conn.take() {
                            c.release();
                        }
                    }
                    // A failed body leaves the connection unusable: dropped with the body.
                    _ => {}
                }
                Poll::Ready(res.map(|r| r.map_err(Into::into)))
            }
            ResponseBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream { body, .. } => body.is_end_stream(),
            ResponseBody::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream { body, .. } => body.size_hint(),
            ResponseBody::Full { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    type Chunks = StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, BoxError>>>>;

    fn chunks(parts: &[&'static str]) -> Chunks {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            parts.iter().map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes())))).collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    async fn collect<B>(b: B) -> Result<Bytes, BoxError>
    where
        B: Body<Data = Bytes, Error = BoxError>,
    {
        Ok(b.collect().await?.to_bytes())
    }

    #[tokio::test]
    async fn small_body_replays_after_a_partial_read() {
        let mut first = ReplayBody::new(chunks(&["ab", "cd", "ef"]), 100);
        // The first attempt read one chunk, then failed.
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        let second = first.retry();
        assert!(second.is_replayable());
        assert_eq!(collect(second).await.unwrap(), "abcdef");
        // The first attempt's body was superseded.
        assert!(first.frame().await.unwrap().is_err());
        // A third attempt replays everything from the buffer.
        let third = first.retry();
        assert_eq!(collect(third).await.unwrap(), "abcdef");
    }

    #[tokio::test]
    async fn large_body_streams_but_is_not_replayable() {
        let first = ReplayBody::new(chunks(&["abcd", "efgh", "ij"]), 6);
        assert!(first.is_replayable());
        let probe = first.retry();
        assert_eq!(collect(probe).await.unwrap(), "abcdefghij");
        assert!(!first.is_replayable());
    }

    #[tokio::test]
    async fn unread_body_is_replayable_whatever_its_size() {
        let first = ReplayBody::new(chunks(&["abcd", "efgh"]), 2);
        // A connect failure: the attempt's body was dropped unread.
        assert!(first.is_replayable());
        assert_eq!(collect(first.retry()).await.unwrap(), "abcdefgh");
    }

    #[tokio::test]
    async fn empty_body_is_free() {
        let b = ReplayBody::new(http_body_util::Empty::<Bytes>::new(), 10);
        assert!(b.inner.is_none());
        assert!(b.is_end_stream());
        assert!(b.is_replayable());
    }
}
