//! How the sidecar talks to the registry securely: its token and TLS files,
//! mapped onto the shared client's [`ClientConfig`] and checked at start.

use std::path::PathBuf;

use clap::Args;
use trellis_shared::tls::TlsFiles;
use trellis_shared::token::{TokenSource, TokenSpec};
use trellis_shared::ClientConfig;

use super::{bad, ConfigError};

/// The environment variable holding the token itself. It has no flag: a flag's
/// value would show in `ps`.
pub const TOKEN_ENV: &str = "TRELLIS_TOKEN";

/// Registry credentials and TLS.
#[derive(Debug, Args)]
pub struct RegistryClientArgs {
    /// File holding the token sent as `Authorization: Bearer` on every registry call; re-read
    /// when it changes (checked every second, and after a 401), so a token is rotated without a
    /// restart. Surrounding whitespace is ignored. Alternatively set TRELLIS_TOKEN to the token
    /// itself. Default: no token.
    #[arg(long, env = "TRELLIS_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for `https://` registry URLs, instead of the bundled web
    /// roots (then only these). Default: the web roots.
    #[arg(long, env = "TRELLIS_REGISTRY_CA", value_name = "PATH")]
    pub registry_ca: Option<PathBuf>,
    /// PEM client certificate to present to the registry (with --registry-key). Default: none.
    #[arg(long, env = "TRELLIS_REGISTRY_CERT", value_name = "PATH", requires = "registry_key")]
    pub registry_cert: Option<PathBuf>,
    /// PEM private key of --registry-cert.
    #[arg(long, env = "TRELLIS_REGISTRY_KEY", value_name = "PATH", requires = "registry_cert")]
    pub registry_key: Option<PathBuf>,
}

impl RegistryClientArgs {
    /// Adds the token and TLS files to `client`, reading each file once so a
    /// bad one stops the sidecar at start.
    pub fn apply(&self, client: ClientConfig) -> Result<ClientConfig, ConfigError> {
        let env_token = std::env::var(TOKEN_ENV).ok().filter(|t| !t.trim().is_empty());
        let token = match (&self.token_file, env_token) {
            (Some(_), Some(_)) => {
                return Err(bad(format!("--token-file and {TOKEN_ENV} are both set; pick one")))
            }
            (Some(path), None) => TokenSpec::File(path.clone()),
            (None, Some(secret)) => TokenSpec::Secret(secret),
            (None, None) => TokenSpec::None,
        };
        TokenSource::load(&token).map_err(|e| bad(format!("registry token: {e}")))?;
        let tls = TlsFiles {
            ca: self.registry_ca.clone(),
            cert: self.registry_cert.clone(),
            key: self.registry_key.clone(),
        };
        let _checked =
            trellis_shared::tls::apply(reqwest::Client::builder(), &tls).map_err(|e| bad(e.to_string()))?;
        Ok(ClientConfig { token, tls, ..client })
    }
}
