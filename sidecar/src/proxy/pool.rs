//! Pooled HTTP/1.1 connections to endpoints, built on hyper's
//! `client::conn::http1` directly.
//!
//! hyper-util's legacy client did the same job with more machinery per
//! request: a pool checkout racing a connect, an executor-spawned task per
//! request to put the connection back once it turned idle, and a pool key
//! built from the URI. Here a request pops an idle connection of its endpoint
//! (or connects), sends on it, and the response body hands the connection
//! back when its last byte has been read ([`Checkin`]).
//!
//! - **Key**: the endpoint's `host:port` ([`Endpoint::pool_key`]: with the
//!   service's name for a mesh endpoint, whose connections are mutual TLS,
//!   made by [`MeshConnector`] and offering ALPN `http/1.1`; they are pooled
//!   and reused the same way, so a handshake is paid once per connection).
//! - **Reuse**: last in, first out, so a burst's extra connections age out.
//!   Only a connection whose response body was read to the end goes back; one
//!   whose body was abandoned, or that closed, is dropped (and hyper closes it).
//! - **Limits**: at most `max_idle` idle connections per endpoint (the oldest
//!   is closed to make room); an idle connection older than `idle_timeout` is
//!   closed, at the latest by the sweeper one `idle_timeout` later.
//! - **A task per connection**: hyper's connection state machine runs in a
//!   task of its own. Polling it from the client connection's task instead
//!   (hyper's `client::conn` allows it) was built and measured: the same
//!   system calls per request, but hyper's hand-offs (the dispatch channel,
//!   the response body's demand signal, the answer's oneshot) still wake a
//!   task, and that task's every poll then runs the server's state machine
//!   and the whole request future; 4.6 % more instructions per proxied
//!   request, 9 to 18 % more CPU at 2,000 requests/s (docs/bench.md).
//! - **Stale connections**: an endpoint may close an idle connection just as
//!   a request takes it. hyper then hands the unsent request back, and it goes
//!   out on another connection, as the legacy client's
//!   `retry_canceled_requests` did; only a fresh connection's failure counts.
//!   The sweeper drops idle connections their endpoint closed, wherever they
//!   are in the list.

use std::collections::{HashMap, VecDeque};
use std::error::Error as StdError;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use http::{HeaderMap, Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;
use trellis_shared::ServiceName;

use super::body::ReplayBody;
use super::mesh::MeshConnector;
use crate::endpoints::Endpoint;

pub type Sender = SendRequest<ReplayBody<Incoming>>;

/// Why [`Pool::send_on`] failed.
pub enum SendOnError {
    /// The idle connection had closed; the request, never sent, comes back.
    Stale(Box<Request<ReplayBody<Incoming>>>),
    /// The request may have reached the endpoint.
    Send(Box<dyn StdError + Send + Sync>),
}

/// Why an attempt over HTTP/1.1 (or the HTTP/2 client) failed.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: nothing of the request was sent. The
    /// request's headers come back when the pool had them, so a retry does
    /// not need a copy made in advance.
    Connect { refused: bool, cause: String, headers: Option<HeaderMap> },
    /// The request may have reached the endpoint.
    Send(Box<dyn StdError + Send + Sync>),
}

struct Idle {
    tx: Sender,
    since: Instant,
}

type IdleMap = HashMap<String, VecDeque<Idle>, BuildHasherDefault<Fnv>>;

/// FNV-1a for the pool's keys: short `host:port` strings from the registry,
/// hashed twice per request, where SipHash's flooding resistance buys nothing.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Idle HTTP/1.1 connections per endpoint.
pub struct Pool {
    idle: Mutex<IdleMap>,
    mesh: Arc<MeshConnector>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
}

impl Pool {
    /// A pool and its sweeper task, which ends once the pool is dropped.
    pub fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
        mesh: Arc<MeshConnector>,
    ) -> Arc<Self> {
        let pool = Arc::new(Pool { idle: Mutex::default(), mesh, connect_timeout, idle_timeout, max_idle });
        tokio::spawn(sweep(Arc::downgrade(&pool)));
        pool
    }

    fn lock(&self) -> MutexGuard<'_, IdleMap> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `req` (origin-form URI, Host set) to the endpoint at `authority`
    /// on an idle connection or a new one; the response body should carry the
    /// returned [`Checkin`]. The proxy itself connects through
    /// [`super::connect`] (which may hedge), then calls [`Pool::send_on`].
    #[cfg(test)]
    pub async fn send(
        self: &Arc<Self>,
        authority: &str,
        mut req: Request<ReplayBody<Incoming>>,
    ) -> Result<(Response<Incoming>, Checkin), SendError> {
        loop {
            let (tx, reused) = match self.checkout(authority) {
                Some(tx) => (tx, true),
                None => match self.connect_to(authority, None).await {
                    Ok(tx) => (tx, false),
                    Err((refused, cause)) => {
                        let headers = Some(req.into_parts().0.headers);
                        return Err(SendError::Connect { refused, cause, headers });
                    }
                },
            };
            match self.send_on(authority, tx, reused, req).await {
                Ok(sent) => return Ok(sent),
                Err(SendOnError::Stale(back)) => req = *back,
                Err(SendOnError::Send(e)) => return Err(SendError::Send(e)),
            }
        }
    }

    /// Sends `req` on `tx`, a connection to `authority` (`reused`: it came from
    /// the idle list). A reused connection that closed before the request went
    /// out hands the request back ([`SendOnError::Stale`]): it was never sent.
    pub async fn send_on(
        self: &Arc<Self>,
        authority: &str,
        mut tx: Sender,
        reused: bool,
        req: Request<ReplayBody<Incoming>>,
    ) -> Result<(Response<Incoming>, Checkin), SendOnError> {
        match tx.try_send_request(req).await {
            Ok(resp) => {
                let checkin =
                    Checkin { pool: Arc::downgrade(self), authority: authority.into(), tx: Some(tx) };
                Ok((resp, checkin))
            }
            Err(mut e) => match e.take_message() {
                // The connection closed before the request went out: it
                // was never sent, so another connection may take it.
                Some(back) if reused => {
                    debug!(%authority, error = %e.error(), "pooled connection was closed; sending on another");
                    Err(SendOnError::Stale(Box::new(back)))
                }
                _ => Err(SendOnError::Send(Box::new(e.into_error()))),
            },
        }
    }

    /// The most recently used idle connection that is still open and ready.
    pub fn checkout(&self, authority: &str) -> Option<Sender> {
        let mut idle = self.lock();
        let list = idle.get_mut(authority)?;
        while let Some(c) = list.pop_back() {
            if c.since.elapsed() >= self.idle_timeout {
                // The rest are older still.
                list.clear();
                break;
            }
            if c.tx.is_ready() {
                return Some(c.tx);
            }
        }
        None
    }

    /// A new connection to `ep` (mutual TLS for a mesh endpoint), within the
    /// connect timeout; `Err((refused, cause))`. A failed mesh handshake
    /// counts as refused: nothing was sent, and the endpoint could not prove
    /// it is the service.
    pub async fn connect(&self, ep: &Endpoint) -> Result<Sender, (bool, String)> {
        self.connect_to(&ep.authority, ep.mesh_tls.as_ref()).await
    }

    /// A new plain-text connection to `authority` (the inbound side's app).
    pub async fn connect_plain(&self, authority: &str) -> Result<Sender, (bool, String)> {
        self.connect_to(authority, None).await
    }

    async fn connect_to(
        &self,
        authority: &str,
        mesh: Option<&ServiceName>,
    ) -> Result<Sender, (bool, String)> {
        let stream = tcp_connect(authority, self.connect_timeout).await?;
        match mesh {
            None => handshake(authority, stream).await,
            Some(service) => {
                let tls = self
                    .mesh
                    .handshake(stream, service, authority, false, self.connect_timeout)
                    .await
                    .map_err(|e| (true, e.cause))?;
                handshake(authority, tls).await
            }
        }
    }

    fn put(&self, authority: String, tx: Sender) {
        if self.max_idle == 0 {
            return;
        }
        let mut idle = self.lock();
        let list = idle.entry(authority).or_default();
        if list.len() >= self.max_idle {
            list.pop_front();
        }
        list.push_back(Idle { tx, since: Instant::now() });
    }

    /// Closes connections idle for longer than the timeout or closed by
    /// their endpoint, and forgets endpoints without any.
    fn sweep_once(&self) {
        let timeout = self.idle_timeout;
        // One pass: past the idle timeout, or closed by the endpoint wherever
        // it is in the list (dropping a sender only closes a channel).
        self.lock().retain(|_, list| {
            list.retain(|c| c.since.elapsed() < timeout && c.tx.is_ready());
            !list.is_empty()
        });
    }

    #[cfg(test)]
    fn idle_count(&self, authority: &str) -> usize {
        self.lock().get(authority).map_or(0, VecDeque::len)
    }
}

/// A TCP connection to `authority` within `timeout`; `Err((refused, cause))`.
pub(super) async fn tcp_connect(authority: &str, timeout: Duration) -> Result<TcpStream, (bool, String)> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(authority)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err((
                e.kind() == std::io::ErrorKind::ConnectionRefused,
                format!("tcp connect error: {e}"),
            ))
        }
        Err(_) => return Err((false, format!("tcp connect timed out after {timeout:?}"))),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// HTTP/1.1 over `io`, its connection driven by a task of its own.
async fn handshake<T>(authority: &str, io: T) -> Result<Sender, (bool, String)>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (tx, conn) =
        http1::handshake(TokioIo::new(io)).await.map_err(|e| (false, format!("http/1.1 handshake: {e}")))?;
    let authority = authority.to_string();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(%authority, error = %e, "upstream connection ended with an error");
        }
    });
    Ok(tx)
}

async fn sweep(pool: Weak<Pool>) {
    let period = match pool.upgrade() {
        Some(p) => p.idle_timeout.max(Duration::from_millis(100)),
        None => return,
    };
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(p) => p.sweep_once(),
            None => return,
        }
    }
}

/// A connection lent to one request; the response body gives it back with
/// [`Checkin::release`] once it has been read to the end. Dropped otherwise,
/// which closes the connection.
pub struct Checkin {
    pool: Weak<Pool>,
    authority: Box<str>,
    tx: Option<Sender>,
}

impl Checkin {
    /// The response was read to the end: the connection may serve another request.
    pub fn release(&mut self) {
        let Some(mut tx) = self.tx.take() else {
            return;
        };
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        let authority = String::from(std::mem::take(&mut self.authority));
        if tx.is_ready() {
            pool.put(authority, tx);
            return;
        }
        if tx.is_closed() {
            return;
        }
        // hyper has not polled the connection since the body ended (another
        // worker thread), or the request body is still going out: wait for
        // it without holding the response up.
        let pool = Arc::downgrade(&pool);
        tokio::spawn(async move {
            if tx.ready().await.is_ok() {
                if let Some(pool) = pool.upgrade() {
                    pool.put(authority, tx);
                }
            }
        });
    }
}

impl std::fmt::Debug for Checkin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkin").field("authority", &self.authority).finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use tokio::net::TcpListener;

    use super::*;

    /// An HTTP/1.1 server answering "ok", counting the connections it accepted.
    async fn server() -> (String, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(|_req: Request<Incoming>| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"ok"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn no_mesh() -> Arc<MeshConnector> {
        Arc::new(MeshConnector::new(None, Arc::new(crate::metrics::Metrics::new())))
    }

    fn request(addr: &str) -> Request<ReplayBody<Incoming>> {
        let mut req = Request::new(ReplayBody::empty());
        req.headers_mut().insert(http::header::HOST, http::HeaderValue::from_str(addr).unwrap());
        req
    }

    #[tokio::test]
    async fn a_connection_is_reused_only_after_its_body_was_read() {
        let (addr, accepted) = server().await;
        let pool = Pool::new(Duration::from_secs(1), Duration::from_secs(30), 8, no_mesh());
        let (resp, mut checkin) = pool.send(&addr, request(&addr)).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
        checkin.release();
        assert_eq!(pool.idle_count(&addr), 1);
        let (resp, checkin) = pool.send(&addr, request(&addr)).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // Abandoned before its body was read: not returned.
        drop((resp, checkin));
        assert_eq!(pool.idle_count(&addr), 0);
        let (_resp, _checkin) = pool.send(&addr, request(&addr)).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// Three connections lent at once, all returned.
    async fn three_returned(pool: &Arc<Pool>, addr: &str) {
        let mut lent = Vec::new();
        for _ in 0..3 {
            let (resp, checkin) = pool.send(addr, request(addr)).await.unwrap();
            resp.into_body().collect().await.unwrap();
            lent.push(checkin);
        }
        for c in &mut lent {
            c.release();
        }
    }

    #[tokio::test]
    async fn idle_connections_are_capped_per_endpoint() {
        let (addr, _) = server().await;
        let pool = Pool::new(Duration::from_secs(1), Duration::from_secs(30), 2, no_mesh());
        three_returned(&pool, &addr).await;
        assert_eq!(pool.idle_count(&addr), 2);
    }

    #[tokio::test]
    async fn expired_idle_connections_are_not_used() {
        let (addr, accepted) = server().await;
        let pool = Pool::new(Duration::from_secs(1), Duration::ZERO, 8, no_mesh());
        three_returned(&pool, &addr).await;
        assert_eq!(pool.idle_count(&addr), 3);
        assert!(pool.checkout(&addr).is_none());
        assert_eq!(pool.idle_count(&addr), 0);
        pool.sweep_once();
        assert!(pool.lock().is_empty());
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    /// A server answering one request per connection, keeping the connection
    /// open (as keep-alive promises) until `close` is notified; each close
    /// is acknowledged on the returned channel.
    async fn closing_server(
        close: Arc<tokio::sync::Notify>,
    ) -> (String, Arc<AtomicUsize>, tokio::sync::mpsc::UnboundedReceiver<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (close, closed_tx) = (Arc::clone(&close), closed_tx.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                    close.notified().await;
                    drop(s);
                    let _ = closed_tx.send(());
                });
            }
        });
        (addr, accepted, closed)
    }

    /// An idle connection the endpoint closed fails no request: its task
    /// notices the close and checkout skips it, or, taken just before, it
    /// hands the request back unsent and the request goes out on a new one.
    #[tokio::test]
    async fn an_idle_connection_closed_by_its_endpoint_fails_no_request() {
        let close = Arc::new(tokio::sync::Notify::new());
        let (addr, accepted, mut closed) = closing_server(Arc::clone(&close)).await;
        let pool = Pool::new(Duration::from_secs(1), Duration::from_secs(30), 8, no_mesh());
        let (resp, mut checkin) = pool.send(&addr, request(&addr)).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
        checkin.release();
        assert_eq!(pool.idle_count(&addr), 1);
        close.notify_one();
        closed.recv().await.unwrap();
        // One turn of the runtime, so it has read the FIN off the socket, as
        // the time between two requests gives it in practice. (A close that
        // crosses a request already on the wire fails that attempt; the
        // proxy's retry rules handle it, not the pool.)
        tokio::task::yield_now().await;
        let (resp, _checkin) = pool.send(&addr, request(&addr)).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_sweeper_drops_idle_connections_closed_by_their_endpoint() {
        let close = Arc::new(tokio::sync::Notify::new());
        let (addr, _, mut closed) = closing_server(Arc::clone(&close)).await;
        let pool = Pool::new(Duration::from_secs(1), Duration::from_secs(30), 8, no_mesh());
        let mut lent = Vec::new();
        for _ in 0..3 {
            let (resp, checkin) = pool.send(&addr, request(&addr)).await.unwrap();
            resp.into_body().collect().await.unwrap();
            lent.push(checkin);
        }
        // Returned newest first, so the first connection, the one the server
        // closes, is the most recently used: not at the front of the list.
        for c in lent.iter_mut().rev() {
            c.release();
        }
        assert_eq!(pool.idle_count(&addr), 3);
        close.notify_one();
        closed.recv().await.unwrap();
        // The connection's task sees the close once the runtime has read it
        // off the socket; wait for that, not for a fixed time.
        let swept = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                pool.sweep_once();
                if pool.idle_count(&addr) == 2 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        });
        swept.await.expect("the closed connection was never swept");
    }

    /// A body many reads long arrives whole through the response body, which
    /// then gives the connection back.
    #[tokio::test]
    async fn a_long_body_is_read_through_the_lent_connection() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let svc = service_fn(|_req: Request<Incoming>| async {
                let body = bytes::Bytes::from(vec![b'x'; 4 << 20]);
                Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(body)))
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
        });
        let pool = Pool::new(Duration::from_secs(1), Duration::from_secs(30), 8, no_mesh());
        let (resp, checkin) = pool.send(&addr, request(&addr)).await.unwrap();
        let ep = Arc::new(Endpoint::new(
            trellis_shared::InstanceId::new("a").unwrap(),
            trellis_shared::Address::new("127.0.0.1").unwrap(),
            80,
            1,
            None,
            Default::default(),
            Arc::default(),
        ));
        let guard = ep.begin_timed(false);
        let body = crate::proxy::ResponseBody::upstream(resp.into_body(), guard, Some(checkin));
        let read = tokio::time::timeout(Duration::from_secs(10), body.collect()).await;
        assert_eq!(read.expect("the body stalled").unwrap().to_bytes().len(), 4 << 20);
        assert_eq!(pool.idle_count(&addr), 1, "returned once read to the end");
    }

    #[tokio::test]
    async fn a_refused_connect_is_reported_as_such() {
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().to_string();
        let pool = Pool::new(Duration::from_secs(1), Duration::from_secs(30), 8, no_mesh());
        match pool.send(&gone, request(&gone)).await {
            Err(SendError::Connect { refused: true, .. }) => {}
            other => panic!("expected a refused connect, got {other:?}"),
        }
    }
}
