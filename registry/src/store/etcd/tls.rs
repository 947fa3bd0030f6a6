//! TLS towards etcd: the rustls client configuration built from the PEM files
//! of `--etcd-ca`, `--etcd-cert` and `--etcd-key`, and the diagnosis of a
//! failed handshake. A TLS failure is etcd (or its certificate) saying no, not
//! etcd being away, so the registry stops on it at start instead of retrying.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, RootCertStore};

use super::config::AccessError;

/// A PEM file's path (for messages) and contents.
pub type PemFile<'a> = (&'a Path, Vec<u8>);

/// A client configuration trusting only the CA in `ca`, presenting `identity`
/// (certificate chain, private key) when given.
pub fn client_config(
    (ca_path, ca): (&Path, &[u8]),
    identity: Option<(PemFile<'_>, PemFile<'_>)>,
) -> Result<rustls::ClientConfig, AccessError> {
    let invalid = |flag: &'static str, path: &Path, reason: String| AccessError::Invalid {
        flag,
        path: path.to_path_buf(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca) {
        let cert = cert.map_err(|e| invalid("--etcd-ca", ca_path, format!("not PEM certificates: {e}")))?;
        roots.add(cert).map_err(|e| invalid("--etcd-ca", ca_path, format!("not a CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(invalid("--etcd-ca", ca_path, "holds no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("--etcd-ca", ca_path, format!("no TLS version available: {e}")))?
        .with_root_certificates(roots);
    let Some(((cert_path, cert), (key_path, key))) = identity else {
        return Ok(builder.with_no_client_auth());
    };
    let chain = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("--etcd-cert", cert_path, format!("not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(invalid("--etcd-cert", cert_path, "holds no certificate".into()));
    }
    // The key's own parse error might quote the file: say only what is wrong.
    let key = PrivateKeyDer::from_pem_slice(&key)
        .map_err(|_| invalid("--etcd-key", key_path, "holds no PEM private key".into()))?;
    builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| invalid("--etcd-key", key_path, format!("does not fit --etcd-cert: {e}")))
}

/// The rustls error somewhere in `err`'s chain of causes. An `io::Error`
/// hides its inner error from `source()`, so it is opened explicitly.
fn find_rustls<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(r) = find_rustls(inner) {
                return Some(r);
            }
        }
        cur = e.source();
    }
    None
}

/// What went wrong with TLS, in the operator's terms, when `err` is a TLS
/// failure; `None` for anything else (a refused connection, a timeout).
pub fn diagnose(err: &(dyn std::error::Error + 'static), private_ca: bool) -> Option<String> {
    let tls = find_rustls(err)?;
    Some(match tls {
        rustls::Error::InvalidCertificate(why) => {
            let against = if private_ca { "against --etcd-ca" } else { "against the built-in roots (give --etcd-ca)" };
            format!("etcd's certificate did not verify {against}: {why:?}")
        }
        rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::AccessDenied,
        ) => format!(
            "etcd refused our client certificate ({tls}): give --etcd-cert and --etcd-key, issued by a CA etcd trusts"
        ),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            format!("TLS with etcd failed ({tls}): does this etcd member serve https?")
        }
        other => format!("TLS with etcd failed: {other}"),
    })
}
