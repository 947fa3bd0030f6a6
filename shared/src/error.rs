//! The error body of every HTTP error Trellis produces, registry and sidecar alike.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Machine-readable error codes. `docs/api.md` lists each with its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the body is not JSON (syntax error, truncated, wrong content).
    InvalidJson,
    /// 400: a field has the wrong type, is missing, unknown, or out of its bounds.
    InvalidField,
    /// 400: a service name, instance id or zone breaks its naming rules.
    InvalidName,
    /// 400: a query parameter is malformed.
    InvalidQuery,
    /// 404: the instance is not registered (the client re-registers on this).
    UnknownInstance,
    /// 404: no such route.
    NotFound,
    /// 405: the route exists but not with this method.
    MethodNotAllowed,
    /// 401: no token, or one the registry does not know (`WWW-Authenticate: Bearer`).
    Unauthenticated,
    /// 403: the token is known but lacks the right this request needs.
    PermissionDenied,
    /// 429: a size cap was reached (services, instances per service, watches per client).
    LimitExceeded,
    /// 413: the body is larger than the registry accepts.
    PayloadTooLarge,
    /// 408: the request body did not arrive within the registry's body timeout.
    RequestTimeout,
    /// 415: a body was sent with a content type other than JSON.
    UnsupportedMediaType,
    /// 503: the store cannot take writes right now (etcd without quorum).
    Unavailable,
    /// 503: a limit was reached (connections, pending requests).
    Overloaded,
    /// 500: a bug; the message says what.
    Internal,
    // Sidecar-produced errors.
    /// 503: nothing registered or healthy for the target service.
    NoEndpoints,
    /// 502: every attempt to reach an endpoint failed.
    UpstreamFailed,
    /// 504: the overall timeout expired.
    Timeout,
    /// 400: the request cannot be routed (no usable Host, malformed).
    BadRequest,
    /// 403: a sidecar's inbound side refuses this caller (`--allow-from`).
    NotAllowed,
    /// Any code this version does not know (a newer peer).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::InvalidQuery => "invalid_query",
            ErrorCode::UnknownInstance => "unknown_instance",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Internal => "internal",
            ErrorCode::NoEndpoints => "no_endpoints",
            ErrorCode::UpstreamFailed => "upstream_failed",
            ErrorCode::Timeout => "timeout",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::NotAllowed => "not_allowed",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `{"error":"<code>","message":"<what is wrong>"}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(error: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody { error, message: message.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_documented() {
        let b = ErrorBody::new(ErrorCode::UnknownInstance, "no such instance");
        let s = serde_json::to_string(&b).unwrap();
        assert_eq!(s, r#"{"error":"unknown_instance","message":"no such instance"}"#);
        let back: ErrorBody = serde_json::from_str(r#"{"error":"from_the_future","message":""}"#).unwrap();
        assert_eq!(back.error, ErrorCode::Unknown);
        for c in [ErrorCode::InvalidJson, ErrorCode::NoEndpoints, ErrorCode::PayloadTooLarge] {
            assert_eq!(serde_json::to_string(&c).unwrap(), format!("\"{}\"", c.as_str()));
        }
    }
}
