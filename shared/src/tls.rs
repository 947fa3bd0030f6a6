//! TLS towards the registry: which certificate authorities the client trusts,
//! the client certificate it presents, and what a failed handshake means.
//!
//! With `ca` set, only that CA is trusted (the bundled web roots are turned
//! off, so a public certificate for the registry's name does not do); without
//! it, the bundled web roots. A certificate that does not verify is an error
//! naming the URL; there is no fallback to plain text.

use std::path::{Path, PathBuf};

/// The files TLS towards the registry is built from; all optional.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// PEM bundle of the CA(s) to trust instead of the web roots.
    pub ca: Option<PathBuf>,
    /// PEM client certificate (chain) to present.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }
}

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{what} {} holds no usable PEM {expected}: {reason}", path.display())]
    Pem { what: &'static str, path: PathBuf, expected: &'static str, reason: String },
    #[error("a client certificate needs both --registry-cert and --registry-key")]
    HalfIdentity,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })
}

/// Applies `files` to a reqwest client builder. Every file is read and parsed
/// here, so a bad one stops the caller at start.
pub fn apply(
    mut builder: reqwest::ClientBuilder,
    files: &TlsFiles,
) -> Result<reqwest::ClientBuilder, TlsError> {
    if let Some(path) = &files.ca {
        let what = "--registry-ca";
        let pem = read(what, path)?;
        let bad =
            |reason: String| TlsError::Pem { what, path: path.clone(), expected: "CERTIFICATE", reason };
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no certificate found".into()));
        }
        builder = builder.tls_built_in_root_certs(false);
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    match (&files.cert, &files.key) {
        (None, None) => {}
        (Some(cert), Some(key)) => {
            let mut pem = read("--registry-cert", cert)?;
            if !pem.ends_with(b"\n") {
                pem.push(b'\n');
            }
            let key_pem = read("--registry-key", key)?;
            if !key_pem.windows(11).any(|w| w == b"PRIVATE KEY") {
                return Err(TlsError::Pem {
                    what: "--registry-key",
                    path: key.clone(),
                    expected: "PRIVATE KEY",
                    reason: "no private key found".into(),
                });
            }
            pem.extend_from_slice(&key_pem);
            // The error may describe the key material; name the files only.
            let identity = reqwest::Identity::from_pem(&pem).map_err(|_| TlsError::Pem {
                what: "--registry-cert/--registry-key",
                path: cert.clone(),
                expected: "CERTIFICATE and PRIVATE KEY",
                reason: format!("the certificate and the key in {} do not make an identity", key.display()),
            })?;
            builder = builder.identity(identity);
        }
        _ => return Err(TlsError::HalfIdentity),
    }
    Ok(builder)
}

/// What a failed TLS handshake says, found in an error's chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The registry's certificate did not verify against the trusted CAs.
    ServerCertificate,
    /// The registry refused (or required) our client certificate.
    ClientCertificate,
}

impl HandshakeFailure {
    /// Walks `err`'s sources for a rustls error. `io::Error::source` skips the
    /// error it wraps, so each `io::Error` is looked into as well.
    pub fn of(err: &(dyn std::error::Error + 'static)) -> Option<HandshakeFailure> {
        let mut next = Some(err);
        while let Some(e) = next {
            let inner = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref());
            for candidate in
                [Some(e), inner.map(|i| i as &(dyn std::error::Error + 'static))].into_iter().flatten()
            {
                if let Some(found) = candidate.downcast_ref::<rustls::Error>().and_then(Self::classify) {
                    return Some(found);
                }
            }
            // reqwest may box the connector's error in a type of its own; rustls's
            // message for a certificate that did not verify is then all there is.
            if e.to_string().contains("invalid peer certificate") {
                return Some(HandshakeFailure::ServerCertificate);
            }
            next = e.source();
        }
        None
    }

    fn classify(e: &rustls::Error) -> Option<HandshakeFailure> {
        use rustls::AlertDescription as A;
        match e {
            rustls::Error::InvalidCertificate(_) => Some(HandshakeFailure::ServerCertificate),
            rustls::Error::AlertReceived(
                A::BadCertificate | A::CertificateRequired | A::UnknownCA | A::CertificateUnknown,
            ) => Some(HandshakeFailure::ClientCertificate),
            _ => None,
        }
    }
}
