//! The admin listener (localhost by default): `/ready`, `/metrics`, `/endpoints`.
//!
//! - `GET /ready`: 200 when the outbound proxy listens, the mesh certificate
//!   is installed (with `--mtls`) and, if a service is configured, the app is
//!   registered; 503 otherwise and while shutting down.
//! - `GET /metrics`: Prometheus text; endpoint gauges are refreshed from the
//!   directory at scrape time.
//! - `GET /endpoints`: JSON, every known upstream endpoint with its zone,
//!   in-flight count, outlier state, ejection count and registry health, and
//!   per service whether too few instances are healthy (`health_panic`) and whether zone-aware routing sends its requests to other zones
//!   (`remote_zones_in_use`, with `zone_routing` saying why; absent while
//!   zone-aware routing does not apply).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::debug;
use trellis_shared::{accept, ErrorBody, ErrorCode};

use crate::discovery::{ConnectivitySink, Directory, Watcher};
use crate::identity::MeshIdentity;
use crate::metrics::Metrics;

/// Most admin connections served at once; the admin port is for probes and scrapes.
const MAX_ADMIN_CONNECTIONS: usize = 64;

impl ConnectivitySink for Metrics {
    fn report(&self, ok: bool) {
        self.set_registry_up(ok);
        if !ok {
            self.registry_error();
        }
    }
    fn auth_refused(&self) {
        self.registry_auth_failure();
    }
    fn endpoint_refused(&self, reason: crate::refuse::RefuseReason) {
        Metrics::endpoint_refused(self, reason.as_str());
    }
}

/// What `/ready` answers from.
#[derive(Debug)]
pub struct Readiness {
    /// `Some` when a service is configured: its registration state.
    registered: Option<watch::Receiver<bool>>,
    /// `Some` with `--mtls`: ready once it holds a certificate.
    identity: Option<MeshIdentity>,
    proxy_listening: AtomicBool,
    shutting_down: AtomicBool,
}

impl Readiness {
    pub fn new(registered: Option<watch::Receiver<bool>>) -> Self {
        Readiness {
            registered,
            identity: None,
            proxy_listening: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// The same readiness, also waiting for `identity`'s first certificate.
    pub fn with_identity(self, identity: Option<MeshIdentity>) -> Self {
        Readiness { identity, ..self }
    }

    pub fn set_proxy_listening(&self) {
        self.proxy_listening.store(true, Ordering::Release);
    }

    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// `Ok` when ready, else why not.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err("shutting down");
        }
        if !self.proxy_listening.load(Ordering::Acquire) {
            return Err("outbound proxy not listening yet");
        }
        if self.identity.as_ref().is_some_and(|i| i.not_after().is_none()) {
            return Err("no mesh certificate yet");
        }
        match &self.registered {
            Some(r) if !*r.borrow() => Err("app not registered yet"),
            _ => Ok(()),
        }
    }
}

/// Shared state of the admin handlers.
pub struct Admin<W: Watcher> {
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
    pub directory: Arc<Directory<W>>,
    /// The mesh identity, with `--mtls`: its expiry is a metric.
    pub identity: Option<MeshIdentity>,
}

#[derive(Serialize)]
struct EndpointsBody {
    services: Vec<ServiceBody>,
}

#[derive(Serialize)]
struct ServiceBody {
    service: String,
    resolved: bool,
    index: u64,
    epoch: String,
    /// Too few instances are healthy: critical ones are routed to as well.
    health_panic: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_zones_in_use: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    zone_routing: Option<&'static str>,
    endpoints: Vec<EndpointBody>,
}

#[derive(Serialize)]
struct EndpointBody {
    id: String,
    address: String,
    port: u16,
    weight: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    zone: Option<String>,
    in_flight: usize,
    state: &'static str,
    ejections: u32,
    /// The registry's word: `passing`, `warning` or (in a health panic only) `critical`.
    health: &'static str,
    /// Reached over mutual TLS, proving the service's identity.
    mesh_tls: bool,
}

impl<W: Watcher> Admin<W> {
    fn endpoints(&self) -> EndpointsBody {
        let services = self
            .directory
            .services()
            .into_iter()
            .map(|s| {
                let set = s.load();
                let endpoints = set
                    .endpoints
                    .iter()
                    .map(|e| {
                        let (state, ejections) = e.state.outlier.describe();
                        EndpointBody {
                            id: e.id.to_string(),
                            address: e.host.to_string(),
                            port: e.port,
                            weight: e.weight,
                            zone: e.zone.as_ref().map(|z| z.to_string()),
                            in_flight: e.state.in_flight(),
                            state,
                            ejections,
                            health: e.health.as_str(),
                            mesh_tls: e.mesh_tls.is_some(),
                        }
                    })
                    .collect();
                let routing =
                    s.policy_if_made().map(|p| p.zone.routing()).filter(|r| *r != crate::zone::Routing::Off);
                ServiceBody {
                    remote_zones_in_use: routing.map(|r| r.remote_in_use()),
                    zone_routing: routing.map(|r| r.name()),
                    service: s.name.to_string(),
                    resolved: s.is_resolved(),
                    index: set.index,
                    epoch: set.epoch.clone(),
                    health_panic: set.health_panic,
                    endpoints,
                }
            })
            .collect();
        EndpointsBody { services }
    }

    fn metrics_text(&self) -> String {
        if let Some(identity) = &self.identity {
            self.metrics.identity.set_expiry(identity.not_after());
        }
        self.metrics.clear_endpoints();
        for s in self.directory.services() {
            let set = s.load();
            let mut counts: Vec<(&'static str, i64)> = Vec::new();
            for e in &set.endpoints {
                let (state, _) = e.state.outlier.describe();
                match counts.iter_mut().find(|(n, _)| *n == state) {
                    Some((_, c)) => *c += 1,
                    None => counts.push((state, 1)),
                }
            }
            for (state, n) in counts {
                self.metrics.set_endpoints(s.name.as_str(), state, n);
            }
            // Services that resolved to nothing (junk Host names among them) get no series.
            if !set.endpoints.is_empty() {
                self.metrics.set_health_panic(s.name.as_str(), set.health_panic);
            }
        }
        self.metrics.encode()
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        debug!(method = %req.method(), path = req.uri().path(), "admin request");
        let path = req.uri().path();
        if !matches!(path, "/ready" | "/metrics" | "/endpoints") {
            return error(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such admin route");
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::MethodNotAllowed,
                "admin routes answer GET",
            );
        }
        match path {
            "/ready" => match self.readiness.check() {
                Ok(()) => text(StatusCode::OK, "text/plain; charset=utf-8", "ready\n"),
                Err(why) => {
                    text(StatusCode::SERVICE_UNAVAILABLE, "text/plain; charset=utf-8", format!("{why}\n"))
                }
            },
            "/metrics" => text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics_text(),
            ),
            _ => match serde_json::to_vec(&self.endpoints()) {
                Ok(body) => text(StatusCode::OK, "application/json", body),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, &e.to_string()),
            },
        }
    }
}

fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    resp
}

fn error(status: StatusCode, code: ErrorCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&ErrorBody::new(code, message)).unwrap_or_default();
    text(status, "application/json", body)
}

/// Serves the admin routes until `shutdown`.
pub async fn serve<W: Watcher>(listener: TcpListener, admin: Arc<Admin<W>>, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let Some((stream, peer)) = accept::next(&listener, shutdown.cancelled(), "admin").await else {
            return;
        };
        let admin = Arc::clone(&admin);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let resp = admin.handle(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(peer = %peer, error = %e, "admin connection ended") },
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), conn).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_the_proxy_and_the_registration() {
        let (tx, rx) = watch::channel(false);
        let r = Readiness::new(Some(rx));
        assert!(r.check().is_err());
        r.set_proxy_listening();
        assert_eq!(r.check(), Err("app not registered yet"));
        tx.send_replace(true);
        assert_eq!(r.check(), Ok(()));
        r.set_shutting_down();
        assert_eq!(r.check(), Err("shutting down"));

        let proxy_only = Readiness::new(None);
        proxy_only.set_proxy_listening();
        assert_eq!(proxy_only.check(), Ok(()));
    }
}
