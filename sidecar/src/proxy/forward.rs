//! One request's attempts over HTTP/1.1 (pooled) or HTTP/2 (multiplexed):
//! build each attempt's request, send it, classify what came back, and either
//! relay the answer or let [`Attempts`] decide on another attempt.
//!
//! What each outcome means (the rules in [`super`]): an answer other than
//! 502/503/504 is relayed and counts as a success; a refused or failed connect
//! was not sent and may go elsewhere whatever the method; a reset, a per-try
//! timeout or a gateway status may be re-sent only for idempotent methods with
//! a replayable body; a client abandoning its own upload is its own fault.

use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::debug;

use super::attempts::Attempts;
use super::connect::{self, Connected, NotConnected};
use super::pool::{Checkin, SendError, SendOnError};
use super::{cause, grpc, headers, ProxyContext, ProxyResponse, ReplayBody, ResponseBody};
use crate::balance::Pick;
use crate::endpoints::{Endpoint, EndpointSet, InFlight, ServiceEndpoints, ServicePolicy};
use crate::error::ProxyError;
use crate::hedge::Hedge;
use crate::outlier::Outcome;
use crate::retry::{is_idempotent, may_retry, Failure};

/// Result of one attempt that did not end the request by itself.
enum Attempt {
    /// A 502/503/504 from the endpoint: relayed if no retry follows.
    Response(Response<Incoming>),
    Failed {
        failure: Failure,
        cause: String,
    },
}

pub(super) async fn forward(
    ctx: &ProxyContext,
    svc: &ServiceEndpoints,
    policy: &ServicePolicy,
    set: &EndpointSet,
    req: Request<Incoming>,
    start: Instant,
) -> Result<ProxyResponse, ProxyError> {
    let config = &ctx.config;
    // A gRPC client's own deadline bounds the call when it is the shorter one.
    let timeout =
        grpc::timeout(req.headers()).map_or(config.overall_timeout, |t| t.min(config.overall_timeout));
    let mut attempts = Attempts::new(config, svc, policy, set, start, timeout);
    let deadline = attempts.deadline();
    let (mut parts, body) = req.into_parts();
    let wants_trailers = parts
        .headers
        .get_all(http::header::TE)
        .iter()
        .any(|v| v.to_str().unwrap_or("").split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")));
    let downstream_h2 = parts.version == Version::HTTP_2;
    headers::strip_hop_by_hop(&mut parts.headers);
    ensure_host(&mut parts);
    let idempotent = is_idempotent(&parts.method);
    let body = ReplayBody::new(body, config.replay_buffer_bytes);
    let path = parts.uri.path_and_query().cloned();

    // No timer of its own for the overall timeout: each attempt's timer ends
    // at the deadline at the latest, and so does each backoff.
    loop {
        let pick = attempts.next()?;
        let ep = pick.endpoint;
        let guard = ctx.begin(ep);
        let h2 = ep.metadata.get("protocol").is_some_and(|p| p == "h2c")
            // A mesh endpoint's sidecar speaks both, and ALPN settles it: no probe.
            || (downstream_h2 && ep.mesh_tls.is_some())
            || (downstream_h2 && {
                let probe = ctx.protocols.speaks_h2(&ep.authority, config.connect_timeout);
                match tokio::time::timeout_at(deadline, probe).await {
                    Ok(h2) => h2,
                    Err(_) => return Err(attempts.timed_out(timeout)),
                }
            });
        let uri = if h2 {
            upstream_uri(ep, path.as_ref())
        } else {
            // hyper's HTTP/1.1 client writes the URI as given: origin-form.
            ep.uri_authority.as_ref().map(|_| Uri::from(path.clone().unwrap_or_else(root)))
        };
        let uri = uri.ok_or_else(|| {
            attempts.exhausted(format!("endpoint authority {:?} is not valid in a URI", ep.authority))
        })?;
        let mut up = Request::new(body.retry());
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        // A copy of the headers only when a later attempt may need them
        // after this one consumed its own: the HTTP/1.1 pool hands them
        // back when it could not connect (the only retry a non-idempotent
        // request gets there); HTTP/2 does not.
        let keep_copy = attempts.has_more() && (idempotent || h2);
        *up.headers_mut() =
            if keep_copy { parts.headers.clone() } else { std::mem::take(&mut parts.headers) };
        // Whether `parts.headers` still holds the headers for a retry.
        let mut have_headers = keep_copy;
        if h2 {
            *up.version_mut() = Version::HTTP_2;
            if wants_trailers {
                up.headers_mut().insert(http::header::TE, http::HeaderValue::from_static("trailers"));
            }
        } else {
            *up.version_mut() = Version::HTTP_11;
        }

        // A protocol probe may have taken a while.
        let sent_at = if downstream_h2 { Instant::now() } else { pick.at };
        let per_try = config.per_try_timeout.min(deadline.saturating_duration_since(sent_at));
        let mut conn = None;
        let attempt_end = sent_at + per_try;
        let (mut pick, guard, sent) = if h2 {
            let sent = tokio::time::timeout_at(attempt_end, send_h2(ctx, ep, up)).await.map_err(|_| TimedOut);
            (pick, guard, sent)
        } else {
            let hedge_after = policy
                .hedge
                .as_ref()
                .and_then(Hedge::delay)
                .filter(|_| idempotent && body.is_empty() && attempts.has_more());
            match hedge_after {
                None => send_h1(ctx, Some(&mut attempts), pick, guard, up, attempt_end).await,
                // Boxed: two attempts' state, carried only by hedged requests.
                Some(after) => {
                    Box::pin(hedged(ctx, &mut attempts, pick, guard, up, attempt_end, after)).await
                }
            }
        };
        // A hedged connect may have moved the attempt to another endpoint.
        let ep = pick.endpoint;
        let result = match sent {
            Ok(Ok((resp, checkin))) => match resp.status() {
                StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => {
                    conn = checkin;
                    attempts.failed(&mut pick, Outcome::Failure);
                    Attempt::Response(resp)
                }
                // A small answer to a request that could still go elsewhere is
                // read whole before anything is relayed: an endpoint killed
                // between its headers and its body then costs a retry, not a
                // response cut short (headers, once relayed, cannot be taken back).
                _ if !h2
                    && have_headers
                    && attempts.has_more()
                    && may_retry(Failure::Reset, idempotent, body.is_replayable())
                    && is_small(&resp, config.replay_buffer_bytes) =>
                {
                    match read_whole(resp, checkin, attempt_end).await {
                        Ok(resp) => {
                            attempts.succeeded(&mut pick);
                            if let Some(hedge) = &policy.hedge {
                                hedge.observe(sent_at.elapsed());
                            }
                            drop(guard);
                            debug!(service = %svc.name, instance = %ep.id, status = resp.status().as_u16(), attempt = attempts.made(), "proxied");
                            return Ok(resp);
                        }
                        Err(cause) => {
                            attempts.failed(&mut pick, Outcome::Failure);
                            Attempt::Failed {
                                failure: Failure::Reset,
                                cause: format!("{}: {cause}", ep.authority),
                            }
                        }
                    }
                }
                _ => {
                    attempts.succeeded(&mut pick);
                    if let Some(hedge) = &policy.hedge {
                        hedge.observe(sent_at.elapsed());
                    }
                    let resp = relay(resp, guard, policy, checkin);
                    debug!(service = %svc.name, instance = %ep.id, status = resp.status().as_u16(), attempt = attempts.made(), "proxied");
                    return Ok(resp);
                }
            },
            Ok(Err(SendError::Connect { refused, cause, headers })) => {
                if let Some(h) = headers.filter(|_| !have_headers) {
                    parts.headers = h;
                    have_headers = true;
                }
                attempts.failed(&mut pick, if refused { Outcome::Refused } else { Outcome::Failure });
                Attempt::Failed { failure: Failure::NotSent, cause: format!("{}: {cause}", ep.authority) }
            }
            Ok(Err(SendError::Send(e))) => sent_failure(&attempts, &mut pick, &*e)?,
            Err(TimedOut) => {
                attempts.failed(&mut pick, Outcome::Failure);
                Attempt::Failed {
                    failure: Failure::PerTryTimeout,
                    cause: format!("no response headers within {per_try:?}"),
                }
            }
        };
        let failure = match &result {
            Attempt::Response(_) => Failure::GatewayStatus,
            Attempt::Failed { failure, .. } => *failure,
        };
        let index = pick.index;
        drop(pick);

        if !attempts.may_retry(have_headers && may_retry(failure, idempotent, body.is_replayable())) {
            return match result {
                Attempt::Response(resp) => Ok(relay(resp, guard, policy, conn)),
                Attempt::Failed { failure: Failure::PerTryTimeout, .. } => {
                    Err(attempts.timed_out(start.elapsed()))
                }
                Attempt::Failed { cause, .. } => Err(attempts.exhausted(cause)),
            };
        }
        drop(result);
        drop(conn);
        drop(guard);
        debug!(service = %svc.name, instance = %ep.id, ?failure, attempt = attempts.made(), "retrying");
        attempts.back_off(index).await;
    }
}

fn root() -> PathAndQuery {
    PathAndQuery::from_static("/")
}

fn upstream_uri(ep: &Endpoint, path: Option<&PathAndQuery>) -> Option<Uri> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(if ep.mesh_tls.is_some() { Scheme::HTTPS } else { Scheme::HTTP });
    parts.authority = Some(ep.uri_authority.clone()?);
    parts.path_and_query = Some(path.cloned().unwrap_or_else(root));
    Uri::from_parts(parts).ok()
}

/// The attempt's time ran out before response headers.
struct TimedOut;

/// What sending one attempt gave: response headers (and, over HTTP/1.1, the
/// pooled connection the body gives back), or why not.
type Sent = Result<(Response<Incoming>, Option<Checkin>), SendError>;

/// Sends one attempt over HTTP/2 through hyper-util's client (one multiplexed
/// connection per endpoint), or to a mesh endpoint over its mutual-TLS
/// connection ([`super::mesh_h2`]).
async fn send_h2(ctx: &ProxyContext, ep: &Endpoint, up: Request<ReplayBody<Incoming>>) -> Sent {
    if ep.mesh_tls.is_some() {
        return ctx.mesh_h2.send(ep, up).await.map(|r| (r, None));
    }
    match ctx.h2_client.request(up).await {
        Ok(r) => Ok((r, None)),
        Err(e) if e.is_connect() => {
            Err(SendError::Connect { refused: cause::is_refused(&e), cause: cause::chain(&e), headers: None })
        }
        Err(e) => Err(SendError::Send(Box::new(e))),
    }
}

/// Sends one attempt over HTTP/1.1 on an idle pooled connection, else a new
/// one from [`connect`] (which may hedge to another endpoint: the pick and
/// guard returned are the ones the attempt ended on), until `end`. An idle
/// connection found closed is replaced, since the request never left on it.
async fn send_h1<'a>(
    ctx: &ProxyContext,
    mut attempts: Option<&mut Attempts<'a>>,
    mut pick: Pick<'a>,
    mut guard: InFlight,
    mut up: Request<ReplayBody<Incoming>>,
    end: Instant,
) -> (Pick<'a>, InFlight, Result<Sent, TimedOut>) {
    loop {
        let (on, held, tx, reused) = match ctx.pool.checkout(&pick.endpoint.pool_key) {
            Some(tx) => (pick, guard, tx, true),
            // A new connection (TCP and TLS handshakes, hedges) is the rare
            // path: boxed, so a request served from the pool does not carry
            // its state (see `route`'s test of the request future's size).
            None => match Box::pin(connect::connect(ctx, attempts.as_deref_mut(), pick, guard, end)).await {
                Ok(Connected { pick, guard, tx }) => (pick, guard, tx, false),
                Err(NotConnected { pick, guard, timed_out: true, .. }) => {
                    return (pick, guard, Err(TimedOut))
                }
                Err(NotConnected { pick, guard, refused, cause, .. }) => {
                    // Nothing was sent: the headers come back for a retry.
                    let headers = Some(up.into_parts().0.headers);
                    return (pick, guard, Ok(Err(SendError::Connect { refused, cause, headers })));
                }
            },
        };
        let sent =
            tokio::time::timeout_at(end, ctx.pool.send_on(&on.endpoint.pool_key, tx, reused, up)).await;
        match sent {
            Err(_) => return (on, held, Err(TimedOut)),
            Ok(Ok((resp, checkin))) => return (on, held, Ok(Ok((resp, Some(checkin))))),
            Ok(Err(SendOnError::Send(e))) => return (on, held, Ok(Err(SendError::Send(e)))),
            Ok(Err(SendOnError::Stale(back))) => {
                up = *back;
                pick = on;
                guard = held;
            }
        }
    }
}

/// What one HTTP/1.1 attempt ended with: the endpoint, its in-flight guard, and the result.
type Ended<'a> = (Pick<'a>, InFlight, Result<Sent, TimedOut>);

/// Sends an attempt over HTTP/1.1 and, if its answer has not started after
/// `after`, the same request to another endpoint too (see [`crate::hedge`]):
/// the first answer wins and the other attempt is cancelled by dropping it.
/// Only for idempotent requests without a body, so both may be sent in full.
#[allow(clippy::too_many_arguments)]
async fn hedged<'a>(
    ctx: &ProxyContext,
    attempts: &mut Attempts<'a>,
    pick: Pick<'a>,
    guard: InFlight,
    up: Request<ReplayBody<Incoming>>,
    end: Instant,
    after: std::time::Duration,
) -> Ended<'a> {
    let mut copy = Request::new(up.body().retry());
    *copy.method_mut() = up.method().clone();
    *copy.uri_mut() = up.uri().clone();
    *copy.version_mut() = up.version();
    *copy.headers_mut() = up.headers().clone();
    let (index, late, late_via, late_at) = (pick.index, pick.endpoint, pick.via, pick.at);
    let first = send_h1(ctx, None, pick, guard, up, end);
    tokio::pin!(first);
    let hedge_at = Instant::now() + after;
    if hedge_at >= end {
        return first.await;
    }
    if let Ok(ended) = tokio::time::timeout_at(hedge_at, &mut first).await {
        return ended;
    }
    let Some(alt) = attempts.alternative_to(index) else {
        return first.await;
    };
    if !attempts.may_hedge() {
        return first.await;
    }
    late.state.outlier.mark_suspect(Instant::now());
    debug!(late = %late.authority, hedge = %alt.endpoint.authority, "answer late; hedging");
    let alt_guard = ctx.begin(alt.endpoint);
    let second = send_h1(ctx, None, alt, alt_guard, copy, end);
    tokio::pin!(second);
    let answered = |e: &Ended<'a>| matches!(e.2, Ok(Ok(_)));
    let (mut first_ended, mut second_ended): (Option<Ended<'a>>, Option<Ended<'a>>) = (None, None);
    loop {
        tokio::select! {
            e = &mut first, if first_ended.is_none() => {
                if answered(&e) {
                    blame(attempts, second_ended.take());
                    return e;
                }
                first_ended = Some(e);
            }
            e = &mut second, if second_ended.is_none() => {
                if answered(&e) {
                    match first_ended.take() {
                        // Still waiting after the hedge answered: cancelled, and counted as slow.
                        None => attempts.lost_to_hedge(late, late_via, late_at),
                        ended => blame(attempts, ended),
                    }
                    return e;
                }
                second_ended = Some(e);
            }
        }
        if let (Some(_), Some(_)) = (&first_ended, &second_ended) {
            // Neither answered: the hedge's failure is recorded here, the
            // first attempt's by the caller, which may retry.
            blame(attempts, second_ended.take());
            if let Some(e) = first_ended.take() {
                return e;
            }
        }
    }
}

/// Records a losing hedge's failure on its endpoint.
fn blame(attempts: &Attempts<'_>, ended: Option<Ended<'_>>) {
    if let Some((mut pick, _, result)) = ended {
        let refused = matches!(result, Ok(Err(SendError::Connect { refused: true, .. })));
        attempts.failed(&mut pick, if refused { Outcome::Refused } else { Outcome::Failure });
    }
}

/// The outcome of an attempt that failed once the request may have been sent.
fn sent_failure(
    attempts: &Attempts<'_>,
    pick: &mut Pick<'_>,
    e: &(dyn std::error::Error + 'static),
) -> Result<Attempt, ProxyError> {
    if cause::is_client_body_error(e) && !cause::is_refused_stream(e) {
        // The client's own body failed (it went away mid-upload): not the
        // endpoint's fault, and nothing left to send.
        return Err(ProxyError::BadRequest(format!(
            "the request body could not be read: {}",
            cause::chain(e)
        )));
    }
    attempts.failed(pick, Outcome::Failure);
    // A refused HTTP/2 stream: overloaded, not broken; it counts towards
    // ejection like a gateway error, and is safe to send elsewhere.
    let failure = if cause::is_refused_stream(e) { Failure::NotSent } else { Failure::Reset };
    Ok(Attempt::Failed { failure, cause: format!("{}: {}", pick.endpoint.authority, cause::chain(e)) })
}

/// An answer whose body is announced and at most `limit` bytes (a
/// `Content-Length`, no gRPC).
fn is_small(resp: &Response<Incoming>, limit: usize) -> bool {
    resp.headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|n| n <= limit)
        && !grpc::is_grpc(resp.headers())
}

/// Reads `resp`'s body to the end (by `end`) and returns the answer to relay,
/// hop-by-hop headers dropped; the connection goes back to the pool at once.
async fn read_whole(
    resp: Response<Incoming>,
    checkin: Option<Checkin>,
    end: Instant,
) -> Result<ProxyResponse, String> {
    let (mut parts, incoming) = resp.into_parts();
    let data = match tokio::time::timeout_at(end, incoming.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => return Err(format!("the answer's body failed: {}", cause::chain(&e))),
        Err(_) => return Err("the answer's body did not arrive in time".into()),
    };
    if let Some(mut c) = checkin {
        c.release();
    }
    headers::strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, ResponseBody::full(data)))
}

/// Absolute-form or HTTP/2 without Host: the upstream sees the service name
/// it was addressed by, not the endpoint's address.
pub(crate) fn ensure_host(parts: &mut http::request::Parts) {
    if !parts.headers.contains_key(http::header::HOST) {
        if let Some(a) = parts.uri.authority() {
            if let Ok(v) = http::HeaderValue::from_str(a.as_str()) {
                parts.headers.insert(http::header::HOST, v);
            }
        }
    }
}

/// An endpoint's response as relayed to the client: hop-by-hop headers
/// dropped, the in-flight guard in the body, and gRPC's status counted (now
/// for a trailers-only answer, else when the trailers pass).
pub(super) fn relay(
    resp: Response<Incoming>,
    guard: InFlight,
    policy: &ServicePolicy,
    conn: Option<Checkin>,
) -> ProxyResponse {
    let grpc = grpc::is_grpc(resp.headers());
    let mut resp = match resp.headers().get("grpc-status") {
        Some(status) if grpc => {
            policy.metrics.grpc.record(Some(status.as_bytes()));
            resp.map(|b| ResponseBody::upstream(b, guard, conn))
        }
        _ if grpc => resp.map(|b| {
            ResponseBody::upstream_grpc(b, guard, std::sync::Arc::clone(&policy.metrics.grpc), conn)
        }),
        _ => resp.map(|b| ResponseBody::upstream(b, guard, conn)),
    };
    headers::strip_hop_by_hop(resp.headers_mut());
    resp
}
