//! A Consul-compatible read API on the registry's port, so unmodified Consul
//! clients (Prometheus's `consul_sd_configs`, Traefik's `consulCatalog`,
//! py-consul, Consul's Go client) discover services from Trellis
//! (`docs/consul.md`).
//!
//! - `GET /v1/agent/self`: the datacenter and node name.
//! - `GET /v1/catalog/services`: every readable service and its tags.
//! - `GET /v1/catalog/service/<name>`: every instance, whatever its health.
//! - `GET /v1/health/service/<name>`: instances with their check, filtered by
//!   `passing` and `tag`.
//! - `GET /v1/health/state/<state>`: every instance's check in `any` state,
//!   or in one (`passing`, `warning`, `critical`); what Traefik's
//!   `consulCatalog` watches to learn that something changed.
//!
//! Blocking queries (`index`, `wait`) go through the registry's own
//! [`crate::watch::Watches`]: per service for the two per-service routes, and
//! on the catalog's index (which moves only when a service appears, vanishes
//! or changes its tags) for `/v1/catalog/services`. Tokens are the registry's,
//! read from `X-Consul-Token` as from its own headers, with the same rules.
//! Consul's write routes answer `405` naming Trellis's own route.
//!
//! - [`config`]: `--datacenter`, `--node-name`.
//! - [`query`]: the query string, parsed as Consul parses it.
//! - [`shape`]: instances in Consul's JSON shapes.

pub mod config;
pub mod query;
pub mod shape;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use trellis_shared::{HealthStatus, ServiceName};

use self::query::{Consistency, ConsulQuery, Takes, CONSUL_DEFAULT_WAIT};
use self::shape::{AgentConfig, AgentSelf, CatalogEntry, Check, HealthEntry, Member};
use crate::acl::Need;
use crate::api::{ApiState, ClientAddr};
use crate::error::ApiError;
use crate::store::{ServiceSnapshot, Store};

static INDEX: HeaderName = HeaderName::from_static("x-consul-index");
static KNOWN_LEADER: HeaderName = HeaderName::from_static("x-consul-knownleader");
static LAST_CONTACT: HeaderName = HeaderName::from_static("x-consul-lastcontact");
static CONSISTENCY: HeaderName = HeaderName::from_static("x-consul-effective-consistency");

/// Consul's routes, merged into the registry's router.
pub fn routes<S: Store>() -> Router<Arc<ApiState<S>>> {
    Router::new()
        .route("/v1/agent/self", get(agent_self::<S>).fallback(read_only))
        .route("/v1/catalog/services", get(catalog_services::<S>).fallback(read_only))
        .route("/v1/catalog/service/{service}", get(catalog_service::<S>).fallback(read_only))
        .route("/v1/health/service/{service}", get(health_service::<S>).fallback(read_only))
        .route("/v1/health/state/{state}", get(health_state::<S>).fallback(read_only))
        .route("/v1/agent/service/register", any(read_only))
        .route("/v1/agent/service/deregister/{id}", any(read_only))
        .route("/v1/agent/service/maintenance/{id}", any(read_only))
        .route("/v1/agent/check/register", any(read_only))
        .route("/v1/agent/check/deregister/{id}", any(read_only))
        .route("/v1/agent/check/{state}/{id}", any(read_only))
        .route("/v1/catalog/register", any(read_only))
        .route("/v1/catalog/deregister", any(read_only))
}

type St<S> = State<Arc<ApiState<S>>>;
type Client = Option<Extension<ClientAddr>>;

fn ip(client: &Client) -> Option<IpAddr> {
    client.as_ref().map(|c| c.0 .0)
}

/// The checks every read shares: token, query, datacenter, a copy current
/// enough for the consistency asked.
fn prepare<S: Store>(
    st: &ApiState<S>,
    headers: &HeaderMap,
    client: &Client,
    need: Need<'_>,
    raw: Option<&str>,
    takes: Takes,
) -> Result<(crate::acl::Grant, ConsulQuery), ApiError> {
    let grant = st.authorize(headers, client.as_ref().map(|c| c.0), need)?;
    let q = query::parse(raw, takes, st.config.max_wait)?;
    let served = &st.config.consul.datacenter;
    if let Some(dc) = q.dc.as_deref().filter(|dc| dc != served) {
        return Err(ApiError::UnknownDatacenter {
            asked: dc.chars().take(64).collect(),
            served: served.clone(),
        });
    }
    // Consul's followers refuse non-stale reads while they know no leader.
    if st.store.stale() && q.consistency != Consistency::Stale {
        return Err(ApiError::NoQuorum);
    }
    Ok((grant, q))
}

/// The index a blocking query waits from. Consul never reports index 0
/// (clients would spin on it), so a service or catalog at 0 is reported as 1,
/// and a client coming back with that 1 waits on the 0 it stands for.
fn wait_from(asked: u64, current: u64) -> u64 {
    if asked == current.max(1) {
        current
    } else {
        asked
    }
}

/// A blocking query's index to wait from and how long, or `None` to answer
/// at once; `current` reads the index the query is about.
fn blocking<S: Store>(
    st: &ApiState<S>,
    q: &ConsulQuery,
    current: impl FnOnce() -> u64,
) -> Option<(u64, Duration)> {
    let asked = q.index.filter(|i| *i != 0)?;
    Some((wait_from(asked, current()), q.wait.unwrap_or(CONSUL_DEFAULT_WAIT.min(st.config.max_wait))))
}

fn path_service(path: Result<Path<String>, PathRejection>) -> Result<ServiceName, ApiError> {
    let Path(service) = path.map_err(|_| {
        ApiError::InvalidName(trellis_shared::NameError {
            what: "path",
            value: String::new(),
            reason: "is not valid percent-encoded UTF-8",
        })
    })?;
    Ok(ServiceName::new(service)?)
}

/// A JSON answer with Consul's headers: the index (at least 1), whether this
/// replica's copy is current, how long since it was confirmed.
fn answer<S: Store>(st: &ApiState<S>, body: Vec<u8>, index: u64, consistency: Consistency) -> Response {
    let mut resp = (StatusCode::OK, Body::from(body)).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(INDEX.clone(), HeaderValue::from(index.max(1)));
    let stale = st.store.stale();
    h.insert(KNOWN_LEADER.clone(), HeaderValue::from_static(if stale { "false" } else { "true" }));
    let ms = u64::try_from(st.store.last_contact().as_millis()).unwrap_or(u64::MAX);
    h.insert(LAST_CONTACT.clone(), HeaderValue::from(ms));
    h.insert(CONSISTENCY.clone(), HeaderValue::from_static(consistency.as_str()));
    resp
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Strings, numbers and string-keyed maps serialise infallibly.
    serde_json::to_vec(value).unwrap_or_default()
}

async fn agent_self<S: Store>(
    State(st): St<S>,
    client: Client,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let takes = Takes { passing: false, tag: false };
    let (_, q) = prepare(&st, &headers, &client, Need::List, raw.as_deref(), takes)?;
    let dc = &st.config.consul.datacenter;
    let node = st.config.consul.node_name();
    let body = AgentSelf {
        config: AgentConfig {
            datacenter: dc,
            primary_datacenter: dc,
            node_name: &node,
            node_id: "",
            server: true,
            revision: "",
            version: format!("trellis-{}", env!("CARGO_PKG_VERSION")),
        },
        member: Member { name: &node, status: 1 },
        meta: Default::default(),
    };
    Ok(answer(&st, to_json(&body), st.store.catalog().0, q.consistency))
}

async fn catalog_services<S: Store>(
    State(st): St<S>,
    client: Client,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let takes = Takes { passing: false, tag: false };
    let (grant, q) = prepare(&st, &headers, &client, Need::List, raw.as_deref(), takes)?;
    if let Some((from, wait)) = blocking(&st, &q, || st.store.catalog().0) {
        st.watches.wait_catalog(&*st.store, from, wait, ip(&client)).await;
    }
    let (index, services) = st.store.catalog();
    let mut body = serde_json::Map::new();
    for snap in services.iter().filter(|s| grant.may_read(s.service())) {
        let tags = snap.catalog_entry().unwrap_or_default();
        body.insert(snap.service().to_string(), tags.into());
    }
    Ok(answer(&st, to_json(&body), index, q.consistency))
}

/// The service's snapshot, after a blocking query's wait when one is asked.
async fn snapshot<S: Store>(
    st: &ApiState<S>,
    service: &ServiceName,
    q: &ConsulQuery,
    client: &Client,
) -> Arc<ServiceSnapshot> {
    match blocking(st, q, || st.store.snapshot(service).index()) {
        None => st.store.snapshot(service),
        Some((from, wait)) => st.watches.wait(&*st.store, service, from, wait, ip(client)).await,
    }
}

fn has_tags(tags: &[String], wanted: &[String]) -> bool {
    wanted.iter().all(|w| tags.contains(w))
}

async fn catalog_service<S: Store>(
    State(st): St<S>,
    client: Client,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let service = path_service(path)?;
    let takes = Takes { passing: false, tag: true };
    let (_, q) = prepare(&st, &headers, &client, Need::Read(&service), raw.as_deref(), takes)?;
    let snap = snapshot(&st, &service, &q, &client).await;
    let dc = &st.config.consul.datacenter;
    let rows: Vec<CatalogEntry<'_>> = snap
        .instances()
        .iter()
        .filter(|i| has_tags(&i.tags, &q.tags))
        .map(|i| CatalogEntry::new(&service, i, snap.index(), dc))
        .collect();
    Ok(answer(&st, to_json(&rows), snap.index(), q.consistency))
}

async fn health_service<S: Store>(
    State(st): St<S>,
    client: Client,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let service = path_service(path)?;
    let takes = Takes { passing: true, tag: true };
    let (_, q) = prepare(&st, &headers, &client, Need::Read(&service), raw.as_deref(), takes)?;
    let snap = snapshot(&st, &service, &q, &client).await;
    let dc = &st.config.consul.datacenter;
    let rows: Vec<HealthEntry<'_>> = snap
        .instances()
        .iter()
        .filter(|i| !q.passing || i.status == HealthStatus::Passing)
        .filter(|i| has_tags(&i.tags, &q.tags))
        .map(|i| HealthEntry::new(&service, i, snap.index(), dc))
        .collect();
    Ok(answer(&st, to_json(&rows), snap.index(), q.consistency))
}

/// Every readable instance's check, across services, in the state asked
/// (`any` for all). Its index is the registry's highest, so a blocking query
/// returns on a change of any service.
async fn health_state<S: Store>(
    State(st): St<S>,
    client: Client,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let state = path.map(|Path(s)| s).unwrap_or_default();
    let wanted = match state.as_str() {
        "any" => None,
        "passing" => Some(HealthStatus::Passing),
        "warning" => Some(HealthStatus::Warning),
        "critical" => Some(HealthStatus::Critical),
        other => {
            return Err(ApiError::InvalidQuery(format!(
                "unknown check state {:?}: use any, passing, warning or critical",
                other.chars().take(32).collect::<String>()
            )))
        }
    };
    let takes = Takes { passing: false, tag: false };
    let (grant, q) = prepare(&st, &headers, &client, Need::List, raw.as_deref(), takes)?;
    if let Some((from, wait)) = blocking(&st, &q, || *st.store.changes().borrow()) {
        st.watches.wait_any(&*st.store, from, wait, ip(&client)).await;
    }
    // The index first, so it never runs ahead of the snapshots read after it.
    let index = *st.store.changes().borrow();
    let snaps: Vec<Arc<ServiceSnapshot>> =
        st.store.snapshots().into_iter().filter(|s| grant.may_read(s.service())).collect();
    let rows: Vec<Check<'_>> = snaps
        .iter()
        .flat_map(|snap| {
            snap.instances()
                .iter()
                .filter(|i| wanted.is_none_or(|w| i.status == w))
                .map(|i| Check::new(snap.service(), i, snap.index()))
        })
        .collect();
    Ok(answer(&st, to_json(&rows), index, q.consistency))
}

/// Consul's write routes, and other methods on its read routes: Trellis
/// takes registrations only through its own API, from its sidecars.
async fn read_only(uri: Uri) -> ApiError {
    let path = uri.path();
    let trellis =
        if path.starts_with("/v1/agent/service/register") || path.starts_with("/v1/catalog/register") {
            "PUT /v1/services/{service}/instances/{id}"
        } else if path.contains("/deregister") {
            "DELETE /v1/services/{service}/instances/{id}"
        } else if path.starts_with("/v1/agent/check/") || path.starts_with("/v1/agent/service/maintenance/") {
            "PUT /v1/services/{service}/instances/{id}/heartbeat"
        } else {
            "GET"
        };
    ApiError::ReadOnly { path: path.chars().take(200).collect(), trellis }
}

#[cfg(test)]
mod tests;
