//! What each server connection is doing, and when it has been silent or idle
//! too long: the registry's listener and the sidecar's inbound side share it.
//!
//! hyper's own HTTP/1.1 header timeout cannot serve here: it starts when the
//! connection goes idle, so it also closes keep-alive connections after that
//! long, and it knows nothing of the TLS handshake or of the bytes the auto
//! builder reads to tell HTTP/1.1 from HTTP/2. So each connection's task keeps
//! an [`Activity`] (fed by the service wrapper and by [`Watched`], the I/O
//! wrapper) and asks [`Activity::verdict`] when to act:
//!
//! - until its first request starts, a connection has `--header-timeout` from
//!   its accept, handshake and protocol detection included: then it is cut;
//! - while a request is in progress, nothing is due (the body has its own
//!   timeout and a blocking query ends by `--max-wait`);
//! - idle, it is closed gracefully `--idle-timeout` after its last request
//!   ended; an HTTP/1.1 connection that starts sending a head has
//!   `--header-timeout` from its first byte to finish it, or it is cut.
//!
//! The request path pays two atomic updates and one clock read per request;
//! the I/O path one atomic load per read.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The state of one connection, shared by its task, its service and its I/O.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// Requests started on the connection.
    started: AtomicU64,
    /// Requests whose answer is not yet produced.
    in_flight: AtomicUsize,
    /// When the last request ended, in milliseconds since `opened`.
    idle_since: AtomicU64,
    /// 1 + when the first byte arrived while idle (a new head began), in
    /// milliseconds since `opened`; 0 when none did.
    head_since: AtomicU64,
    http2: AtomicBool,
}

/// What the connection's task should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing yet; ask again at this instant.
    WaitUntil(Instant),
    /// A head (or the handshake before the first one) took too long: drop the connection.
    HeaderTimeout,
    /// Idle too long: close gracefully.
    Idle,
}

/// Held while a request is served; its drop marks the request ended.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Activity {
    pub fn new(header_timeout: Duration, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Activity {
            opened: Instant::now(),
            header_timeout,
            idle_timeout,
            started: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            http2: AtomicBool::new(false),
        })
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.opened).as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.opened + Duration::from_millis(ms)
    }

    /// A request head arrived and is about to be served (`http2`: over HTTP/2).
    pub fn start(self: &Arc<Self>, http2: bool) -> InFlight {
        if http2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.started.fetch_add(1, Ordering::SeqCst);
        self.head_since.store(0, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// Bytes were read: while idle, that is the start of the next head.
    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::SeqCst) == 0
            && self.started.load(Ordering::Relaxed) > 0
            && self.head_since.load(Ordering::Relaxed) == 0
        {
            self.head_since.store(self.ms(Instant::now()) + 1, Ordering::SeqCst);
        }
    }

    /// What is due at `now`.
    pub fn verdict(&self, now: Instant) -> Verdict {
        if self.started.load(Ordering::SeqCst) == 0 {
            let deadline = self.opened + self.header_timeout;
            return if now >= deadline { Verdict::HeaderTimeout } else { Verdict::WaitUntil(deadline) };
        }
        // Checked at least every header timeout, so a head that starts while
        // the task sleeps towards the idle deadline is seen in time, and (as
        // the idle timeout is at least the header timeout) the end of a
        // request is seen before its idle deadline.
        let next_look = now + self.header_timeout;
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Verdict::WaitUntil(next_look);
        }
        let idle_deadline = self.at(self.idle_since.load(Ordering::SeqCst)) + self.idle_timeout;
        let http2 = self.http2.load(Ordering::Relaxed);
        let head = self.head_since.load(Ordering::SeqCst);
        // HTTP/2 reads PING answers and window updates while idle: not a head.
        if !http2 && head > 0 {
            let head_deadline = self.at(head - 1) + self.header_timeout;
            if now >= head_deadline {
                return Verdict::HeaderTimeout;
            }
            return Verdict::WaitUntil(head_deadline.min(idle_deadline));
        }
        if now >= idle_deadline {
            return Verdict::Idle;
        }
        Verdict::WaitUntil(if http2 { idle_deadline } else { idle_deadline.min(next_look) })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        // The idle clock is set before the count falls, so a task that sees
        // no request in flight also sees when the last one ended.
        a.idle_since.store(a.ms(Instant::now()), Ordering::SeqCst);
        a.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection's byte stream (after TLS), reporting reads to its [`Activity`].
#[derive(Debug)]
pub struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Watched<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Watched { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    const HEADER: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_cut_at_the_header_timeout() {
        let a = Activity::new(HEADER, IDLE);
        let opened = Instant::now();
        assert_eq!(a.verdict(opened), Verdict::WaitUntil(opened + HEADER));
        assert_eq!(a.verdict(opened + HEADER), Verdict::HeaderTimeout);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_after_requests_then_a_slow_second_head() {
        let a = Activity::new(HEADER, IDLE);
        let req = a.start(false);
        tokio::time::advance(Duration::from_secs(100)).await;
        assert!(matches!(a.verdict(Instant::now()), Verdict::WaitUntil(_)), "busy is never idle");
        drop(req);
        let ended = Instant::now();
        // Idle: looked at again within a header timeout, closed at the idle timeout.
        assert_eq!(a.verdict(ended), Verdict::WaitUntil(ended + HEADER));
        assert_eq!(a.verdict(ended + IDLE), Verdict::Idle);
        // A head begins 5s later and never ends: cut 10s after its first byte.
        tokio::time::advance(Duration::from_secs(5)).await;
        let (mut client, server) = tokio::io::duplex(64);
        let mut watched = Watched::new(server, a.clone());
        client.write_all(b"GET").await.unwrap();
        let mut buf = [0u8; 8];
        tokio::io::AsyncReadExt::read(&mut watched, &mut buf).await.unwrap();
        let first_byte = Instant::now();
        assert_eq!(a.verdict(first_byte), Verdict::WaitUntil(first_byte + HEADER));
        assert_eq!(a.verdict(first_byte + HEADER), Verdict::HeaderTimeout);
        // The head completes: the rules start over.
        let _req = a.start(false);
        assert!(matches!(a.verdict(first_byte + HEADER), Verdict::WaitUntil(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn http2_reads_while_idle_are_not_heads() {
        let a = Activity::new(HEADER, IDLE);
        drop(a.start(true));
        let ended = Instant::now();
        a.bytes_read();
        assert_eq!(a.verdict(ended + HEADER), Verdict::WaitUntil(ended + IDLE));
        assert_eq!(a.verdict(ended + IDLE), Verdict::Idle);
    }
}
