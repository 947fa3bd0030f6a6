//! [`ApiService`]: the one entry of every request to the registry.
//!
//! It names the route once ([`route_of`]), serves heartbeats itself and
//! everything else through the axum router, flags answers served from a copy
//! the store cannot refresh, and records every request's duration by route and
//! status and its debug line, here and nowhere else.
//!
//! Heartbeats are most of a registry's requests: the router's dispatch,
//! middleware and extractors (a copy of the header map, owned path strings)
//! were about a tenth of the registry's CPU per heartbeat, so a heartbeat
//! whose path needs no decoding and whose names are valid is served directly
//! with the same checks and errors. Escaped paths and invalid names go through
//! the router, which decodes them and words the error.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Request};
use axum::response::Response;
use axum::Router;
use tower::ServiceExt;
use trellis_shared::{InstanceId, ServiceName, STALE_HEADER};

use super::body_timeout::TimedBody;
use super::handlers::{heartbeat, router};
use super::route::{heartbeat_path, route_of};
use super::ApiState;
use crate::metrics::{RequestLabels, Route};
use crate::store::Store;

/// The registry's API over one store. Clones are cheap (two `Arc`s).
pub struct ApiService<S> {
    state: Arc<ApiState<S>>,
    router: Router,
}

impl<S> Clone for ApiService<S> {
    fn clone(&self) -> Self {
        ApiService { state: self.state.clone(), router: self.router.clone() }
    }
}

impl<S: Store> ApiService<S> {
    pub fn new(state: ApiState<S>) -> Self {
        let state = Arc::new(state);
        ApiService { router: router(state.clone()), state }
    }

    /// Serves one request.
    pub async fn call<B>(&self, req: Request<B>) -> Response
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = tokio::time::Instant::now();
        let method = req.method().clone();
        let route = route_of(&method, req.uri().path(), req.uri().query());
        let plain = match route {
            Route::Heartbeat => plain_heartbeat(req.uri().path()),
            _ => None,
        };
        let mut resp = match plain {
            Some(names) => heartbeat(&self.state, names, req).await,
            None => match self.router.clone().oneshot(req.map(Body::new)).await {
                Ok(r) => r,
                Err(never) => match never {},
            },
        };
        let st = &self.state;
        if st.store.stale() && resp.status().is_success() {
            resp.headers_mut().insert(STALE_HEADER, HeaderValue::from_static("true"));
            st.metrics.etcd.stale_answers.inc();
        }
        let status = resp.status().as_u16();
        let elapsed = started.elapsed();
        st.metrics.requests.get_or_create(&RequestLabels { route, status }).observe(elapsed.as_secs_f64());
        tracing::debug!(route = route.as_str(), %method, status, elapsed_us = elapsed.as_micros() as u64, "request");
        resp
    }

    /// The service hyper serves on one connection from `peer`:
    /// [`ApiService::call`], which never fails (errors are answers). Each
    /// request carries the peer as a [`ClientAddr`] extension, so per-client
    /// limits and counters need no connection state of their own, and its
    /// body is bounded by `--body-timeout` ([`TimedBody`]).
    pub fn hyper_service(
        &self,
        peer: std::net::SocketAddr,
    ) -> impl hyper::service::Service<
        Request<hyper::body::Incoming>,
        Response = Response,
        Error = Infallible,
        Future = impl Future<Output = Result<Response, Infallible>> + Send,
    > + Clone {
        let api = self.clone();
        let client = ClientAddr(peer.ip());
        let body_timeout = self.state.config.connections.body_timeout;
        hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            let api = api.clone();
            req.extensions_mut().insert(client);
            let req = req.map(|body| TimedBody::new(body, body_timeout));
            async move { Ok(api.call(req).await) }
        })
    }
}

/// The address a request came from (its TCP peer), as a request extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub std::net::IpAddr);

/// The names of a heartbeat path the fast path can serve: no escapes, valid names.
fn plain_heartbeat(path: &str) -> Option<(ServiceName, InstanceId)> {
    let (service, id) = heartbeat_path(path)?;
    Some((ServiceName::new(service.to_string()).ok()?, InstanceId::new(id.to_string()).ok()?))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use axum::http::{header, Method, StatusCode};
    use http_body_util::Full;
    use tokio_util::sync::CancellationToken;
    use trellis_shared::{Address, HealthStatus, Instance, EPOCH_HEADER, INDEX_HEADER};

    use super::*;
    use crate::config::Config;
    use crate::metrics::{Metrics, StoreMetrics};
    use crate::store::{LeasedInstance, MemoryStore};
    use crate::watch::Watches;

    fn put(path: &str, body: &str) -> Request<Full<Bytes>> {
        Request::builder()
            .method(Method::PUT)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    }

    /// The one instance these tests heartbeat: `users/u1`.
    fn instance_u1() -> Instance {
        Instance {
            id: InstanceId::new("u1").unwrap(),
            address: Address::new("10.0.0.1").unwrap(),
            port: 80,
            zone: None,
            weight: 100,
            metadata: BTreeMap::new(),
            status: HealthStatus::Passing,
            output: String::new(),
            tags: Vec::new(),
            mesh_tls: false,
        }
    }

    #[tokio::test]
    async fn heartbeats_on_either_path_keep_the_checks_errors_and_metrics() {
        let store = Arc::new(MemoryStore::new(StoreMetrics::default()));
        let metrics = Arc::new(Metrics::new());
        let config = Config { max_body: 1024, ..Config::default() };
        let watches = Arc::new(Watches::new(10, CancellationToken::new(), metrics.clone()));
        let api = ApiService::new(ApiState::new(store.clone(), config, metrics.clone(), watches));
        let users = ServiceName::new("users").unwrap();
        let instance = instance_u1();
        store.register(&users, LeasedInstance { instance, ttl: Duration::from_secs(60) }).await.unwrap();
        let hb = "/v1/services/users/instances/u1/heartbeat";
        assert!(plain_heartbeat(hb).is_some(), "served on the fast path");
        let ok = api.call(put(hb, r#"{"status":"warning"}"#)).await;
        assert_eq!(ok.status(), StatusCode::NO_CONTENT);
        assert!(ok.headers().contains_key(INDEX_HEADER) && ok.headers().contains_key(EPOCH_HEADER));
        assert_eq!(store.snapshot(&users).instances()[0].status, HealthStatus::Warning);
        // An escaped path takes the router, with the same outcome.
        let escaped = "/v1/services/users/instances/%75%31/heartbeat";
        assert!(plain_heartbeat(escaped).is_none(), "served by the router");
        let ok = api.call(put(escaped, r#"{"status":"passing"}"#)).await;
        assert_eq!(ok.status(), StatusCode::NO_CONTENT);
        assert_eq!(store.snapshot(&users).instances()[0].status, HealthStatus::Passing);
        let cases = [
            (put(hb, &format!(r#"{{"output":"{}"}}"#, "a".repeat(2000))), StatusCode::PAYLOAD_TOO_LARGE),
            (put(escaped, &format!(r#"{{"output":"{}"}}"#, "a".repeat(2000))), StatusCode::PAYLOAD_TOO_LARGE),
            (put(hb, r#"{"status":"#), StatusCode::BAD_REQUEST),
            (put("/v1/services/users/instances/u9/heartbeat", ""), StatusCode::NOT_FOUND),
            (put("/v1/services/Users/instances/u1/heartbeat", ""), StatusCode::BAD_REQUEST),
        ];
        for (req, status) in cases {
            assert_eq!(api.call(req).await.status(), status);
        }
        let mut plain = put(hb, "{}");
        plain.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert_eq!(api.call(plain).await.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let mut get = put(hb, "");
        *get.method_mut() = Method::GET;
        assert_eq!(api.call(get).await.status(), StatusCode::METHOD_NOT_ALLOWED);
        // Every request counted once, under its route.
        let text = metrics.render(&store.list());
        let count = |labels: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("trellis_registry_request_duration_seconds_count") && l.contains(labels)
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        };
        assert_eq!(count(r#"route="heartbeat",status="204""#), Some(2), "{text}");
        assert_eq!(count(r#"route="heartbeat",status="413""#), Some(2), "{text}");
        assert_eq!(count(r#"route="heartbeat",status="400""#), Some(2), "{text}");
        assert_eq!(count(r#"route="other",status="405""#), Some(1), "{text}");
    }

    /// The cost of the token check on the heartbeat path, in process (no HTTP
    /// parsing or syscalls, so the ratio is an upper bound on the real one).
    #[tokio::test(flavor = "current_thread")]
    #[ignore = "a measurement: cargo test --release -p trellis-registry --lib heartbeat_cost -- --ignored --nocapture"]
    async fn heartbeat_cost_with_and_without_tokens() {
        let secret = format!("{:064x}", rand::random::<u128>());
        let path = std::env::temp_dir().join(format!("acl-bench-{}.toml", std::process::id()));
        let mut file = String::from("default = \"deny\"\n");
        for i in 0..50 {
            let s = if i == 7 { secret.clone() } else { format!("other-{i}-{secret}") };
            file += &format!("[[tokens]]\nname = \"t{i}\"\nsecret = \"{s}\"\nwrite = [\"users\"]\n");
        }
        std::fs::write(&path, file).unwrap();
        let api = |acl: bool| {
            let store = Arc::new(MemoryStore::new(StoreMetrics::default()));
            let metrics = Arc::new(Metrics::new());
            let watches = Arc::new(Watches::new(10, CancellationToken::new(), metrics.clone()));
            let acl = acl.then(|| Arc::new(crate::acl::Acl::load(&path, metrics.clone()).unwrap()));
            (
                store.clone(),
                ApiService::new(ApiState::new(store, Config::default(), metrics, watches).with_acl(acl)),
            )
        };
        let users = ServiceName::new("users").unwrap();
        let hb = "/v1/services/users/instances/u1/heartbeat";
        let mut best = [f64::MAX; 2];
        let apis = [api(false), api(true)];
        for (store, _) in &apis {
            let instance = instance_u1();
            store.register(&users, LeasedInstance { instance, ttl: Duration::from_secs(600) }).await.unwrap();
        }
        const N: u32 = 100_000;
        for _round in 0..5 {
            for (i, (_, api)) in apis.iter().enumerate() {
                let t = std::time::Instant::now();
                for _ in 0..N {
                    let mut req = put(hb, "");
                    req.headers_mut().insert(
                        header::AUTHORIZATION,
                        HeaderValue::from_str(&format!("Bearer {secret}")).unwrap(),
                    );
                    let resp = api.call(req).await;
                    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
                }
                best[i] = best[i].min(t.elapsed().as_nanos() as f64 / f64::from(N));
            }
        }
        let _ = std::fs::remove_file(&path);
        println!(
            "heartbeat in process: {:.0} ns without an ACL, {:.0} ns with a token (+{:.1} %)",
            best[0],
            best[1],
            (best[1] / best[0] - 1.0) * 100.0
        );
    }
}
