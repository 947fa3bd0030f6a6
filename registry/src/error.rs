//! API errors and the one place they become an HTTP status and a JSON body.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use trellis_shared::{ErrorBody, ErrorCode, NameError};

use crate::identity::{CsrError, SignFailure};
use crate::store::StoreError;

/// Everything a request can fail with. `docs/api.md` lists each code and status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidField(String),
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error("{0}")]
    InvalidQuery(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A request body that did not arrive within `--body-timeout`.
    #[error("the request body did not arrive within the body timeout")]
    BodyTimeout,
    /// No token, or one the ACL does not know, where one is needed.
    #[error("{0}")]
    Unauthenticated(String),
    /// A known token without the right; the message names the token, never its secret.
    #[error("{0}")]
    PermissionDenied(String),
    /// Past `--max-services`, `--max-instances-per-service` or a similar cap.
    #[error("{0}")]
    LimitExceeded(String),
    /// A connection past `--max-connections` or `--max-connections-per-ip`.
    #[error("too many connections to the registry")]
    Overloaded,
    /// `POST /v1/identity/sign` to a registry without `--ca-cert`/`--ca-key`.
    #[error("this registry issues no identities: it was started without --ca-cert and --ca-key")]
    NoMeshCa,
    /// A certificate request that cannot be signed.
    #[error(transparent)]
    InvalidCsr(#[from] CsrError),
    /// The mesh CA failed to sign a good request.
    #[error(transparent)]
    SignFailed(#[from] SignFailure),
    /// A Consul write route, or a method other than GET on a Consul read
    /// route: `trellis` names Trellis's own route for it ("GET" when none).
    #[error("{}", read_only_message(path, trellis))]
    ReadOnly { path: String, trellis: &'static str },
    /// A Consul query whose `dc` is not the registry's `--datacenter`.
    #[error("unknown datacenter {asked:?}: this registry serves {served:?}")]
    UnknownDatacenter { asked: String, served: String },
    /// A Consul read without `stale` on a replica whose copy may be behind.
    #[error("this replica cannot confirm its copy is current (its etcd has no quorum); add ?stale to read it anyway, as with Consul")]
    NoQuorum,
}

fn read_only_message(path: &str, trellis: &str) -> String {
    if trellis == "GET" {
        format!("Trellis serves Consul's API read-only: {path} answers GET only")
    } else {
        format!(
            "Trellis serves Consul's API read-only: {path} is not served; use Trellis's own route {trellis} (docs/api.md)"
        )
    }
}

impl ApiError {
    /// Splits serde's errors: broken JSON versus well-formed JSON with bad content.
    pub fn from_json(e: serde_json::Error) -> Self {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => ApiError::InvalidField(e.to_string()),
            Category::Syntax | Category::Eof | Category::Io => ApiError::InvalidJson(e.to_string()),
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::InvalidJson(_) => ErrorCode::InvalidJson,
            ApiError::InvalidField(_) => ErrorCode::InvalidField,
            ApiError::InvalidName(_) => ErrorCode::InvalidName,
            ApiError::InvalidQuery(_) => ErrorCode::InvalidQuery,
            ApiError::UnsupportedMediaType(_) => ErrorCode::UnsupportedMediaType,
            ApiError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::MethodNotAllowed { .. } => ErrorCode::MethodNotAllowed,
            ApiError::Store(StoreError::UnknownInstance { .. }) => ErrorCode::UnknownInstance,
            ApiError::Store(StoreError::Unavailable(_)) => ErrorCode::Unavailable,
            ApiError::BodyTimeout => ErrorCode::RequestTimeout,
            ApiError::Store(StoreError::LimitExceeded(_)) | ApiError::LimitExceeded(_) => {
                ErrorCode::LimitExceeded
            }
            ApiError::Unauthenticated(_) => ErrorCode::Unauthenticated,
            ApiError::PermissionDenied(_) => ErrorCode::PermissionDenied,
            ApiError::Overloaded => ErrorCode::Overloaded,
            ApiError::NoMeshCa => ErrorCode::NotFound,
            ApiError::InvalidCsr(_) => ErrorCode::InvalidField,
            ApiError::SignFailed(_) => ErrorCode::Internal,
            ApiError::ReadOnly { .. } => ErrorCode::MethodNotAllowed,
            ApiError::UnknownDatacenter { .. } => ErrorCode::NotFound,
            ApiError::NoQuorum => ErrorCode::Unavailable,
        }
    }
}

/// The challenge a `401` carries (RFC 6750).
pub const WWW_AUTHENTICATE: &str = "Bearer realm=\"trellis\"";

/// The HTTP status of each error code the registry produces.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidJson
        | ErrorCode::InvalidField
        | ErrorCode::InvalidName
        | ErrorCode::InvalidQuery
        | ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::UnknownInstance | ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorCode::PermissionDenied | ErrorCode::NotAllowed => StatusCode::FORBIDDEN,
        ErrorCode::LimitExceeded => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorCode::Unavailable | ErrorCode::Overloaded | ErrorCode::NoEndpoints => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorCode::UpstreamFailed => StatusCode::BAD_GATEWAY,
        ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::Internal | ErrorCode::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A JSON error response for `code`.
pub fn error_response(code: ErrorCode, message: String) -> Response {
    let body = serde_json::to_vec(&ErrorBody::new(code, message)).unwrap_or_default();
    let mut resp = (status_of(code), body).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.code();
        tracing::debug!(error = %code, message = %self, "request refused");
        let mut resp = error_response(code, self.to_string());
        if code == ErrorCode::Unauthenticated {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(WWW_AUTHENTICATE));
        }
        resp
    }
}
