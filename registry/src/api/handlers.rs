//! The axum router and its handlers: every route but the heartbeat fast path.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, Extension, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use http_body_util::BodyExt;
use serde::Serialize;
use trellis_shared::types::DEFAULT_WEIGHT;
use trellis_shared::{
    HeartbeatRequest, Instance, InstanceId, InstanceRecord, RegisterRequest, ServiceList, ServiceName,
    EPOCH_HEADER, INDEX_HEADER,
};

use super::body_timeout::timed_out;
use super::{ApiState, ClientAddr};
use crate::acl::Need;
use crate::config::Config;
use crate::error::ApiError;
use crate::store::{Heartbeat, LeasedInstance, ServiceSnapshot, Store};
use crate::watch::{parse_query, DEFAULT_WAIT};

static INDEX_NAME: HeaderName = HeaderName::from_static(INDEX_HEADER);
static EPOCH_NAME: HeaderName = HeaderName::from_static(EPOCH_HEADER);

/// Every route but the heartbeat fast path. Heartbeats reach it only when
/// their path has escapes or invalid names (see `service.rs`).
pub fn router<S: Store>(state: Arc<ApiState<S>>) -> Router {
    let max_body = state.config.max_body;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text::<S>))
        .route("/v1/services", get(list::<S>))
        .route("/v1/services/{service}", get(get_service::<S>))
        .route("/v1/services/{service}/instances/{id}", put(register::<S>).delete(deregister::<S>))
        .route("/v1/services/{service}/instances/{id}/heartbeat", put(heartbeat_route::<S>))
        .route("/v1/identity/sign", post(super::identity::sign::<S>))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

pub(super) fn json_response(status: StatusCode, body: impl Into<Body>) -> Response {
    let mut resp = (status, body.into()).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub(super) fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Our wire types serialise infallibly (string keys, no non-finite floats).
    serde_json::to_vec(value).unwrap_or_default()
}

fn with_index<S>(mut resp: Response, index: u64, st: &ApiState<S>) -> Response {
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

/// The request body read within `limit`, after the content type check; `None` when empty.
pub(super) async fn read_body<B>(
    headers: &HeaderMap,
    body: B,
    limit: usize,
) -> Result<Option<Bytes>, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => json_body(headers, c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::PayloadTooLarge { limit }),
        Err(e) if timed_out(&*e) => Err(ApiError::BodyTimeout),
        Err(e) => Err(ApiError::InvalidJson(format!("cannot read the body: {e}"))),
    }
}

/// The client address a request carries (absent in tests that call the service directly).
pub(super) fn client_of<B>(req: &Request<B>) -> Option<ClientAddr> {
    req.extensions().get::<ClientAddr>().copied()
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

async fn metrics_text<S: Store>(
    State(st): State<Arc<ApiState<S>>>,
    client: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = st.authorize(&headers, client.map(|c| c.0), Need::Metrics) {
        return e.into_response();
    }
    let text = st.metrics.render(&st.store.list());
    let mut resp = (StatusCode::OK, text).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

async fn list<S: Store>(
    State(st): State<Arc<ApiState<S>>>,
    client: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let grant = st.authorize(&headers, client.map(|c| c.0), Need::List)?;
    if q.is_some_and(|q| !q.is_empty()) {
        return Err(ApiError::InvalidQuery("GET /v1/services takes no parameters".into()));
    }
    let mut services = st.store.list();
    services.retain(|s| grant.may_read(&s.name));
    let body = ServiceList { services, epoch: st.store.epoch().to_string() };
    Ok(json_response(StatusCode::OK, to_json(&body)))
}

async fn get_service<S: Store>(
    State(st): State<Arc<ApiState<S>>>,
    client: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let Path(service) = path.map_err(bad_path)?;
    let service = ServiceName::new(service)?;
    let client = client.map(|c| c.0);
    st.authorize(&headers, client, Need::Read(&service))?;
    let q = parse_query(q.as_deref(), st.config.max_wait)?;
    let snap: Arc<ServiceSnapshot> = match q.index {
        None => st.store.snapshot(&service),
        Some(index) => {
            let wait = if q.other_epoch(st.store.epoch()) {
                Duration::ZERO
            } else {
                q.wait.unwrap_or(DEFAULT_WAIT.min(st.config.max_wait))
            };
            st.watches.wait(&*st.store, &service, index, wait, client.map(|c| c.0)).await
        }
    };
    let resp = json_response(StatusCode::OK, snap.json(st.store.epoch(), q.all));
    Ok(with_index(resp, snap.index(), &st))
}

async fn register<S: Store>(
    State(st): State<Arc<ApiState<S>>>,
    path: Result<Path<(String, String)>, PathRejection>,
    req: Request,
) -> Result<Response, ApiError> {
    let (service, id) = instance_path(path)?;
    // Checked before the body is read: a refused writer costs no body.
    st.authorize(req.headers(), client_of(&req), Need::Write(&service))?;
    let (parts, body) = req.into_parts();
    let bytes = read_body(&parts.headers, body, st.config.max_body).await?.ok_or_else(|| {
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
        tags: req.tags,
        mesh_tls: req.mesh_tls,
    };
    let record = InstanceRecord { service: service.clone(), instance: instance.clone(), ttl: ttl.into() };
    let outcome = st.store.register(&service, LeasedInstance { instance, ttl }).await?;
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

/// The router's heartbeat route: paths with escapes or invalid names.
async fn heartbeat_route<S: Store>(
    State(st): State<Arc<ApiState<S>>>,
    path: Result<Path<(String, String)>, PathRejection>,
    req: Request,
) -> Response {
    match instance_path(path) {
        Ok(names) => heartbeat(&st, names, req).await,
        Err(e) => e.into_response(),
    }
}

/// A heartbeat whose names are known, from either entry: the body read within
/// the size limit, checked, then the renewal.
pub async fn heartbeat<S: Store, B>(
    st: &ApiState<S>,
    (service, id): (ServiceName, InstanceId),
    req: Request<B>,
) -> Response
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Checked before the body is read: a refused writer costs no body.
    if let Err(e) = st.authorize(req.headers(), client_of(&req), Need::Write(&service)) {
        return e.into_response();
    }
    let (parts, body) = req.into_parts();
    let result = match read_body(&parts.headers, body, st.config.max_body).await {
        Ok(body) => renew(st, service, id, body).await,
        Err(e) => Err(e),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

/// A heartbeat after its path and body were read.
async fn renew<S: Store>(
    st: &ApiState<S>,
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
    State(st): State<Arc<ApiState<S>>>,
    client: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (service, id) = instance_path(path)?;
    st.authorize(&headers, client.map(|c| c.0), Need::Write(&service))?;
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
