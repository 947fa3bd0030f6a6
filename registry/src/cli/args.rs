//! The flags every operator command shares: where the registry is, the token,
//! TLS towards a registry with a private CA, the request timeout, and `--json`.
//!
//! The token and TLS flags are named as the sidecar's (`--token-file`,
//! `--registry-ca`, ...) with the same variables, so one environment serves
//! both; the files are read here once, so a bad one is reported before any
//! request is sent.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use trellis_shared::client::parse_urls;
use trellis_shared::tls::TlsFiles;
use trellis_shared::token::{TokenSource, TokenSpec};
use trellis_shared::{ClientConfig, RegistryClient};

use super::error::{CliError, Context};

/// The variable holding the token itself. It has no flag: a flag's value would show in `ps`.
pub const TOKEN_ENV: &str = "TRELLIS_TOKEN";

/// The registry asked when neither `--registry` nor `TRELLIS_REGISTRY` says.
pub const DEFAULT_REGISTRY: &str = "http://127.0.0.1:7600";

/// Where the registry is and how to reach it.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Registry URL(s), comma-separated; when one cannot be reached the next is tried.
    #[arg(long, env = "TRELLIS_REGISTRY", value_name = "URL[,URL...]", default_value = DEFAULT_REGISTRY)]
    pub registry: String,
    /// File holding the token sent as `Authorization: Bearer` (surrounding whitespace ignored).
    /// Alternatively set TRELLIS_TOKEN to the token itself. Default: no token.
    #[arg(long, env = "TRELLIS_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for `https://` registry URLs instead of the bundled web
    /// roots (then only these), e.g. the `ca.pem` of `registry init`. Default: the web roots.
    #[arg(long, env = "TRELLIS_REGISTRY_CA", value_name = "PATH")]
    pub registry_ca: Option<PathBuf>,
    /// PEM client certificate to present, for a registry that asks for one (with --registry-key).
    #[arg(long, env = "TRELLIS_REGISTRY_CERT", value_name = "PATH", requires = "registry_key")]
    pub registry_cert: Option<PathBuf>,
    /// PEM private key of --registry-cert.
    #[arg(long, env = "TRELLIS_REGISTRY_KEY", value_name = "PATH", requires = "registry_cert")]
    pub registry_key: Option<PathBuf>,
    /// How long one request to one registry may take, connecting included.
    #[arg(long, env = "TRELLIS_CLI_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, Args)]
pub struct Format {
    /// Print JSON (the registry's own documents; `watch` prints one object per line) instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl Target {
    /// Where the token comes from: `--token-file` or `TRELLIS_TOKEN`, not both.
    fn token(&self) -> Result<TokenSpec, CliError> {
        let env_token = std::env::var(TOKEN_ENV).ok().filter(|t| !t.trim().is_empty());
        match (&self.token_file, env_token) {
            (Some(_), Some(_)) => {
                Err(CliError::Setup(format!("--token-file and {TOKEN_ENV} are both set; pick one")))
            }
            (Some(path), None) => Ok(TokenSpec::File(path.clone())),
            (None, Some(secret)) => Ok(TokenSpec::Secret(secret)),
            (None, None) => Ok(TokenSpec::None),
        }
    }

    fn tls(&self) -> TlsFiles {
        TlsFiles {
            ca: self.registry_ca.clone(),
            cert: self.registry_cert.clone(),
            key: self.registry_key.clone(),
        }
    }

    /// What an error message may add about the setup.
    pub fn context(&self) -> Context {
        let token = self.token_file.is_some() || std::env::var(TOKEN_ENV).is_ok_and(|t| !t.trim().is_empty());
        Context { token, ca: self.registry_ca.is_some(), timeout: self.timeout }
    }

    /// A client for the registry, its token and TLS files read and checked.
    /// Needs a Tokio runtime (a token file is polled for changes).
    pub fn client(&self) -> Result<RegistryClient, CliError> {
        let token = self.token()?;
        TokenSource::load(&token).map_err(|e| CliError::Setup(format!("registry token: {e}")))?;
        let tls = self.tls();
        let _checked = trellis_shared::tls::apply(reqwest::Client::builder(), &tls)
            .map_err(|e| CliError::Setup(e.to_string()))?;
        let urls = parse_urls(&self.registry).map_err(|e| CliError::Setup(format!("--registry: {e}")))?;
        let config = ClientConfig {
            request_timeout: self.timeout,
            connect_timeout: self.timeout,
            token,
            tls,
            ..ClientConfig::default()
        };
        RegistryClient::new(urls, config).map_err(|e| CliError::Setup(e.to_string()))
    }
}
