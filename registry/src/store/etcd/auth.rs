//! etcd's own authentication: the registry's credentials and the token etcd
//! hands out for them.
//!
//! `POST /v3/auth/authenticate` turns a user and password into a token that
//! every later request carries in its `Authorization` header (the watch too).
//! etcd forgets tokens: simple tokens after `--auth-token-ttl` unused (300 s by
//! default) and all of them when a member restarts. So the token is renewed
//! every `--etcd-token-refresh`, and at once when etcd answers that it does not
//! know it; the request that met the stale token is retried once with the new
//! one. The token is read lock-free (`ArcSwapOption`) on every request; renewals
//! are serialised, and one renewal serves every request that failed with the
//! token it replaced (a generation number tells them apart).

use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use reqwest::header::HeaderValue;
use std::sync::Arc;

/// A password: never printed, whatever prints the struct holding it.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    pub fn new(secret: String) -> Self {
        Password(secret)
    }

    /// The secret itself, for the one request body that needs it.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// An etcd user and its password.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: String,
    pub password: Password,
}

/// Whether etcd's answer means the token is missing, expired or outdated (a
/// new one fixes it), as opposed to a refusal of the user itself.
pub fn is_token_problem(code: i64, message: &str) -> bool {
    const UNAUTHENTICATED: i64 = 16;
    code == UNAUTHENTICATED
        || message.contains("invalid auth token")
        || message.contains("user name is empty")
        || message.contains("revision of auth store is old")
}

/// etcd's error text without its `etcdserver: ` prefix.
pub fn plain(message: &str) -> &str {
    message.strip_prefix("etcdserver: ").unwrap_or(message)
}

/// The credentials and the current token.
pub struct Session {
    pub credentials: Credentials,
    token: ArcSwapOption<HeaderValue>,
    generation: AtomicU64,
    /// Held while authenticating, so concurrent failures renew once.
    pub renewing: tokio::sync::Mutex<()>,
}

impl Session {
    pub fn new(credentials: Credentials) -> Self {
        Session {
            credentials,
            token: ArcSwapOption::empty(),
            generation: AtomicU64::new(0),
            renewing: tokio::sync::Mutex::new(()),
        }
    }

    /// The `Authorization` value to send (none while etcd has auth off) and
    /// the generation it belongs to.
    pub fn current(&self) -> (Option<Arc<HeaderValue>>, u64) {
        let generation = self.generation.load(Ordering::Acquire);
        (self.token.load_full(), generation)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Installs a new token (`None`: etcd has auth off, send nothing).
    pub fn replace(&self, token: Option<&str>) -> Result<(), String> {
        let value = match token {
            Some(t) => {
                let mut v =
                    HeaderValue::from_str(t).map_err(|_| "etcd sent a token that is no header value")?;
                v.set_sensitive(true);
                Some(Arc::new(v))
            }
            None => None,
        };
        self.token.store(value);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_stay_out_of_debug_and_tokens_are_told_apart_from_refusals() {
        let c = Credentials { user: "trellis".into(), password: Password::new("hunter2-secret".into()) };
        let shown = format!("{c:?}");
        assert!(shown.contains("trellis") && !shown.contains("hunter2"), "{shown}");
        assert!(is_token_problem(16, "etcdserver: invalid auth token"));
        assert!(is_token_problem(3, "etcdserver: user name is empty"));
        assert!(!is_token_problem(3, "etcdserver: authentication failed, invalid user ID or password"));
        assert!(!is_token_problem(7, "etcdserver: permission denied"));
        let s = Session::new(c);
        assert_eq!(s.current().1, 0);
        s.replace(Some("abc.15")).unwrap();
        let (token, generation) = s.current();
        assert_eq!(generation, 1);
        assert!(token.is_some_and(|t| t.is_sensitive()));
    }
}
