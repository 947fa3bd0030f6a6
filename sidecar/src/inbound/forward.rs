//! One inbound request to the app: the caller's decision, the concurrency
//! cap, the headers the app sees, and the protocol it is sent over.
//!
//! The app is one [`Endpoint`]: its in-flight count is the concurrency, and
//! its guard travels in the response body (as on the outbound side), so a
//! request counts until its answer's last byte has gone out. Counting first
//! and refusing when the count went over the cap never lets more than
//! `max_concurrency` through, even when requests race for the last slot.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue, TE};
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tracing::debug;

use super::caller::Caller;
use super::{upgrade, InboundConfig};
use crate::endpoints::{Endpoint, InFlight};
use crate::error::ProxyError;
use crate::identity::MeshIdentity;
use crate::metrics::Metrics;
use crate::proxy::forward::ensure_host;
use crate::proxy::pool::{self, Checkin, SendOnError};
use crate::proxy::{cause, grpc, headers, protocol, ReplayBody, ResponseBody};

/// The header telling the app which service called; a caller's own value is
/// always replaced.
pub static CALLER_HEADER: HeaderName = HeaderName::from_static("x-trellis-caller");

pub(super) type InboundResponse = Response<ResponseBody<Incoming>>;

/// What every inbound connection and request shares: built once by
/// [`super::serve`], read without locks on the request path.
pub(super) struct Context {
    pub identity: MeshIdentity,
    pub config: InboundConfig,
    pub metrics: Arc<Metrics>,
    /// The local app; its in-flight count is capped by `max_concurrency`.
    pub app: Arc<Endpoint>,
    /// Idle HTTP/1.1 connections to the app.
    pub pool: Arc<pool::Pool>,
    /// h2c to the app: one multiplexed connection.
    pub h2: Client<HttpConnector, ReplayBody<Incoming>>,
    /// Whether the app speaks HTTP/2 (learnt on the first HTTP/2 request).
    pub protocols: protocol::Protocols,
    pub builder: auto::Builder<TokioExecutor>,
}

impl Context {
    fn error(&self, e: &ProxyError, is_grpc: bool) -> InboundResponse {
        self.metrics.proxy_error(e.code());
        debug!(error = %e, "inbound: answered with a sidecar error");
        if is_grpc {
            e.to_grpc_response(ResponseBody::empty())
        } else {
            e.to_response(ResponseBody::full)
        }
    }

    pub(super) fn app_failed(&self, cause: String) -> ProxyError {
        ProxyError::UpstreamFailed { service: self.identity.service().clone(), attempts: 1, cause }
    }
}

/// Answers one inbound request: refused, shed, or forwarded to the app.
pub(super) async fn handle(ctx: &Context, caller: &Caller, req: Request<Incoming>) -> InboundResponse {
    let is_grpc = grpc::is_grpc(req.headers());
    if !caller.allowed {
        caller.counters.not_allowed.inc();
        let e =
            ProxyError::NotAllowed { caller: caller.service.clone(), callee: ctx.identity.service().clone() };
        return ctx.error(&e, is_grpc);
    }
    let guard = ctx.app.begin_timed(false);
    if ctx.app.state.in_flight() > ctx.config.max_concurrency {
        drop(guard);
        caller.counters.overloaded.inc();
        return ctx.error(&ProxyError::Overloaded("too many requests in flight to the app"), is_grpc);
    }
    caller.counters.allowed.inc();
    let result = if upgrade::is_upgrade(&req) {
        // Boxed: an upgrade's state is not carried by every request.
        Box::pin(upgrade::forward(ctx, caller, req, guard)).await
    } else {
        forward(ctx, caller, req, guard).await
    };
    result.unwrap_or_else(|e| ctx.error(&e, is_grpc))
}

/// Drops hop-by-hop headers, names the target if HTTP/2 gave only
/// `:authority`, and sets `x-trellis-caller` (removing what the caller sent).
pub(super) fn app_headers(parts: &mut http::request::Parts, caller: &Caller) {
    headers::strip_hop_by_hop(&mut parts.headers);
    ensure_host(parts);
    parts.headers.remove(&CALLER_HEADER);
    parts.headers.insert(CALLER_HEADER.clone(), caller.header.clone());
}

async fn forward(
    ctx: &Context,
    caller: &Caller,
    req: Request<Incoming>,
    guard: InFlight,
) -> Result<InboundResponse, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let wants_trailers = parts
        .headers
        .get_all(TE)
        .iter()
        .any(|v| v.to_str().unwrap_or("").split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")));
    app_headers(&mut parts, caller);
    let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    // Nothing is retried here, so nothing of the body is kept.
    let body = ReplayBody::new(body, 0);
    let app = &ctx.app;
    let h2 = parts.version == Version::HTTP_2
        && ctx.protocols.speaks_h2(&app.authority, ctx.config.connect_timeout).await;
    let mut up = Request::new(body);
    *up.method_mut() = parts.method;
    *up.headers_mut() = parts.headers;
    if h2 {
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = app.uri_authority.clone();
        uri.path_and_query = Some(path);
        *up.uri_mut() = Uri::from_parts(uri).map_err(|e| ctx.app_failed(format!("the app's URI: {e}")))?;
        *up.version_mut() = Version::HTTP_2;
        if wants_trailers {
            up.headers_mut().insert(TE, HeaderValue::from_static("trailers"));
        }
        let resp = ctx.h2.request(up).await.map_err(|e| ctx.app_failed(cause::chain(&e)))?;
        return Ok(relay(resp, guard, None));
    }
    // hyper's HTTP/1.1 client writes the URI as given: origin-form.
    *up.uri_mut() = Uri::from(path);
    *up.version_mut() = Version::HTTP_11;
    loop {
        let (tx, reused) = match ctx.pool.checkout(&app.authority) {
            Some(tx) => (tx, true),
            None => (
                // Boxed: a new connection's state is not carried by every request.
                Box::pin(ctx.pool.connect_plain(&app.authority))
                    .await
                    .map_err(|(_, cause)| ctx.app_failed(cause))?,
                false,
            ),
        };
        match ctx.pool.send_on(&app.authority, tx, reused, up).await {
            Ok((resp, checkin)) => return Ok(relay(resp, guard, Some(checkin))),
            // A pooled connection the app had closed: the request was not sent.
            Err(SendOnError::Stale(back)) => up = *back,
            Err(SendOnError::Send(e)) => return Err(ctx.app_failed(cause::chain(&*e))),
        }
    }
}

/// The app's answer as relayed: hop-by-hop headers dropped, the in-flight
/// guard (and the pooled connection) in the body.
pub(super) fn relay(resp: Response<Incoming>, guard: InFlight, conn: Option<Checkin>) -> InboundResponse {
    let mut resp = resp.map(|b| ResponseBody::upstream(b, guard, conn));
    headers::strip_hop_by_hop(resp.headers_mut());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::returned_size;

    /// As on the outbound side: hyper moves the future per request, so the
    /// rare paths are boxed where they start (5,100 bytes before, 2,100 after).
    #[test]
    fn a_request_future_stays_small() {
        let size = returned_size::<&'static Context, &'static Caller, Request<Incoming>, _>(handle);
        println!("inbound request future: {size} bytes");
        assert!(size <= 4 * 1024, "{size} bytes");
    }
}
