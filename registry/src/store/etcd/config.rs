//! How the registry proves itself to etcd and checks etcd in turn: the TLS and
//! auth flags of the etcd store, and loading the files they name.
//!
//! TLS is chosen per store: `--store etcd+https://...` always speaks TLS;
//! `--store etcd://...` speaks TLS when `--etcd-ca` or `--etcd-cert` is given
//! (a CA or a client certificate means nothing over plain text) and plain HTTP
//! otherwise. Files are read once, at start; a file that cannot be read or
//! parsed stops the registry with a message naming it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::auth::{Credentials, Password};
use super::tls;

/// etcd's TLS: which CA to trust and which certificate to present.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EtcdTlsArgs {
    /// etcd store: trust only this CA (PEM) for etcd members' certificates,
    /// instead of the built-in roots. Implies https to etcd.
    #[arg(long, env = "TRELLIS_ETCD_CA", value_name = "PATH")]
    pub etcd_ca: Option<PathBuf>,
    /// etcd store: client certificate (PEM) presented to etcd (for members
    /// started with `--client-cert-auth`). Needs `--etcd-key` and `--etcd-ca`.
    #[arg(long, env = "TRELLIS_ETCD_CERT", value_name = "PATH", requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<PathBuf>,
    /// etcd store: private key (PEM) of `--etcd-cert`.
    #[arg(long, env = "TRELLIS_ETCD_KEY", value_name = "PATH", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

/// etcd's own authentication (users and roles).
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdAuthArgs {
    /// etcd store: the etcd user the registry authenticates as (etcd's auth,
    /// `registry etcd-setup` creates it). Needs `--etcd-password-file`.
    #[arg(long, env = "TRELLIS_ETCD_USER", value_name = "NAME", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// etcd store: file holding the password of `--etcd-user` (one line; a
    /// trailing newline is ignored). Read once, at start.
    #[arg(long, env = "TRELLIS_ETCD_PASSWORD_FILE", value_name = "PATH", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
    /// etcd store: period of re-authentication with etcd. Keep it at most half
    /// of etcd's `--auth-token-ttl` (300 s by default). A request that etcd
    /// answers "invalid auth token" re-authenticates at once regardless.
    #[arg(long, env = "TRELLIS_ETCD_TOKEN_REFRESH", default_value = "60s", value_parser = humantime::parse_duration)]
    pub etcd_token_refresh: Duration,
}

/// The registry's flags for reaching etcd securely; flattened into `Config`.
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdClientArgs {
    #[command(flatten)]
    pub tls: EtcdTlsArgs,
    #[command(flatten)]
    pub auth: EtcdAuthArgs,
}

/// A file named by a flag that cannot be used; stops the registry at start.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("cannot read {flag} {}: {source}", path.display())]
    Read { flag: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{flag} {}: {reason}", path.display())]
    Invalid { flag: &'static str, path: PathBuf, reason: String },
}

/// What the flags name, loaded: the TLS client configuration (when TLS is on)
/// and the credentials (when auth is on).
#[derive(Clone, Default)]
pub struct EtcdAccess {
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Whether a CA was given (to explain a certificate that did not verify).
    pub private_ca: bool,
    pub credentials: Option<Credentials>,
    /// Period of proactive re-authentication.
    pub token_refresh: Duration,
}

impl std::fmt::Debug for EtcdAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAccess")
            .field("tls", &self.tls.is_some())
            .field("private_ca", &self.private_ca)
            .field("credentials", &self.credentials)
            .field("token_refresh", &self.token_refresh)
            .finish()
    }
}

pub(crate) fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, AccessError> {
    std::fs::read(path).map_err(|source| AccessError::Read { flag, path: path.to_path_buf(), source })
}

/// Reads a password file: its first line, without the line ending.
pub fn read_password(flag: &'static str, path: &Path) -> Result<Password, AccessError> {
    let bytes = read(flag, path)?;
    let text = String::from_utf8(bytes).map_err(|_| AccessError::Invalid {
        flag,
        path: path.to_path_buf(),
        reason: "is not UTF-8 text".into(),
    })?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(AccessError::Invalid { flag, path: path.to_path_buf(), reason: "is empty".into() });
    }
    Ok(Password::new(line.to_string()))
}

impl EtcdTlsArgs {
    /// Whether these flags turn TLS on for `etcd://` endpoints.
    pub fn wants_tls(&self) -> bool {
        self.etcd_ca.is_some() || self.etcd_cert.is_some()
    }

    /// The rustls configuration these flags describe, or `None` when they
    /// name nothing (plain HTTP, or https with the built-in roots).
    pub fn load(&self) -> Result<Option<Arc<rustls::ClientConfig>>, AccessError> {
        let Some(ca_path) = &self.etcd_ca else { return Ok(None) };
        let ca = read("--etcd-ca", ca_path)?;
        let identity = match (&self.etcd_cert, &self.etcd_key) {
            (Some(cert), Some(key)) => Some((
                (cert.as_path(), read("--etcd-cert", cert)?),
                (key.as_path(), read("--etcd-key", key)?),
            )),
            _ => None,
        };
        tls::client_config((ca_path, &ca), identity).map(|c| Some(Arc::new(c)))
    }
}

impl EtcdClientArgs {
    /// Reads every file the flags name.
    pub fn load(&self) -> Result<EtcdAccess, AccessError> {
        let credentials = match (&self.auth.etcd_user, &self.auth.etcd_password_file) {
            (Some(user), Some(path)) => Some(Credentials {
                user: user.clone(),
                password: read_password("--etcd-password-file", path)?,
            }),
            _ => None,
        };
        Ok(EtcdAccess {
            tls: self.tls.load()?,
            private_ca: self.tls.etcd_ca.is_some(),
            credentials,
            token_refresh: self.auth.etcd_token_refresh,
        })
    }
}

/// The endpoints with the scheme the flags imply: https when TLS was asked
/// for by `etcd+https://` (already in the URL) or by a CA or client certificate.
pub fn with_scheme(mut endpoints: Vec<url::Url>, tls: &EtcdTlsArgs) -> Vec<url::Url> {
    if tls.wants_tls() {
        for u in &mut endpoints {
            // Changing http to https on a parsed URL cannot fail.
            let _ = u.set_scheme("https");
        }
    }
    endpoints
}
