//! The compiled rules: service patterns, tokens, and finding a token by its secret.
//!
//! Secrets are never kept: a token is known by the SHA-256 digest of its
//! secret, and a presented secret is hashed and looked up by digest. The
//! lookup is constant-time with respect to the secret in the way that
//! matters: the hash map compares digests, not secrets, and what its probing
//! could leak through timing is at most how a digest compares with stored
//! ones. Learning bits of a digest does not help to build a secret that hashes
//! to it (SHA-256 is preimage resistant), so an attacker cannot grow a correct
//! secret byte by byte as with a naive `==` on the secrets themselves. The
//! final confirmation uses `subtle`'s constant-time equality on the digests,
//! so no early-exit comparison touches stored material at all.

use std::collections::HashMap;

use ring::digest::{digest, SHA256};
use subtle::ConstantTimeEq;
use trellis_shared::ServiceName;

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// The digest of a presented secret.
pub fn digest_of(secret: &[u8]) -> Digest {
    let d = digest(&SHA256, secret);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// What a request without a token may do (`default` in the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anonymous {
    /// Nothing but `/health`.
    Deny,
    /// Discover every service and read `/metrics`; never write.
    Read,
}

/// Which services a rule covers: one name, every name, or a prefix (`billing-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Any,
    Prefix(String),
    Exact(ServiceName),
}

impl Pattern {
    /// `*`, `prefix*` or a valid service name.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(Pattern::Any);
        }
        if let Some(prefix) = s.strip_suffix('*') {
            let ok = !prefix.is_empty()
                && prefix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !ok {
                return Err(format!(
                    "pattern {s:?}: a prefix before \"*\" must be lowercase letters, digits or \"-\""
                ));
            }
            return Ok(Pattern::Prefix(prefix.to_string()));
        }
        ServiceName::new(s).map(Pattern::Exact).map_err(|e| {
            format!("pattern {s:?} is neither \"*\", a prefix ending in \"*\" nor a service name: {e}")
        })
    }

    pub fn matches(&self, service: &ServiceName) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Prefix(p) => service.as_str().starts_with(p.as_str()),
            Pattern::Exact(name) => name == service,
        }
    }
}

/// One token: its name (shown in logs and errors), the digest of its secret
/// and its rights.
pub struct Token {
    pub name: String,
    pub(super) digest: Digest,
    pub admin: bool,
    pub write: Vec<Pattern>,
    pub read: Vec<Pattern>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("digest", &"<redacted>")
            .field("admin", &self.admin)
            .field("write", &self.write)
            .field("read", &self.read)
            .finish()
    }
}

impl Token {
    pub fn may_write(&self, service: &ServiceName) -> bool {
        self.admin || self.write.iter().any(|p| p.matches(service))
    }

    pub fn may_read(&self, service: &ServiceName) -> bool {
        self.admin || self.read.iter().any(|p| p.matches(service))
    }
}

/// A whole file's rules, immutable once built; a reload builds new ones.
pub struct Rules {
    pub anonymous: Anonymous,
    tokens: Vec<Token>,
    by_digest: HashMap<Digest, usize>,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules").field("anonymous", &self.anonymous).field("tokens", &self.tokens).finish()
    }
}

impl Rules {
    /// Rules over `tokens`, whose names and digests the caller checked unique.
    pub(super) fn new(anonymous: Anonymous, tokens: Vec<Token>) -> Self {
        let by_digest = tokens.iter().enumerate().map(|(i, t)| (t.digest, i)).collect();
        Rules { anonymous, tokens, by_digest }
    }

    /// The token whose secret is `secret`, with its index. Hashes on the
    /// stack: no allocation on the request path.
    pub fn find(&self, secret: &[u8]) -> Option<(usize, &Token)> {
        let presented = digest_of(secret);
        let &i = self.by_digest.get(&presented)?;
        let token = self.tokens.get(i)?;
        bool::from(token.digest.ct_eq(&presented)).then_some((i, token))
    }

    pub fn token(&self, index: usize) -> Option<&Token> {
        self.tokens.get(index)
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    #[test]
    fn patterns_match_names_prefixes_and_everything() {
        let p = Pattern::parse("billing-*").unwrap();
        assert!(p.matches(&name("billing-eu")) && !p.matches(&name("billing")) && !p.matches(&name("users")));
        assert!(Pattern::parse("*").unwrap().matches(&name("x")));
        let e = Pattern::parse("users").unwrap();
        assert!(e.matches(&name("users")) && !e.matches(&name("users-2")));
        for bad in ["", "Users", "*x", "a*b*", "a b", "-*x"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_are_found_by_their_secret_only() {
        let t = Token {
            name: "users".into(),
            digest: digest_of(b"s3"),
            admin: false,
            write: vec![],
            read: vec![],
        };
        let rules = Rules::new(Anonymous::Deny, vec![t]);
        assert_eq!(rules.find(b"s3").map(|(i, t)| (i, t.name.as_str())), Some((0, "users")));
        assert!(rules.find(b"s4").is_none() && rules.find(b"").is_none());
        let debug = format!("{rules:?}");
        assert!(
            debug.contains("<redacted>") && !debug.contains(&format!("{:?}", digest_of(b"s3"))),
            "{debug}"
        );
    }
}
