//! Mesh identity on the wire: what a sidecar sends to have its key certified
//! (`POST /v1/identity/sign`) and what the registry answers, plus the one
//! spelling of an identity both sides share.
//!
//! An identity is a SPIFFE ID in the leaf's only URI SAN,
//! `spiffe://<trust-domain>/svc/<service>` (docs/mtls.md says why).

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::names::ServiceName;

/// The trust domain when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "trellis.local";

/// `spiffe://<trust_domain>/svc/<service>`.
pub fn spiffe_id(trust_domain: &str, service: &ServiceName) -> String {
    format!("spiffe://{trust_domain}/svc/{service}")
}

/// Checks a trust domain: a lowercase DNS name (dot-separated labels of
/// `[a-z0-9-]`, none empty or starting or ending with `-`, at most 253
/// bytes), which is what SPIFFE allows in the authority of an ID and what
/// `<service>.svc.<trust-domain>` server names need.
pub fn check_trust_domain(s: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if s.is_empty() || s.len() > 253 || !s.split('.').all(label_ok) {
        return Err(format!(
            "trust domain {:?} is invalid: expected a lowercase DNS name such as {DEFAULT_TRUST_DOMAIN}",
            s.chars().take(64).collect::<String>()
        ));
    }
    Ok(())
}

/// `POST /v1/identity/sign`: certify the key of `csr` as `service`. The
/// registry uses only the request's public key (and checks its signature);
/// every name in it is ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignRequest {
    pub service: ServiceName,
    /// A PKCS#10 certificate request, PEM (`-----BEGIN CERTIFICATE REQUEST-----`).
    pub csr: String,
}

/// The answer to a [`SignRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignResponse {
    /// The identity certified, `spiffe://<trust-domain>/svc/<service>`.
    pub spiffe_id: String,
    /// The leaf, PEM.
    pub certificate: String,
    /// The roots a peer's leaf must chain to, PEM: one, or two while the CA
    /// is being rotated.
    pub ca_bundle: String,
    /// When the leaf expires, RFC 3339 (`2026-01-02T03:04:05Z`).
    pub not_after: String,
}

impl SignResponse {
    /// [`SignResponse::not_after`] as a time; `None` when it does not parse.
    pub fn expires(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339(&self.not_after).ok()
    }
}

/// A time as [`SignResponse::not_after`] carries it.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn identities_and_trust_domains() {
        let users = ServiceName::new("users").unwrap();
        assert_eq!(spiffe_id(DEFAULT_TRUST_DOMAIN, &users), "spiffe://trellis.local/svc/users");
        for ok in ["trellis.local", "prod", "a-b.example.com"] {
            assert!(check_trust_domain(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Trellis.local", "a..b", "-a.b", "a/b", "a b", "x.", &"a".repeat(64)] {
            assert!(check_trust_domain(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn not_after_round_trips_at_second_precision() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let r = SignResponse {
            spiffe_id: String::new(),
            certificate: String::new(),
            ca_bundle: String::new(),
            not_after: rfc3339(t),
        };
        assert_eq!(r.not_after, "2027-01-15T08:00:00Z");
        assert_eq!(r.expires(), Some(t));
        assert_eq!(SignResponse { not_after: "soon".into(), ..r }.expires(), None);
        let bad: Result<SignRequest, _> = serde_json::from_str(r#"{"service":"Users","csr":""}"#);
        assert!(bad.is_err());
    }
}
