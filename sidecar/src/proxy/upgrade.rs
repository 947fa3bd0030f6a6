//! HTTP/1.1 `Upgrade` (WebSocket and the like): the request goes to one
//! chosen endpoint over a connection of its own; once the endpoint answers
//! `101 Switching Protocols` the client's and the endpoint's connections are
//! spliced byte for byte until either side closes. The endpoint's
//! in-flight count covers the upgraded connection's whole life.
//!
//! A mesh endpoint's connection is mutual TLS offering ALPN `http/1.1` (see
//! [`super::mesh`]); a failed handshake is a refused connect.
//!
//! Retries: only when connecting failed (nothing was sent). Once the upgrade
//! request went out it is never sent again, whatever its method.
//!
//! Limits: the connection it came on ends when the upgrade completes, so the
//! spliced connection takes over that connection's `max_connections` permit
//! (handed over in a [`ConnectionPermit`]; taking a second one would leave
//! room for only `max_connections - 1` WebSockets, and none at a cap of one);
//! it holds it, and counts in `open_connections`, until closed. An upgrade
//! arriving without its connection's permit takes one of its own before
//! connecting, and past the cap is answered `503 overloaded`.
//! A spliced connection with no byte either way for `upgrade_idle_timeout` is
//! closed on both sides, so idle sockets cannot hold permits for ever.

use http::header::{HeaderValue, CONNECTION, UPGRADE};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::debug;

use super::attempts::Attempts;
use super::forward::ensure_host;
use super::pool::tcp_connect;
use super::{cause, headers, ProxyContext, ProxyResponse, ResponseBody};
use crate::endpoints::{EndpointSet, InFlight, ServiceEndpoints, ServicePolicy};
use crate::error::ProxyError;
use crate::outlier::Outcome;

/// An HTTP/1.1 request asking to switch protocols (`Connection: upgrade` and `Upgrade`).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && connection_has_upgrade(req.headers())
}

fn connection_has_upgrade(h: &HeaderMap) -> bool {
    h.get_all(CONNECTION)
        .iter()
        .any(|v| v.to_str().unwrap_or("").split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// The `max_connections` permit of the connection an upgrade request came
/// on, put in that request's extensions so the upgraded connection can take
/// it over once the endpoint switched protocols.
#[derive(Clone)]
pub(crate) struct ConnectionPermit(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl ConnectionPermit {
    pub(crate) fn new(permit: OwnedSemaphorePermit) -> ConnectionPermit {
        ConnectionPermit(Arc::new(Mutex::new(Some(permit))))
    }

    pub(crate) fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

pub(super) async fn forward(
    ctx: &ProxyContext,
    svc: &ServiceEndpoints,
    policy: &ServicePolicy,
    set: &EndpointSet,
    mut req: Request<Incoming>,
    start: Instant,
) -> Result<ProxyResponse, ProxyError> {
    let config = &ctx.config;
    let mut attempts = Attempts::new(config, svc, policy, set, start, config.overall_timeout);
    let deadline = attempts.deadline();
    let downstream = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    let protocol = parts.headers.get(UPGRADE).cloned();
    headers::strip_hop_by_hop(&mut parts.headers);
    ensure_host(&mut parts);
    if let Some(p) = protocol {
        parts.headers.insert(UPGRADE, p);
        parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let uri: Uri = parts.uri.path_and_query().map_or("/", |p| p.as_str()).parse().unwrap_or_default();
    let mut body = Some(body);
    // Taken from the connection only on `101`: until then the connection
    // goes on (a declined upgrade leaves it open for the next request).
    let handed_over = parts.extensions.remove::<ConnectionPermit>();
    let mut permit = match handed_over {
        Some(_) => None,
        None => match Arc::clone(&ctx.connections).try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => return Err(ProxyError::Overloaded("too many connections")),
        },
    };

    let overall = async {
        loop {
            let mut pick = attempts.next()?;
            let ep = pick.endpoint;
            // Untimed: an upgraded connection's lifetime says nothing about load.
            let guard = ep.begin_timed(false);
            let stream = tcp_connect(&ep.authority, config.connect_timeout).await;
            // A mesh endpoint: mutual TLS offering `http/1.1`, whose failure is a refusal.
            let stream = match (stream, &ep.mesh_tls) {
                (Ok(tcp), Some(service)) => ctx
                    .mesh
                    .handshake(tcp, service, &ep.authority, false, config.connect_timeout)
                    .await
                    .map(|tls| Upstream::Mesh(Box::new(tls)))
                    .map_err(|e| (true, e.cause)),
                (Ok(tcp), None) => Ok(Upstream::Plain(tcp)),
                (Err(e), _) => Err(e),
            };
            let stream = match stream {
                Ok(s) => s,
                Err((refused, cause)) => {
                    let outcome = if refused { Outcome::Refused } else { Outcome::Failure };
                    attempts.failed(&mut pick, outcome);
                    drop(guard);
                    // Nothing was sent: any upgrade may go elsewhere.
                    if !attempts.may_retry(true) {
                        return Err(attempts.exhausted(cause));
                    }
                    debug!(service = %svc.name, instance = %ep.id, attempt = attempts.made(), "upgrade: connect failed, retrying");
                    let index = pick.index;
                    drop(pick);
                    attempts.back_off(index).await;
                    continue;
                }
            };
            let handshake = match stream {
                Upstream::Plain(tcp) => handshake(tcp).await,
                Upstream::Mesh(tls) => handshake(tls).await,
            };
            let mut sender = match handshake {
                Ok(sender) => sender,
                Err(e) => {
                    attempts.failed(&mut pick, Outcome::Failure);
                    return Err(attempts.exhausted(cause::chain(&e)));
                }
            };
            let Some(body) = body.take() else {
                attempts.failed(&mut pick, Outcome::Failure);
                return Err(attempts.exhausted("the upgrade request was already sent".into()));
            };
            let mut up = Request::new(body);
            *up.method_mut() = parts.method.clone();
            *up.uri_mut() = uri.clone();
            *up.version_mut() = Version::HTTP_11;
            *up.headers_mut() = parts.headers.clone();
            let per_try = config.per_try_timeout.min(deadline.saturating_duration_since(pick.at));
            let mut resp = match tokio::time::timeout(per_try, sender.send_request(up)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    attempts.failed(&mut pick, Outcome::Failure);
                    return Err(attempts.exhausted(cause::chain(&e)));
                }
                Err(_) => {
                    attempts.failed(&mut pick, Outcome::Failure);
                    return Err(attempts.timed_out(start.elapsed()));
                }
            };
            attempts.succeeded(&mut pick);
            if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                // The endpoint declined the upgrade: relay its answer as any other.
                let mut resp = resp.map(|b| ResponseBody::upstream(b, guard, None));
                headers::strip_hop_by_hop(resp.headers_mut());
                return Ok(resp);
            }
            let upstream = hyper::upgrade::on(&mut resp);
            let mut out = Response::new(ResponseBody::empty());
            *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            *out.headers_mut() = resp.headers().clone();
            debug!(service = %svc.name, instance = %ep.id, attempt = attempts.made(), "upgraded");
            let Some(permit) =
                permit.take().or_else(|| handed_over.as_ref().and_then(ConnectionPermit::take))
            else {
                return Err(ProxyError::Overloaded("too many connections"));
            };
            let held = Held { guard, _permit: permit, gauge: ctx.metrics.connections().clone() };
            tokio::spawn(splice(downstream, upstream, held, config.upgrade_idle_timeout));
            return Ok(out);
        }
    };
    match tokio::time::timeout_at(deadline, overall).await {
        Ok(r) => r,
        Err(_) => Err(ProxyError::Timeout { service: svc.name.clone(), waited: config.overall_timeout }),
    }
}

/// The connection an upgrade goes out on.
enum Upstream {
    Plain(TcpStream),
    Mesh(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// HTTP/1.1 over `io`, its connection driven by a task of its own that hands
/// the socket over on `101`.
async fn handshake<T>(io: T) -> hyper::Result<hyper::client::conn::http1::SendRequest<Incoming>>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        // Ends when the response body is done, or hands the socket over on 101.
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

/// What a spliced connection holds until it closes: the endpoint's in-flight
/// count, a connection permit, and its place in `open_connections`.
struct Held {
    guard: InFlight,
    _permit: OwnedSemaphorePermit,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

/// Size of each direction's copy buffer.
const SPLICE_BUFFER: usize = 8 * 1024;

/// Copies bytes both ways until either side closes (or fails), or no byte
/// moved either way for `idle`; the endpoint stays counted in flight until
/// then.
async fn splice(downstream: OnUpgrade, upstream: OnUpgrade, held: Held, idle: Duration) {
    let (down, up) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    held.gauge.inc();
    let (closed_by, result) = splice_upgraded(down, up, idle).await;
    let instance = &held.guard.endpoint().id;
    match result {
        Ok(bytes) => debug!(%instance, closed_by, bytes, "upgraded connection closed"),
        Err(e) => debug!(%instance, closed_by, error = %e, "upgraded connection failed"),
    }
    held.gauge.dec();
    drop(held);
}

/// Copies bytes both ways between two upgraded connections until either side
/// closes (or fails), or no byte moved either way for `idle`; returns which
/// side ended it (`client`, `endpoint` or `idle timeout`) and the bytes the
/// ending side passed on. The side that ended has its peer's write half shut
/// down after everything it sent was passed on; anything still coming the
/// other way has nobody left to read it.
pub(crate) async fn splice_upgraded(
    down: Upgraded,
    up: Upgraded,
    idle: Duration,
) -> (&'static str, std::io::Result<u64>) {
    let (mut down_r, mut down_w) = tokio::io::split(TokioIo::new(down));
    let (mut up_r, mut up_w) = tokio::io::split(TokioIo::new(up));
    // Milliseconds since `began` at the last byte moved, either way.
    let began = Instant::now();
    let activity = AtomicU64::new(0);
    let ended = {
        let to_upstream = async { ("client", pass(&mut down_r, &mut up_w, &activity, began).await) };
        let to_client = async { ("endpoint", pass(&mut up_r, &mut down_w, &activity, began).await) };
        let watchdog = async {
            loop {
                let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                let deadline = began + last + idle;
                if Instant::now() >= deadline {
                    return ("idle timeout", Ok(0));
                }
                tokio::time::sleep_until(deadline).await;
            }
        };
        // Each direction runs to its end or until the splice ends, so no
        // write is ever cut in the middle while the connection goes on.
        tokio::select! {
            r = to_upstream => r,
            r = to_client => r,
            r = watchdog => r,
        }
    };
    let _ = tokio::join!(up_w.shutdown(), down_w.shutdown());
    ended
}

/// Copies `from` to `to` until end of stream (then shuts `to` down), noting
/// the time of each transfer in `activity`; returns the bytes copied.
async fn pass<R, W>(from: &mut R, to: &mut W, activity: &AtomicU64, began: Instant) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; SPLICE_BUFFER];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(total);
        }
        to.write_all(&buf[..n]).await?;
        total += n as u64;
        let now = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
        activity.store(now, Ordering::Relaxed);
    }
}
