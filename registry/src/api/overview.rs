//! `GET /v1/overview`: every service the caller may read, with its health
//! counts, zones and protection flag, in one answer; blocking with `?index=`
//! on the registry's highest index, so one held query sees a change to any
//! service (the dashboard's main page).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Serialize;
use trellis_shared::{HealthStatus, ServiceName};

use super::handlers::{json_response, to_json, with_index};
use super::{ApiState, ClientAddr};
use crate::acl::Need;
use crate::error::ApiError;
use crate::store::{ServiceSnapshot, Store};
use crate::watch::{parse_query, DEFAULT_WAIT};

#[derive(Debug, Serialize)]
struct OverviewOut<'a> {
    /// The registry's highest index when this answer was made.
    index: u64,
    epoch: &'a str,
    services: Vec<ServiceOut<'a>>,
}

#[derive(Debug, Serialize)]
struct ServiceOut<'a> {
    name: &'a ServiceName,
    index: u64,
    instances: usize,
    passing: usize,
    warning: usize,
    critical: usize,
    /// Distinct zones of its instances, sorted; instances without one are not counted.
    zones: BTreeSet<&'a str>,
    /// The protection threshold holds: discovery lists critical instances too.
    protected: bool,
}

fn service_out(snap: &ServiceSnapshot) -> ServiceOut<'_> {
    let mut out = ServiceOut {
        name: snap.service(),
        index: snap.index(),
        instances: snap.instances().len(),
        passing: 0,
        warning: 0,
        critical: 0,
        zones: BTreeSet::new(),
        protected: snap.protected(),
    };
    for i in snap.instances() {
        match i.status {
            HealthStatus::Passing => out.passing += 1,
            HealthStatus::Warning => out.warning += 1,
            HealthStatus::Critical => out.critical += 1,
        }
        if let Some(z) = &i.zone {
            out.zones.insert(z.as_str());
        }
    }
    out
}

/// `GET /v1/overview[?index=N&wait=30s&epoch=E]`: the list's rights (any
/// token; the answer shows only the services it may read).
pub async fn overview<S: Store>(
    State(st): State<Arc<ApiState<S>>>,
    client: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let client = client.map(|c| c.0);
    let grant = st.authorize(&headers, client, Need::List)?;
    let q = parse_query(q.as_deref(), st.config.max_wait)?;
    if q.all {
        return Err(ApiError::InvalidQuery("GET /v1/overview counts every instance; it takes no all".into()));
    }
    let index = match q.index {
        None => *st.store.changes().borrow(),
        Some(index) => {
            let wait = if q.other_epoch(st.store.epoch()) {
                Duration::ZERO
            } else {
                q.wait.unwrap_or(DEFAULT_WAIT.min(st.config.max_wait))
            };
            st.watches.wait_any(&*st.store, index, wait, client.map(|c| c.0)).await
        }
    };
    let snapshots = st.store.snapshots();
    let services = snapshots.iter().filter(|s| grant.may_read(s.service())).map(|s| service_out(s)).collect();
    let body = OverviewOut { index, epoch: st.store.epoch(), services };
    Ok(with_index(json_response(StatusCode::OK, to_json(&body)), index, &st))
}
