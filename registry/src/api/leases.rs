//! `GET /v1/services/{service}/leases`: each instance's lease (time since its
//! last renewal, time left), for the dashboard's service page. A route of its
//! own because leases move on every heartbeat while the service's index does
//! not: this is read when asked, never rendered into snapshots or watched.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Serialize;
use trellis_shared::{InstanceId, ServiceName};

use super::handlers::{bad_path, json_response, to_json};
use super::{ApiState, ClientAddr};
use crate::acl::Need;
use crate::error::ApiError;
use crate::store::Store;

#[derive(Debug, Serialize)]
struct LeasesOut<'a> {
    service: &'a ServiceName,
    leases: Vec<LeaseOut>,
}

#[derive(Debug, Serialize)]
struct LeaseOut {
    id: InstanceId,
    ttl_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    since_renewal_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    left_ms: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    held: bool,
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Needs read on the service, as discovery does.
pub async fn leases<S: Store>(
    State(st): State<Arc<ApiState<S>>>,
    client: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let Path(service) = path.map_err(bad_path)?;
    let service = ServiceName::new(service)?;
    st.authorize(&headers, client.map(|c| c.0), Need::Read(&service))?;
    if q.is_some_and(|q| !q.is_empty()) {
        return Err(ApiError::InvalidQuery("GET /v1/services/{service}/leases takes no parameters".into()));
    }
    let leases = st
        .store
        .leases(&service)
        .await
        .into_iter()
        .map(|l| LeaseOut {
            id: l.id,
            ttl_ms: ms(l.ttl),
            since_renewal_ms: l.since_renewal.map(ms),
            left_ms: l.left.map(ms),
            held: l.held,
        })
        .collect();
    Ok(json_response(StatusCode::OK, to_json(&LeasesOut { service: &service, leases })))
}
