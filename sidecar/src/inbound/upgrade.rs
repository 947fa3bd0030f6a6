//! HTTP/1.1 `Upgrade` requests (WebSocket) relayed to the app: the request
//! goes over a connection of its own, and once the app answers
//! `101 Switching Protocols` the caller's TLS connection and the app's are
//! spliced byte for byte ([`crate::proxy::upgrade::splice_upgraded`], the
//! outbound side's splice) until either side closes or both are silent for
//! `upgrade_idle_timeout`.
//!
//! Limits: the request counts against `max_concurrency` until the app's
//! answer; the upgraded connection then holds the `max_connections` permit
//! of the connection it came on (handed over as on the outbound side) and
//! counts in `inbound_open_connections` until it closes.

use http::header::{HeaderValue, CONNECTION, UPGRADE};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use super::caller::Caller;
use super::forward::{app_headers, relay, Context, InboundResponse};
use crate::endpoints::InFlight;
use crate::error::ProxyError;
use crate::proxy::upgrade::{splice_upgraded, ConnectionPermit};
use crate::proxy::{cause, ResponseBody};

pub(super) use crate::proxy::upgrade::is_upgrade;

pub(super) async fn forward(
    ctx: &Context,
    caller: &Caller,
    mut req: Request<Incoming>,
    guard: InFlight,
) -> Result<InboundResponse, ProxyError> {
    let downstream = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    let protocol = parts.headers.get(UPGRADE).cloned();
    app_headers(&mut parts, caller);
    if let Some(p) = protocol {
        parts.headers.insert(UPGRADE, p);
        parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // Taken from the connection only on `101`: a declined upgrade leaves the
    // connection open for the next request.
    let Some(handed_over) = parts.extensions.remove::<ConnectionPermit>() else {
        return Err(ProxyError::Overloaded("too many connections"));
    };
    let app = &ctx.app.authority;
    let connect_timeout = ctx.config.connect_timeout;
    let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(app.as_str())).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ctx.app_failed(format!("tcp connect error: {e}"))),
        Err(_) => return Err(ctx.app_failed(format!("no connection within {connect_timeout:?}"))),
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ctx.app_failed(cause::chain(&e)))?;
    tokio::spawn(async move {
        // Ends when the response body is done, or hands the socket over on 101.
        let _ = conn.with_upgrades().await;
    });
    let mut up = Request::new(body);
    *up.method_mut() = parts.method;
    *up.uri_mut() =
        Uri::from(parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));
    *up.version_mut() = Version::HTTP_11;
    *up.headers_mut() = parts.headers;
    let mut resp = sender.send_request(up).await.map_err(|e| ctx.app_failed(cause::chain(&e)))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The app declined the upgrade: relay its answer as any other.
        return Ok(relay(resp, guard, None));
    }
    drop(guard);
    let upstream = hyper::upgrade::on(&mut resp);
    let mut out = Response::new(ResponseBody::empty());
    *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *out.headers_mut() = resp.headers().clone();
    let Some(permit) = handed_over.take() else {
        return Err(ProxyError::Overloaded("too many connections"));
    };
    let gauge = ctx.metrics.inbound_connections().clone();
    let idle = ctx.config.upgrade_idle_timeout;
    let who = caller.service.clone();
    tokio::spawn(async move {
        let (down, up) = match tokio::try_join!(downstream, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                debug!(error = %e, "inbound upgrade did not complete");
                return;
            }
        };
        gauge.inc();
        let (closed_by, result) = splice_upgraded(down, up, idle).await;
        match result {
            Ok(bytes) => debug!(caller = %who, closed_by, bytes, "inbound upgraded connection closed"),
            Err(e) => debug!(caller = %who, closed_by, error = %e, "inbound upgraded connection failed"),
        }
        gauge.dec();
        drop(permit);
    });
    Ok(out)
}
