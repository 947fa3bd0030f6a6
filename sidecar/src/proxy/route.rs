//! From a request to its service: the cap on requests waiting for response
//! headers, the target service (dedicated port, absolute URI, `:authority` or
//! Host), its endpoints (waiting for a first discovery answer at most
//! `discovery_wait`), then [`forward`] or [`upgrade`], and the per-service
//! request metrics (every answer once a request has found the service's
//! endpoints, its own `no_endpoints` included). Every sidecar-made answer leaves through
//! [`ProxyContext::error`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::Request;
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::debug;
use trellis_shared::ServiceName;

use super::{forward, grpc, headers, upgrade, ProxyContext, ProxyResponse, ResponseBody};
use crate::endpoints::ServicePolicy;
use crate::error::ProxyError;
use crate::hedge::Hedge;
use crate::retry::RetryBudget;
use crate::zone::ZoneState;

/// Counts a request as pending until dropped.
struct Pending<'a>(&'a AtomicUsize);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(super) async fn handle(
    ctx: Arc<ProxyContext>,
    req: Request<Incoming>,
    target: Option<&ServiceName>,
) -> ProxyResponse {
    let start = Instant::now();
    let is_grpc = grpc::is_grpc(req.headers());
    if ctx.pending.fetch_add(1, Ordering::Relaxed) >= ctx.config.max_pending_requests {
        ctx.pending.fetch_sub(1, Ordering::Relaxed);
        return ctx.error(&ProxyError::Overloaded("too many pending requests"), is_grpc);
    }
    let _pending = Pending(&ctx.pending);
    match route(&ctx, req, start, target).await {
        Ok(resp) => resp,
        Err(e) => ctx.error(&e, is_grpc),
    }
}

impl ProxyContext {
    fn error(&self, e: &ProxyError, is_grpc: bool) -> ProxyResponse {
        self.metrics.proxy_error(e.code());
        debug!(error = %e, "answered with a sidecar error");
        if is_grpc {
            e.to_grpc_response(ResponseBody::empty())
        } else {
            e.to_response(ResponseBody::full)
        }
    }
}

async fn route(
    ctx: &ProxyContext,
    mut req: Request<Incoming>,
    start: Instant,
    target: Option<&ServiceName>,
) -> Result<ProxyResponse, ProxyError> {
    if req.method() == http::Method::CONNECT {
        return Err(ProxyError::BadRequest(
            "CONNECT is not supported: send plain HTTP through the sidecar".into(),
        ));
    }
    let name = match target {
        Some(name) => {
            // A dedicated port: the upstream sees the service name, not the local address.
            if let Ok(v) = http::HeaderValue::from_str(name.as_str()) {
                req.headers_mut().insert(http::header::HOST, v);
            }
            name.clone()
        }
        None => headers::target_service(&req)?,
    };
    let svc = ctx
        .resolver
        .resolve(&name)
        .ok_or(ProxyError::Overloaded("too many upstream services are watched"))?;
    if !svc.is_resolved() && !svc.wait_resolved(ctx.config.discovery_wait).await {
        return Err(ProxyError::NoEndpoints(name));
    }
    let set = svc.load();
    let result = if set.endpoints.is_empty() {
        Err(ProxyError::NoEndpoints(name))
    } else {
        let policy = svc.policy(|| {
            let metrics = ctx.metrics.service(svc.name.as_str());
            let zone = ZoneState::new(svc.name.clone(), metrics.zone.clone());
            let hedge =
                ctx.config.hedges.iter().find(|(name, _)| *name == svc.name).map(|(_, d)| Hedge::new(*d));
            ServicePolicy { budget: RetryBudget::new(&ctx.config.retry), metrics, zone, hedge }
        });
        if upgrade::is_upgrade(&req) {
            // Boxed: an upgrade's state (its own connection) is not carried by every request.
            Box::pin(upgrade::forward(ctx, &svc, policy, &set, req, start)).await
        } else {
            forward::forward(ctx, &svc, policy, &set, req, start).await
        }
    };
    // The policy exists once a request has found the service's endpoints: a
    // service that lost them all is in an outage its request metrics must
    // show; one that never had any (a junk Host, a service not deployed yet)
    // gets no series.
    if let Some(policy) = svc.policy_if_made() {
        let status = match &result {
            Ok(resp) => resp.status(),
            Err(e) => e.status(),
        };
        policy.metrics.request(status.as_u16(), start.elapsed().as_secs_f64());
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::returned_size;

    /// hyper moves each request's future into its connection state, and the
    /// move copies the whole future whatever state it is in: the rare paths
    /// (new connections, their TLS handshakes, hedges, upgrades) are boxed
    /// where they start so they do not make every request copy their state
    /// (14,800 bytes before, about 5,200 after; the copy was about 1.5 % of
    /// the client sidecar's CPU in case 7).
    #[test]
    fn a_request_future_stays_small() {
        let size =
            returned_size::<Arc<ProxyContext>, Request<Incoming>, Option<&'static ServiceName>, _>(handle);
        println!("outbound request future: {size} bytes");
        assert!(size <= 8 * 1024, "{size} bytes");
    }
}
