//! [`ApiState::authorize`]: the one place a request's token is checked.
//!
//! The token comes from `Authorization: Bearer <secret>`, `X-Trellis-Token` or
//! `X-Consul-Token` (for Consul-compatible clients), in that order. Finding
//! and checking it borrows the header's bytes and hashes on the stack: a
//! heartbeat pays one SHA-256 of its secret, one hash-map probe and one
//! `ArcSwap` load, and allocates only when it is refused.

use std::time::Instant;

use axum::http::{header, HeaderMap, HeaderName};
use tracing::warn;

use super::{ApiState, ClientAddr};
use crate::acl::decision::decide;
use crate::acl::{Acl, Grant, Need, Refusal};
use crate::error::ApiError;
use crate::metrics::ReasonLabels;

static TRELLIS_TOKEN: HeaderName = HeaderName::from_static("x-trellis-token");
static CONSUL_TOKEN: HeaderName = HeaderName::from_static("x-consul-token");

/// The secret a request presents, borrowed from its headers: a Bearer
/// `Authorization` first, then `X-Trellis-Token`, then `X-Consul-Token`.
/// Consul's clients may send an `Authorization` of another scheme beside
/// their token header (Prometheus sends an empty Basic one), so that scheme
/// yields to a token header; alone, it presents an empty secret, which no
/// token has: it is refused as unknown rather than ignored.
pub fn presented(headers: &HeaderMap) -> Option<&[u8]> {
    let authorization = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    if let Some(v) = authorization {
        if v.get(..7).is_some_and(|scheme| scheme.eq_ignore_ascii_case(b"bearer ")) {
            return Some(v[7..].trim_ascii());
        }
    }
    let token = headers.get(&TRELLIS_TOKEN).or_else(|| headers.get(&CONSUL_TOKEN));
    match (token, authorization) {
        (Some(t), _) => Some(t.as_bytes().trim_ascii()),
        (None, Some(_)) => Some(b""),
        (None, None) => None,
    }
}

impl<S> ApiState<S> {
    /// Whether the request may do what it `need`s; everything is allowed
    /// without `--acl-file`. A refusal is counted and, at most once a minute
    /// per client, logged with the client's address and the reason.
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        client: Option<ClientAddr>,
        need: Need<'_>,
    ) -> Result<Grant, ApiError> {
        let Some(acl) = &self.acl else { return Ok(Grant::everything()) };
        decide(&acl.rules(), presented(headers), need).map_err(|r| self.refused(acl, client, r))
    }

    #[cold]
    fn refused(&self, acl: &Acl, client: Option<ClientAddr>, refusal: Refusal) -> ApiError {
        let reason = refusal.reason();
        self.metrics.auth_failures.get_or_create(&ReasonLabels { reason }).inc();
        if let Some(ClientAddr(ip)) = client {
            let (failures, warn_now) = acl.failures.record(ip, Instant::now());
            if warn_now {
                match &refusal {
                    Refusal::Denied { token, what } => {
                        warn!(client = %ip, reason, token = %token, refused = %what, failures, "token check failed")
                    }
                    _ => warn!(client = %ip, reason, failures, "token check failed"),
                }
            }
        }
        match refusal {
            Refusal::Missing => ApiError::Unauthenticated(
                "this request needs a token: Authorization: Bearer <token> or X-Trellis-Token".into(),
            ),
            Refusal::Unknown => ApiError::Unauthenticated("the token is not known to this registry".into()),
            Refusal::Denied { token, what } => {
                ApiError::PermissionDenied(format!("token {token:?} may not {what}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn finds_the_token_in_any_of_its_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(presented(&h), None);
        h.insert(&CONSUL_TOKEN, HeaderValue::from_static("c"));
        assert_eq!(presented(&h), Some(b"c".as_slice()));
        h.insert(&TRELLIS_TOKEN, HeaderValue::from_static(" t "));
        assert_eq!(presented(&h), Some(b"t".as_slice()));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bEaReR  b"));
        assert_eq!(presented(&h), Some(b"b".as_slice()));
        // Another scheme yields to a token header, and alone presents nothing valid.
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic Og=="));
        assert_eq!(presented(&h), Some(b"t".as_slice()));
        let mut basic = HeaderMap::new();
        basic.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic dXNlcjpwYXNz"));
        assert_eq!(presented(&basic), Some(b"".as_slice()));
    }
}
