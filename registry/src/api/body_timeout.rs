//! [`TimedBody`]: a request body that must arrive within `--body-timeout`.
//!
//! Every request reaching the registry over a socket passes through
//! `ApiService::hyper_service`, which wraps its body here, so the router's
//! extractors and the heartbeat fast path are bounded alike. The clock starts
//! the first time the body is awaited and is not ready: a body that comes
//! with its head (nearly every heartbeat) never creates a timer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

/// The error a [`TimedBody`] ends with when its time runs out.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimedOut(pub Duration);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// True when `e` or one of its sources is a [`BodyTimedOut`].
pub fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<BodyTimedOut>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// `inner`, failing with [`BodyTimedOut`] when it is not whole within `limit`
/// of its first wait.
#[derive(Debug)]
pub struct TimedBody<B> {
    inner: B,
    limit: Duration,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, limit: Duration) -> Self {
        TimedBody { inner, limit, deadline: None }
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let limit = this.limit;
                let deadline = this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut(limit))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_trickling_body_fails_at_the_limit_and_a_prompt_one_passes() {
        let limit = Duration::from_secs(10);
        let prompt = TimedBody::new(http_body_util::Full::new(Bytes::from_static(b"{}")), limit);
        assert_eq!(prompt.collect().await.unwrap().to_bytes(), Bytes::from_static(b"{}"));

        // One byte a second, forever.
        let trickle = futures_util::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Some((Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"x"))), ()))
        });
        let started = tokio::time::Instant::now();
        let body = TimedBody::new(StreamBody::new(Box::pin(trickle)), limit);
        let err = body.collect().await.unwrap_err();
        assert!(timed_out(&*err), "{err}");
        assert_eq!(started.elapsed(), limit);
    }
}
