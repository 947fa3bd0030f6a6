//! HTTPS: the `--tls-*` flags, the rustls server configuration built from
//! them, and its reload on SIGHUP.
//!
//! The configuration lives in an [`ArcSwap`]: every new connection loads the
//! current one (one reference-count increment), and a reload swaps in a new
//! one without touching connections already open. A reload that fails (a
//! missing file, a key that does not match its certificate) logs one error
//! and keeps the configuration in use, so a half-copied certificate never
//! takes the registry off the air.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

/// Protocols offered by ALPN, preferred first; hyper-util's auto builder serves both.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// HTTPS on `--listen`. Without `--tls-cert` and `--tls-key` the registry speaks plain HTTP.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain served on `--listen` (the registry's certificate
    /// first). Needs `--tls-key`. Re-read on SIGHUP.
    #[arg(long, env = "TRELLIS_TLS_CERT", value_name = "PATH", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert` (PKCS#8, PKCS#1 or SEC1). Re-read on SIGHUP.
    #[arg(long, env = "TRELLIS_TLS_KEY", value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: when set, every client must present a certificate
    /// signed by one of them, or the handshake fails. Re-read on SIGHUP.
    #[arg(long, env = "TRELLIS_TLS_CLIENT_CA", value_name = "PATH", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// True when the registry serves HTTPS.
    pub fn enabled(&self) -> bool {
        self.tls_cert.is_some()
    }

    /// The flags' relations, for configurations built without clap.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => Err("--tls-cert needs --tls-key".into()),
            (None, Some(_)) => Err("--tls-key needs --tls-cert".into()),
            (None, None) if self.tls_client_ca.is_some() => {
                Err("--tls-client-ca needs --tls-cert and --tls-key".into())
            }
            _ => Ok(()),
        }
    }
}

/// A TLS file that cannot be used; the message names the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {problem}")]
    Content { path: PathBuf, problem: String },
    #[error("{cert} and {key} do not make a usable server certificate: {source}")]
    Pair { cert: PathBuf, key: PathBuf, source: rustls::Error },
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn content(path: &Path, problem: impl ToString) -> TlsError {
    TlsError::Content { path: path.to_path_buf(), problem: problem.to_string() }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}

/// Every certificate in a PEM file; at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| content(path, format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(content(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// The private key in a PEM file. Errors never quote the file's content.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => content(path, "holds no PEM private key"),
        _ => content(path, "is not a readable PEM private key"),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the files named by `args` and builds the server configuration.
pub fn server_config(args: &TlsArgs) -> Result<ServerConfig, TlsError> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Err(TlsError::Config(rustls::Error::General("no --tls-cert and --tls-key".into())));
    };
    let chain = load_certs(cert)?;
    let private = load_key(key)?;
    let provider = provider();
    let builder =
        ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = match &args.tls_client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs(ca)? {
                roots.add(c).map_err(|e| content(ca, format!("not a usable CA certificate ({e})")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| content(ca, format!("cannot verify clients with it ({e})")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, private).map_err(|source| TlsError::Pair {
        cert: cert.clone(),
        key: key.clone(),
        source,
    })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The server configuration in use, swapped whole on reload.
pub struct Tls {
    args: TlsArgs,
    current: ArcSwap<ServerConfig>,
}

impl Tls {
    /// Loads the files named by `args`; an error names the file and the problem.
    pub fn load(args: &TlsArgs) -> Result<Self, TlsError> {
        let config = server_config(args)?;
        Ok(Tls { args: args.clone(), current: ArcSwap::from_pointee(config) })
    }

    /// What the next handshake uses.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }

    /// Re-reads the files; on error the configuration in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.args)?;
        self.current.store(Arc::new(config));
        Ok(())
    }

    /// Reloads on every SIGHUP until `stop` is cancelled.
    pub async fn reload_on_hangup(self: Arc<Self>, stop: CancellationToken) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: the TLS certificate will not be reloaded");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = hangups.recv() => if got.is_none() { return },
            }
            match self.reload() {
                Ok(()) => tracing::info!("TLS certificate reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "TLS reload failed; the previous certificate stays in use")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pki::{Authority, Usage};

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn bad_files_name_the_file_and_keep_the_old_config_on_reload() {
        let dir = std::env::temp_dir().join(format!("trellis-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Authority::generate("unit CA", Duration::from_secs(3600)).unwrap();
        let leaf = ca.issue(&["localhost".into()], Usage::Server, Duration::from_secs(3600)).unwrap();
        let other = ca.issue(&["localhost".into()], Usage::Server, Duration::from_secs(3600)).unwrap();
        let args = TlsArgs {
            tls_cert: Some(write(&dir, "cert.pem", &leaf.cert_pem)),
            tls_key: Some(write(&dir, "key.pem", &leaf.key_pem)),
            tls_client_ca: Some(write(&dir, "ca.pem", ca.cert_pem())),
        };
        let tls = Tls::load(&args).unwrap();
        assert_eq!(tls.current.load().alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);

        let missing = TlsArgs { tls_cert: Some(dir.join("nope.pem")), ..args.clone() };
        let e = Tls::load(&missing).err().unwrap().to_string();
        assert!(e.contains("nope.pem"), "{e}");
        write(&dir, "key.pem", "not a key");
        let e = tls.reload().unwrap_err().to_string();
        assert!(e.contains("key.pem") && e.contains("private key"), "{e}");
        // Another certificate's key: the pair is refused, and no key material is quoted.
        write(&dir, "key.pem", &other.key_pem);
        let e = tls.reload().unwrap_err().to_string();
        println!("{e}");
        assert!(e.contains("cert.pem") && !e.contains("PRIVATE"), "{e}");
        // The configuration in use is untouched.
        assert!(tls.current.load().alpn_protocols.len() == 2);

        assert!(TlsArgs { tls_key: None, ..args.clone() }.validate().is_err());
        assert!(TlsArgs { tls_cert: None, tls_key: None, ..args }.validate().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
