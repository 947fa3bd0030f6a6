//! The sidecar's mesh identity: its current leaf certificate and key, and the mesh's trust roots.
//!
//! One writer (the renewal task, or a fixed identity at start) swaps the whole state at once; every
//! handshake reads it through an `ArcSwap`, without a lock. The rustls configurations are built once
//! and reach the current state through their resolvers and verifiers (`identity/verify.rs`), so a
//! rotation never rebuilds a listener, and the client's session cache (resumption) survives it.
//!
//! The identity of a service is the SPIFFE ID `spiffe://<trust-domain>/svc/<service>` in a URI SAN,
//! what Consul Connect and Istio use: a URI cannot be mistaken for a DNS host name, so a mesh leaf can
//! never pass for a web server's certificate. On the wire an outbound sidecar names the service it
//! wants as the TLS server name `<service>.svc.<trust-domain>` (see [`MeshIdentity::server_name`]), and
//! the verifier maps that name back to the SPIFFE ID the peer must present.

pub mod renew;
mod verify;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use trellis_shared::ServiceName;

pub use trellis_shared::identity::DEFAULT_TRUST_DOMAIN;

/// A trust domain: a lowercase DNS name, the authority part of every SPIFFE ID in the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn new(s: impl Into<String>) -> Result<Self, IdentityError> {
        let s = s.into();
        match trellis_shared::identity::check_trust_domain(&s) {
            Ok(()) => Ok(TrustDomain(s)),
            Err(_) => Err(IdentityError::TrustDomain(s)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TrustDomain {
    fn default() -> Self {
        TrustDomain(DEFAULT_TRUST_DOMAIN.to_string())
    }
}

impl FromStr for TrustDomain {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TrustDomain::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The SPIFFE ID of `service` in `td`.
pub fn spiffe_id(td: &TrustDomain, service: &ServiceName) -> String {
    trellis_shared::identity::spiffe_id(td.as_str(), service)
}

/// Why an identity could not be installed or read. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid trust domain {0:?}: it must be a lowercase DNS name")]
    TrustDomain(String),
    #[error("the {0} PEM holds no certificate")]
    NoCertificate(&'static str),
    #[error("the {what} PEM is malformed: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("the private key is unusable: {0}")]
    Key(String),
    #[error("the trust roots are unusable: {0}")]
    Roots(String),
    #[error("the leaf certificate is unreadable: {0}")]
    Leaf(String),
    #[error("the leaf certificate names {found:?}, not this sidecar's identity {expected}")]
    WrongIdentity { expected: String, found: Vec<String> },
}

/// The installed state: swapped whole on every renewal.
struct Current {
    certified: Arc<CertifiedKey>,
    not_after: SystemTime,
    roots: Arc<RootCertStore>,
    /// Chain verification for inbound callers, built from `roots` once per install.
    client_verifier: Arc<dyn ClientCertVerifier>,
}

/// What the verifiers and resolvers share with the identity.
struct State {
    trust_domain: TrustDomain,
    /// `.svc.<trust-domain>`: the server-name suffix an outbound handshake carries.
    name_suffix: String,
    provider: Arc<CryptoProvider>,
    current: ArcSwapOption<Current>,
}

struct Inner {
    state: Arc<State>,
    service: ServiceName,
    spiffe_id: String,
    server: Arc<ServerConfig>,
    client_h1: Arc<ClientConfig>,
    client_h2: Arc<ClientConfig>,
}

/// This sidecar's identity in the mesh; cheap to clone.
#[derive(Clone)]
pub struct MeshIdentity {
    inner: Arc<Inner>,
}

impl fmt::Debug for MeshIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshIdentity")
            .field("spiffe_id", &self.inner.spiffe_id)
            .field("not_after", &self.not_after())
            .finish()
    }
}

impl MeshIdentity {
    /// An identity with no certificate yet: every handshake fails until [`install`](Self::install).
    pub fn new(trust_domain: TrustDomain, service: ServiceName) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let state = Arc::new(State {
            name_suffix: format!(".svc.{trust_domain}"),
            trust_domain,
            provider,
            current: ArcSwapOption::empty(),
        });
        let spiffe_id = spiffe_id(&state.trust_domain, &service);
        let server = Arc::new(verify::server_config(&state));
        let client_h1 = Arc::new(verify::client_config(&state, b"http/1.1"));
        let client_h2 = Arc::new(verify::client_config(&state, b"h2"));
        MeshIdentity { inner: Arc::new(Inner { state, service, spiffe_id, server, client_h1, client_h2 }) }
    }

    /// An identity from PEM text: fixed files, or certificates a test made.
    pub fn from_pem(
        trust_domain: TrustDomain,
        service: ServiceName,
        roots_pem: &str,
        chain_pem: &str,
        key_pem: &str,
    ) -> Result<Self, IdentityError> {
        let id = MeshIdentity::new(trust_domain, service);
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| IdentityError::Pem { what: "private key", reason: pem_reason(e) })?;
        id.install(roots_pem, chain_pem, key)?;
        Ok(id)
    }

    /// Replaces the leaf, its key and the trust roots at once. The leaf must carry this sidecar's
    /// SPIFFE ID and match the key; `roots_pem` may hold several roots (a CA being rotated).
    pub fn install(
        &self,
        roots_pem: &str,
        chain_pem: &str,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), IdentityError> {
        let state = &self.inner.state;
        let chain = certs("certificate chain", chain_pem)?;
        let mut roots = RootCertStore::empty();
        for root in certs("trust roots", roots_pem)? {
            roots.add(root).map_err(|e| IdentityError::Roots(e.to_string()))?;
        }
        let leaf = chain.first().ok_or(IdentityError::NoCertificate("certificate chain"))?;
        let (not_after, ids) = read_leaf(leaf)?;
        if !ids.iter().any(|id| *id == self.inner.spiffe_id) {
            return Err(IdentityError::WrongIdentity { expected: self.inner.spiffe_id.clone(), found: ids });
        }
        let certified = CertifiedKey::from_der(chain, key, &state.provider)
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), state.provider.clone())
                .build()
                .map_err(|e| IdentityError::Roots(e.to_string()))?;
        state.current.store(Some(Arc::new(Current {
            certified: Arc::new(certified),
            not_after,
            roots,
            client_verifier,
        })));
        Ok(())
    }

    /// When the current leaf expires; `None` before the first install.
    pub fn not_after(&self) -> Option<SystemTime> {
        self.inner.state.current.load().as_ref().map(|c| c.not_after)
    }

    /// Time left on the current leaf (zero once expired); `None` before the first install.
    pub fn remaining(&self) -> Option<Duration> {
        self.not_after().map(|t| t.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
    }

    pub fn service(&self) -> &ServiceName {
        &self.inner.service
    }

    pub fn spiffe_id(&self) -> &str {
        &self.inner.spiffe_id
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.inner.state.trust_domain
    }

    /// The inbound side's configuration: TLS 1.3, a client certificate from the mesh required,
    /// ALPN `h2` then `http/1.1`.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.inner.server.clone()
    }

    /// The outbound side's configuration, offering only `h2` or only `http/1.1`: presents this
    /// sidecar's leaf and accepts only a server proving the identity its server name asks for.
    pub fn client_config(&self, h2: bool) -> Arc<ClientConfig> {
        if h2 {
            self.inner.client_h2.clone()
        } else {
            self.inner.client_h1.clone()
        }
    }

    /// The server name an outbound handshake to `service` carries: `<service>.svc.<trust-domain>`.
    pub fn server_name(&self, service: &ServiceName) -> ServerName<'static> {
        let name = format!("{service}{}", self.inner.state.name_suffix);
        // A service name is a DNS label and the trust domain a DNS name, so this cannot fail; the
        // fallback only keeps the function total (and the verifier refuses the name).
        ServerName::try_from(name)
            .unwrap_or_else(|_| ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into()))
    }

    /// The calling service named by a verified peer chain (the leaf first); `None` when the leaf
    /// carries no SPIFFE ID of this trust domain.
    pub fn peer_service(&self, certs: &[CertificateDer<'_>]) -> Option<ServiceName> {
        let leaf = certs.first()?;
        let (_, ids) = read_leaf(leaf).ok()?;
        ids.iter().find_map(|id| service_of(&self.inner.state.trust_domain, id))
    }
}

/// The service of `id` when it is `spiffe://<td>/svc/<service>`.
fn service_of(td: &TrustDomain, id: &str) -> Option<ServiceName> {
    let rest = id.strip_prefix("spiffe://")?.strip_prefix(td.as_str())?.strip_prefix("/svc/")?;
    ServiceName::new(rest).ok()
}

/// A leaf's expiry and its URI SANs.
fn read_leaf(der: &CertificateDer<'_>) -> Result<(SystemTime, Vec<String>), IdentityError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) =
        X509Certificate::from_der(der.as_ref()).map_err(|e| IdentityError::Leaf(e.to_string()))?;
    let secs = cert.validity().not_after.timestamp();
    let not_after = UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                uris.push((*uri).to_string());
            }
        }
    }
    Ok((not_after, uris))
}

fn certs(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Pem { what, reason: pem_reason(e) })?;
    if certs.is_empty() {
        return Err(IdentityError::NoCertificate(what));
    }
    Ok(certs)
}

/// A PEM error's reason, never quoting the PEM (which may be a key).
fn pem_reason(e: rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match e {
        Error::NoItemsFound => "no PEM item of the expected kind",
        Error::MissingSectionEnd { .. } => "a section has no END line",
        Error::IllegalSectionStart { .. } => "a BEGIN line is malformed",
        Error::Base64Decode(_) => "a section is not valid base64",
        _ => "unreadable PEM",
    }
    .to_string()
}

#[cfg(test)]
mod tests;
