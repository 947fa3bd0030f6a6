//! `POST /v1/identity/sign`: a sidecar's certificate request, signed by the
//! mesh CA for the service its token may write (docs/mtls.md).
//!
//! The checks run cheapest first: a registry without a CA answers before
//! reading anything, the body is bounded like every other, and the token is
//! checked against the service named in the body before the request's
//! signature is verified or anything is signed.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tracing::info;
use trellis_shared::identity::SignRequest;

use super::handlers::{client_of, json_response, read_body, to_json};
use super::ApiState;
use crate::acl::Need;
use crate::error::ApiError;
use crate::metrics::ResultLabels;
use crate::store::Store;

pub async fn sign<S: Store>(State(st): State<Arc<ApiState<S>>>, req: Request) -> Response {
    let result = signed(&st, req).await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(ApiError::NoMeshCa) => "no_ca",
        Err(ApiError::Unauthenticated(_) | ApiError::PermissionDenied(_)) => "refused",
        Err(ApiError::SignFailed(_)) => "failed",
        Err(_) => "invalid",
    };
    st.metrics.certificates.get_or_create(&ResultLabels { result: outcome }).inc();
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn signed<S: Store>(st: &ApiState<S>, req: Request) -> Result<Response, ApiError> {
    let ca = st.mesh_ca.as_ref().ok_or(ApiError::NoMeshCa)?;
    let client = client_of(&req);
    let (parts, body) = req.into_parts();
    let bytes = read_body(&parts.headers, body, st.config.max_body).await?.ok_or_else(|| {
        ApiError::InvalidJson("a signing request needs a JSON body with service and csr".into())
    })?;
    let req: SignRequest = serde_json::from_slice(&bytes).map_err(ApiError::from_json)?;
    st.authorize(&parts.headers, client, Need::Write(&req.service))?;
    let signed = ca.sign(&req.service, &req.csr).map_err(|e| match e {
        crate::identity::SignError::Csr(e) => ApiError::InvalidCsr(e),
        crate::identity::SignError::Failed(e) => ApiError::SignFailed(e),
    })?;
    info!(
        service = %req.service,
        identity = %signed.spiffe_id,
        not_after = %signed.not_after,
        client = ?client.map(|c| c.0),
        "mesh identity signed"
    );
    Ok(json_response(StatusCode::OK, to_json(&signed)))
}
