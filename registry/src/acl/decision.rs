//! The decision: what a request needs, and whether the token it presents (or
//! none) has it.
//!
//! - No token: what `default` allows (with `"read"`: discovery and metrics).
//! - An unknown token is refused even where no token is needed, so a mistyped
//!   or revoked secret shows at once rather than as a silent downgrade.
//! - A known token has its own rights and never fewer than a request without
//!   a token. Admin tokens may do everything.

use std::sync::Arc;

use trellis_shared::ServiceName;

use super::rules::{Anonymous, Rules};

/// What a request needs.
#[derive(Debug, Clone, Copy)]
pub enum Need<'a> {
    /// Discover this service (a read or a blocking query).
    Read(&'a ServiceName),
    /// Register, heartbeat or deregister an instance of this service.
    Write(&'a ServiceName),
    /// `GET /metrics`.
    Metrics,
    /// `GET /v1/services`: allowed, then filtered by [`Grant::may_read`].
    List,
}

/// Why a request was refused; it names the token, never its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No token where one is needed.
    Missing,
    /// A token that matches none in the file.
    Unknown,
    /// A known token without the right.
    Denied { token: String, what: String },
}

impl Refusal {
    /// The bounded label of `trellis_registry_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Unknown => "unknown",
            Refusal::Denied { .. } => "denied",
        }
    }
}

/// What an allowed request may see: every service, or those its token (or the
/// default) may read.
#[derive(Debug, Clone)]
pub struct Grant {
    scope: Scope,
}

#[derive(Debug, Clone)]
enum Scope {
    Everything,
    Anonymous,
    Token(Arc<Rules>, usize),
}

impl Grant {
    /// The grant of a registry without an ACL file.
    pub fn everything() -> Self {
        Grant { scope: Scope::Everything }
    }

    pub fn may_read(&self, service: &ServiceName) -> bool {
        match &self.scope {
            // Anonymous reads got this far only with default = "read".
            Scope::Everything | Scope::Anonymous => true,
            Scope::Token(rules, i) => {
                rules.anonymous == Anonymous::Read || rules.token(*i).is_some_and(|t| t.may_read(service))
            }
        }
    }
}

/// Decides `need` for a request that presented `secret` (or none).
pub fn decide(rules: &Arc<Rules>, secret: Option<&[u8]>, need: Need<'_>) -> Result<Grant, Refusal> {
    let read_open = rules.anonymous == Anonymous::Read;
    let Some(secret) = secret else {
        let allowed = read_open && !matches!(need, Need::Write(_));
        return if allowed { Ok(Grant { scope: Scope::Anonymous }) } else { Err(Refusal::Missing) };
    };
    let Some((index, token)) = rules.find(secret) else { return Err(Refusal::Unknown) };
    let (allowed, what) = match need {
        Need::Write(s) => (token.may_write(s), Some(("write service", s))),
        Need::Read(s) => (read_open || token.may_read(s), Some(("read service", s))),
        Need::Metrics => (read_open || token.admin, None),
        Need::List => (true, None),
    };
    if allowed {
        return Ok(Grant { scope: Scope::Token(rules.clone(), index) });
    }
    let what = match what {
        Some((verb, s)) => format!("{verb} {:?}", s.as_str()),
        None => "read the metrics (admin only)".to_string(),
    };
    Err(Refusal::Denied { token: token.name.clone(), what })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::file::parse;

    #[test]
    fn decides_by_default_token_and_right() {
        let rules = Arc::new(
            parse(
                r#"
default = "deny"
[[tokens]]
name = "users"
secret = "u-secret"
write = ["users"]
read = ["users"]
[[tokens]]
name = "ops"
secret = "o-secret"
admin = true
"#,
            )
            .unwrap(),
        );
        let users = ServiceName::new("users").unwrap();
        let billing = ServiceName::new("billing").unwrap();
        let u = Some(b"u-secret".as_slice());
        assert!(decide(&rules, u, Need::Write(&users)).is_ok());
        assert_eq!(
            decide(&rules, u, Need::Write(&billing)).unwrap_err(),
            Refusal::Denied { token: "users".into(), what: "write service \"billing\"".into() }
        );
        assert!(decide(&rules, u, Need::Read(&billing)).is_err());
        assert!(decide(&rules, u, Need::Metrics).is_err());
        let grant = decide(&rules, u, Need::List).unwrap();
        assert!(grant.may_read(&users) && !grant.may_read(&billing));
        assert_eq!(decide(&rules, None, Need::Read(&users)).unwrap_err(), Refusal::Missing);
        assert_eq!(decide(&rules, Some(b"nope"), Need::List).unwrap_err(), Refusal::Unknown);
        let ops = Some(b"o-secret".as_slice());
        for need in [Need::Write(&billing), Need::Read(&billing), Need::Metrics, Need::List] {
            assert!(decide(&rules, ops, need).is_ok(), "{need:?}");
        }
        let open = Arc::new(parse("default = \"read\"").unwrap());
        assert!(
            decide(&open, None, Need::Read(&billing)).is_ok() && decide(&open, None, Need::Metrics).is_ok()
        );
        assert_eq!(decide(&open, None, Need::Write(&billing)).unwrap_err(), Refusal::Missing);
    }
}
