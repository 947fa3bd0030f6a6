//! The HTTP/JSON API (documented in `docs/api.md`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use serde::Serialize;
use trellis_shared::types::DEFAULT_WEIGHT;
use trellis_shared::{
    HeartbeatRequest, Instance, InstanceId, InstanceRecord, RegisterRequest, ServiceList, ServiceName,
    EPOCH_HEADER, INDEX_HEADER,
};

use crate::config::Config;
use crate::error::ApiError;
use crate::metrics::{Metrics, RequestLabels, Route};
use crate::store::{Heartbeat, Registration, ServiceSnapshot, Store};
use crate::watch::{parse_query, Watches, DEFAULT_WAIT};

/// What every handler shares; clones are cheap.
pub struct AppState<S> {
    pub store: Arc<S>,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub watches: Arc<Watches>,
}

impl<S> Clone for AppState<S> {
    fn clone(&self) -> Self {
        AppState {
            store: self.store.clone(),
            config: self.config.clone(),
            metrics: self.metrics.clone(),
            watches: self.watches.clone(),
        }
    }
}

/// The router's state: one `Arc`, so each handler's `State` extraction is one
/// reference-count increment rather than four, and the epoch header is
/// validated once rather than per response (both showed in heartbeat profiles).
struct Ctx<S> {
    app: AppState<S>,
    /// `X-Trellis-Epoch`; a store's epoch never changes while it runs.
    epoch: Option<HeaderValue>,
}

impl<S> std::ops::Deref for Ctx<S> {
    type Target = AppState<S>;
    fn deref(&self) -> &AppState<S> {
        &self.app
    }
}

type Shared<S> = Arc<Ctx<S>>;

static INDEX_NAME: HeaderName = HeaderName::from_static(INDEX_HEADER);
static EPOCH_NAME: HeaderName = HeaderName::from_static(EPOCH_HEADER);

/// The API: the heartbeat route served directly, everything else through
/// the axum router. Clones are cheap.
pub struct Api<S> {
    pub router: Router,
    ctx: Shared<S>,
}

impl<S> Clone for Api<S> {
    fn clone(&self) -> Self {
        Api { router: self.router.clone(), ctx: self.ctx.clone() }
    }
}

/// `(service, id)` of `/v1/services/{service}/instances/{id}/heartbeat`, for
/// paths without percent-escapes (valid names never need them; escaped paths
/// go through the router, which decodes them).
pub fn heartbeat_path(path: &str) -> Option<(&str, &str)> {
    if path.contains('%') {
        return None;
    }
    let rest = path.strip_prefix("/v1/services/")?.strip_suffix("/heartbeat")?;
    let (service, id) = rest.split_once("/instances/")?;
    (!service.is_empty() && !service.contains('/') && !id.is_empty() && !id.contains('/'))
        .then_some((service, id))
}

impl<S: Store> Api<S> {
    pub fn new(state: AppState<S>) -> Self {
        let epoch = HeaderValue::from_str(state.store.epoch()).ok();
        let ctx: Shared<S> = Arc::new(Ctx { app: state, epoch });
        Api { router: router(ctx.clone()), ctx }
    }

    /// Heartbeats are most of a registry's requests: the router's dispatch,
    /// middleware and extractors (a copy of the header map, owned path
    /// strings) were about a tenth of the registry's CPU per heartbeat, so the
    /// heartbeat route is matched here and served with the same checks,
    /// errors and metrics. `None` when the request is not a heartbeat.
    pub fn heartbeat<B>(&self, req: &axum::http::Request<B>) -> Option<(ServiceName, InstanceId)> {
        if req.method() != Method::PUT {
            return None;
        }
        let (service, id) = heartbeat_path(req.uri().path())?;
        // Invalid names take the router, which words the error.
        Some((ServiceName::new(service.to_string()).ok()?, InstanceId::new(id.to_string()).ok()?))
    }

    /// Flags successful answers `X-Trellis-Stale: true` while the store serves
    /// them from a copy it cannot refresh (an etcd cluster without quorum).
    pub fn mark_stale(&self, mut resp: Response) -> Response {
        if self.ctx.store.stale() && resp.status().is_success() {
            resp.headers_mut().insert(trellis_shared::STALE_HEADER, HeaderValue::from_static("true"));
            self.ctx.metrics.etcd.stale_answers.inc();
        }
        resp
    }

    /// Serves a heartbeat matched by [`Api::heartbeat`].
    pub async fn serve_heartbeat<B>(
        &self,
        (service, id): (ServiceName, InstanceId),
        req: axum::http::Request<B>,
    ) -> Response
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        use http_body_util::BodyExt;
        let started = tokio::time::Instant::now();
        let st = &self.ctx;
        let limit = st.config.max_body;
        let (parts, body) = req.into_parts();
        let result = match http_body_util::Limited::new(body, limit).collect().await {
            Ok(c) => match json_body(&parts.headers, c.to_bytes()) {
                Ok(body) => renew(st, service, id, body).await,
                Err(e) => Err(e),
            },
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::PayloadTooLarge { limit }),
            Err(e) => Err(ApiError::InvalidJson(format!("cannot read the body: {e}"))),
        };
        let resp = result.unwrap_or_else(IntoResponse::into_response);
        let status = resp.status().as_u16();
        let elapsed = started.elapsed();
        st.metrics
            .requests
            .get_or_create(&RequestLabels { route: Route::Heartbeat, status })
            .observe(elapsed.as_secs_f64());
        tracing::debug!(
            route = Route::Heartbeat.as_str(),
            method = "PUT",
            status,
            elapsed_us = elapsed.as_micros() as u64,
            "request"
        );
        resp
    }
}

fn router<S: Store>(state: Shared<S>) -> Router {
    let metrics = state.metrics.clone();
    let max_body = state.config.max_body;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text::<S>))
        .route("/v1/services", get(list::<S>))
        .route("/v1/services/{service}", get(get_service::<S>))
        .route("/v1/services/{service}/instances/{id}", put(register::<S>).delete(deregister::<S>))
        .route("/v1/services/{service}/instances/{id}/heartbeat", put(heartbeat::<S>))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
        .layer(middleware::from_fn_with_state(metrics, record))
}

/// Times every request by route and status.
async fn record(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let started = tokio::time::Instant::now();
    let route = route_of(&req);
    let method = req.method().clone();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let elapsed = started.elapsed();
    metrics.requests.get_or_create(&RequestLabels { route, status }).observe(elapsed.as_secs_f64());
    tracing::debug!(route = route.as_str(), %method, status, elapsed_us = elapsed.as_micros() as u64, "request");
    resp
}

fn route_of(req: &Request) -> Route {
    let Some(path) = req.extensions().get::<MatchedPath>() else { return Route::Other };
    match (req.method(), path.as_str()) {
        (&Method::PUT, "/v1/services/{service}/instances/{id}") => Route::Register,
        (&Method::DELETE, "/v1/services/{service}/instances/{id}") => Route::Deregister,
        (&Method::PUT, "/v1/services/{service}/instances/{id}/heartbeat") => Route::Heartbeat,
        (&Method::GET, "/v1/services") => Route::List,
        (&Method::GET, "/v1/services/{service}") => {
            if req.uri().query().is_some_and(|q| q.contains("index=")) {
                Route::Watch
            } else {
                Route::Get
            }
        }
        (_, "/health") => Route::Health,
        (_, "/metrics") => Route::Metrics,
        _ => Route::Other,
    }
}

fn json_response(status: StatusCode, body: impl Into<Body>) -> Response {
    let mut resp = (status, body.into()).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Our wire types serialise infallibly (string keys, no non-finite floats).
    serde_json::to_vec(value).unwrap_or_default()
}

fn with_index<S>(mut resp: Response, index: u64, st: &Ctx<S>) -> Response {
    let h = resp.headers_mut();
    h.insert(INDEX_NAME.clone(), HeaderValue::from(index));
    if let Some(v) = &st.epoch {
        h.insert(EPOCH_NAME.clone(), v.clone());
    }
    resp
}

fn bad_path(e: PathRejection) -> ApiError {
    ApiError::InvalidName(trellis_shared::NameError {
        what: "path",
        value: String::new(),
        reason: match e {
            PathRejection::FailedToDeserializePathParams(_) => "is not valid percent-encoded UTF-8",
            _ => "cannot be read",
        },
    })
}

fn instance_path(
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(ServiceName, InstanceId), ApiError> {
    let Path((service, id)) = path.map_err(bad_path)?;
    Ok((ServiceName::new(service)?, InstanceId::new(id)?))
}

/// The request body, after the content type and size checks; `None` when empty.
fn body_bytes(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Option<Bytes>, ApiError> {
    let bytes = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(ApiError::PayloadTooLarge { limit })
        }
        Err(e) => return Err(ApiError::InvalidJson(format!("cannot read the body: {e}"))),
    };
    json_body(headers, bytes)
}

/// A body read whole: `None` when empty, an error unless it is JSON.
fn json_body(headers: &HeaderMap, bytes: Bytes) -> Result<Option<Bytes>, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        let essence = ct.split(';').next().unwrap_or("").trim();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ApiError::UnsupportedMediaType(format!(
                "bodies must be application/json, got {:?}",
                essence.chars().take(64).collect::<String>()
            )));
        }
    }
    Ok(Some(bytes))
}

async fn health() -> Response {
    json_response(StatusCode::OK, r#"{"status":"ok"}"#)
}

async fn metrics_text<S: Store>(State(st): State<Shared<S>>) -> Response {
    let text = st.metrics.render(&st.store.list());
    let mut resp = (StatusCode::OK, text).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

async fn list<S: Store>(State(st): State<Shared<S>>, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    if q.is_some_and(|q| !q.is_empty()) {
        return Err(ApiError::InvalidQuery("GET /v1/services takes no parameters".into()));
    }
    let body = ServiceList { services: st.store.list(), epoch: st.store.epoch().to_string() };
    Ok(json_response(StatusCode::OK, to_json(&body)))
}

async fn get_service<S: Store>(
    State(st): State<Shared<S>>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let Path(service) = path.map_err(bad_path)?;
    let service = ServiceName::new(service)?;
    let q = parse_query(q.as_deref(), st.config.max_wait)?;
    let snap: Arc<ServiceSnapshot> = match q.index {
        None => st.store.snapshot(&service),
        Some(index) => {
            let wait = if q.other_epoch(st.store.epoch()) {
                Duration::ZERO
            } else {
                q.wait.unwrap_or(DEFAULT_WAIT.min(st.config.max_wait))
            };
            st.watches.wait(&*st.store, &service, index, wait).await
        }
    };
    let resp = json_response(StatusCode::OK, snap.json(st.store.epoch(), q.all));
    Ok(with_index(resp, snap.index(), &st))
}

async fn register<S: Store>(
    State(st): State<Shared<S>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (service, id) = instance_path(path)?;
    let bytes = body_bytes(&headers, body, st.config.max_body)?.ok_or_else(|| {
        ApiError::InvalidJson("a registration needs a JSON body with address and port".into())
    })?;
    let req: RegisterRequest = serde_json::from_slice(&bytes).map_err(ApiError::from_json)?;
    req.validate().map_err(ApiError::InvalidField)?;
    let ttl = req.ttl.map(|t| t.0).unwrap_or(st.config.default_ttl);
    check_ttl(ttl, &st.config)?;
    let instance = Instance {
        id,
        address: req.address,
        port: req.port,
        zone: req.zone,
        weight: req.weight.unwrap_or(DEFAULT_WEIGHT),
        metadata: req.metadata,
        status: req.status.unwrap_or_default(),
        output: String::new(),
    };
    let record = InstanceRecord { service: service.clone(), instance: instance.clone(), ttl: ttl.into() };
    let outcome = st.store.register(&service, Registration { instance, ttl }).await?;
    st.metrics.registrations.inc();
    let resp = json_response(StatusCode::OK, to_json(&record));
    Ok(with_index(resp, outcome.index, &st))
}

fn check_ttl(ttl: Duration, config: &Config) -> Result<(), ApiError> {
    if ttl < config.min_ttl || ttl > config.max_ttl {
        return Err(ApiError::InvalidField(format!(
            "ttl {} is outside the allowed range {} to {}",
            humantime::format_duration(ttl),
            humantime::format_duration(config.min_ttl),
            humantime::format_duration(config.max_ttl),
        )));
    }
    Ok(())
}

async fn heartbeat<S: Store>(
    State(st): State<Shared<S>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (service, id) = instance_path(path)?;
    let body = body_bytes(&headers, body, st.config.max_body)?;
    renew(&st, service, id, body).await
}

/// A heartbeat after its path and body were read.
async fn renew<S: Store>(
    st: &Ctx<S>,
    service: ServiceName,
    id: InstanceId,
    body: Option<Bytes>,
) -> Result<Response, ApiError> {
    let req = match body {
        None => HeartbeatRequest::default(),
        Some(b) => serde_json::from_slice::<HeartbeatRequest>(&b).map_err(ApiError::from_json)?,
    };
    req.validate().map_err(ApiError::InvalidField)?;
    let outcome =
        st.store.heartbeat(&service, &id, Heartbeat { status: req.status, output: req.output }).await?;
    st.metrics.heartbeats.inc();
    let resp = StatusCode::NO_CONTENT.into_response();
    Ok(with_index(resp, outcome.index, st))
}

async fn deregister<S: Store>(
    State(st): State<Shared<S>>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (service, id) = instance_path(path)?;
    let index = st.store.deregister(&service, &id).await?;
    st.metrics.deregistrations.inc();
    Ok(with_index(StatusCode::NO_CONTENT.into_response(), index, &st))
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    let _ = method;
    ApiError::NotFound(uri.path().chars().take(200).collect())
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed { method: method.to_string(), path: uri.path().chars().take(200).collect() }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use http_body_util::Full;
    use tokio_util::sync::CancellationToken;
    use trellis_shared::{Address, HealthStatus};

    use super::*;
    use crate::metrics::StoreMetrics;
    use crate::store::MemoryStore;

    fn put(path: &str, body: &str) -> axum::http::Request<Full<Bytes>> {
        axum::http::Request::builder()
            .method(Method::PUT)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    }

    #[tokio::test]
    async fn the_direct_heartbeat_route_keeps_the_checks_errors_and_metrics() {
        let store = Arc::new(MemoryStore::new(StoreMetrics::default()));
        let metrics = Arc::new(Metrics::new());
        let config = Arc::new(Config { max_body: 1024, ..Config::default() });
        let watches = Arc::new(Watches::new(10, CancellationToken::new(), metrics.clone()));
        let api = Api::new(AppState { store: store.clone(), config, metrics: metrics.clone(), watches });
        let users = ServiceName::new("users").unwrap();
        let instance = Instance {
            id: InstanceId::new("u1").unwrap(),
            address: Address::new("10.0.0.1").unwrap(),
            port: 80,
            zone: None,
            weight: 100,
            metadata: BTreeMap::new(),
            status: HealthStatus::Passing,
            output: String::new(),
        };
        store.register(&users, Registration { instance, ttl: Duration::from_secs(60) }).await.unwrap();
        let call = |req: axum::http::Request<Full<Bytes>>| {
            let api = api.clone();
            async move {
                let names = api.heartbeat(&req).expect("a heartbeat route");
                api.serve_heartbeat(names, req).await
            }
        };
        let hb = "/v1/services/users/instances/u1/heartbeat";
        let ok = call(put(hb, r#"{"status":"warning"}"#)).await;
        assert_eq!(ok.status(), StatusCode::NO_CONTENT);
        assert!(ok.headers().contains_key(INDEX_HEADER) && ok.headers().contains_key(EPOCH_HEADER));
        assert_eq!(store.snapshot(&users).instances()[0].status, HealthStatus::Warning);
        let cases = [
            (put(hb, &format!(r#"{{"output":"{}"}}"#, "a".repeat(2000))), StatusCode::PAYLOAD_TOO_LARGE),
            (put(hb, r#"{"status":"#), StatusCode::BAD_REQUEST),
            (put("/v1/services/users/instances/u9/heartbeat", ""), StatusCode::NOT_FOUND),
        ];
        for (req, status) in cases {
            assert_eq!(call(req).await.status(), status);
        }
        let mut plain = put(hb, "{}");
        plain.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert_eq!(call(plain).await.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        // Invalid names and other methods are left to the router.
        assert!(api.heartbeat(&put("/v1/services/Users/instances/u1/heartbeat", "")).is_none());
        let mut get = put(hb, "");
        *get.method_mut() = Method::GET;
        assert!(api.heartbeat(&get).is_none());
        let text = metrics.render(&store.list());
        assert!(text.contains("route=\"heartbeat\",status=\"413\""), "{text}");
    }

    #[test]
    fn matches_only_plain_heartbeat_paths() {
        assert_eq!(heartbeat_path("/v1/services/users/instances/a-1/heartbeat"), Some(("users", "a-1")));
        for other in [
            "/v1/services/users/instances/a-1",
            "/v1/services/users/instances//heartbeat",
            "/v1/services//instances/a/heartbeat",
            "/v1/services/users/instances/a/b/heartbeat",
            "/v1/services/users/x/instances/a/heartbeat",
            "/v1/services/users/instances/a%2Fb/heartbeat",
            "/v2/services/users/instances/a/heartbeat",
        ] {
            assert_eq!(heartbeat_path(other), None, "{other}");
        }
    }
}
