//! Errors the sidecar produces, mapped to status and JSON body in one place.
//!
//! Every answer the sidecar makes up itself (as opposed to relaying an
//! upstream's response) carries `{"error":"<code>","message":"..."}` and the
//! header `x-trellis-error: <code>`, so a caller can tell a sidecar error from
//! the upstream application's own 502 or 503. A gRPC caller gets the same
//! error as a trailers-only gRPC answer (`grpc-status`, `grpc-message`) with
//! the same header, since gRPC clients read no JSON.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use trellis_shared::{ErrorBody, ErrorCode, ServiceName};

/// Header naming the error code on every sidecar-produced error.
pub const ERROR_HEADER: &str = "x-trellis-error";

/// An error the sidecar answers itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request names no usable target service.
    #[error("{0}")]
    BadRequest(String),
    /// Nothing registered or healthy for the service.
    #[error("no endpoints for service {0}")]
    NoEndpoints(ServiceName),
    /// Every attempt failed; carries the last cause.
    #[error("every attempt to reach {service} failed ({attempts} attempts): {cause}")]
    UpstreamFailed { service: ServiceName, attempts: u32, cause: String },
    /// The overall timeout (or the last per-try timeout) expired.
    #[error("no response from {service} within {waited:?}")]
    Timeout { service: ServiceName, waited: std::time::Duration },
    /// A limit was reached (connections, pending requests, watched services).
    #[error("{0}")]
    Overloaded(&'static str),
    /// The inbound side refuses this caller's service (`--allow-from`).
    #[error("service {caller} may not call {callee}")]
    NotAllowed { caller: ServiceName, callee: ServiceName },
}

impl ProxyError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ProxyError::BadRequest(_) => ErrorCode::BadRequest,
            ProxyError::NoEndpoints(_) => ErrorCode::NoEndpoints,
            ProxyError::UpstreamFailed { .. } => ErrorCode::UpstreamFailed,
            ProxyError::Timeout { .. } => ErrorCode::Timeout,
            ProxyError::Overloaded(_) => ErrorCode::Overloaded,
            ProxyError::NotAllowed { .. } => ErrorCode::NotAllowed,
        }
    }

    pub fn status(&self) -> StatusCode {
        status_of(self.code())
    }

    /// The response for this error; `make_body` wraps the JSON bytes in the
    /// server's body type.
    pub fn to_response<B>(&self, make_body: impl FnOnce(Bytes) -> B) -> Response<B> {
        error_response(self.code(), &self.to_string(), make_body)
    }

    /// The answer to a gRPC call: `200`, trailers-only, with the gRPC status
    /// the error means (`UNAVAILABLE` 14 for no endpoints, overload and failed
    /// attempts, `DEADLINE_EXCEEDED` 4 for the timeout, `INTERNAL` 13 for a
    /// bad request, as gRPC maps HTTP 400).
    pub fn to_grpc_response<B>(&self, body: B) -> Response<B> {
        let code = self.code();
        let grpc_status: &'static str = match code {
            ErrorCode::Timeout => "4",
            ErrorCode::BadRequest => "13",
            // gRPC maps HTTP 403 to PERMISSION_DENIED.
            ErrorCode::NotAllowed => "7",
            _ => "14",
        };
        let mut resp = Response::new(body);
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from_static(grpc_status));
        if let Ok(v) = HeaderValue::from_str(&percent_encode(&self.to_string())) {
            h.insert("grpc-message", v);
        }
        h.insert(ERROR_HEADER, HeaderValue::from_static(code.as_str()));
        resp
    }
}

/// `grpc-message` encoding: printable ASCII except `%` as is, the rest `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The one mapping from error code to status.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::NoEndpoints | ErrorCode::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::UpstreamFailed => StatusCode::BAD_GATEWAY,
        ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::NotAllowed => StatusCode::FORBIDDEN,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Builds a sidecar error response for `code` with `message`.
pub fn error_response<B>(code: ErrorCode, message: &str, make_body: impl FnOnce(Bytes) -> B) -> Response<B> {
    let json = serde_json::to_vec(&ErrorBody::new(code, message)).unwrap_or_default();
    let mut resp = Response::new(make_body(Bytes::from(json)));
    *resp.status_mut() = status_of(code);
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(ERROR_HEADER, HeaderValue::from_static(code.as_str()));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_codes_to_status_body_and_header() {
        let svc = ServiceName::new("users").unwrap();
        let cases = [
            (ProxyError::BadRequest("no Host".into()), 400, "bad_request"),
            (ProxyError::NoEndpoints(svc.clone()), 503, "no_endpoints"),
            (
                ProxyError::UpstreamFailed { service: svc.clone(), attempts: 2, cause: "reset".into() },
                502,
                "upstream_failed",
            ),
            (ProxyError::Timeout { service: svc, waited: std::time::Duration::from_secs(1) }, 504, "timeout"),
            (ProxyError::Overloaded("too many pending requests"), 503, "overloaded"),
        ];
        for (err, status, code) in cases {
            let resp = err.to_response(|b| b);
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(resp.headers()[ERROR_HEADER], code);
            let body: ErrorBody = serde_json::from_slice(resp.body()).unwrap();
            assert_eq!(body.error.as_str(), code);
            assert_eq!(body.message, err.to_string());
        }
    }

    #[test]
    fn grpc_callers_get_a_trailers_only_status() {
        let svc = ServiceName::new("users").unwrap();
        let cases = [
            (ProxyError::NoEndpoints(svc.clone()), "14"),
            (ProxyError::Timeout { service: svc, waited: std::time::Duration::from_secs(1) }, "4"),
            (ProxyError::BadRequest("no Host: 100%".into()), "13"),
        ];
        for (err, status) in cases {
            let resp = err.to_grpc_response(());
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.headers()["grpc-status"], status);
            assert_eq!(resp.headers()["content-type"], "application/grpc");
            assert_eq!(resp.headers()[ERROR_HEADER], err.code().as_str());
        }
        assert_eq!(percent_encode("a 100% é"), "a 100%25 %C3%A9");
    }
}
