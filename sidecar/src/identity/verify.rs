//! The rustls hooks that read the mesh identity's current state on every handshake: the
//! certificate resolvers (which leaf to present) and the verifiers (which peer to accept).
//!
//! Only TLS 1.3 is offered: every peer is a Trellis sidecar, so there is no older client to serve,
//! and 1.3 encrypts the certificates, which name the services.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, ResolvesClientCert};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{read_leaf, service_of, spiffe_id, State};

/// Session tickets and cache entries the inbound side keeps for resumption.
const SERVER_SESSIONS: usize = 4096;

pub(super) fn server_config(state: &Arc<State>) -> ServerConfig {
    let hooks = Arc::new(Hooks(state.clone()));
    let mut config = ServerConfig::builder_with_provider(state.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .with_client_cert_verifier(hooks.clone())
        .with_cert_resolver(hooks);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(SERVER_SESSIONS);
    config
}

pub(super) fn client_config(state: &Arc<State>, alpn: &[u8]) -> ClientConfig {
    let hooks = Arc::new(Hooks(state.clone()));
    let mut config = ClientConfig::builder_with_provider(state.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(hooks.clone())
        .with_client_cert_resolver(hooks);
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}

/// Every hook, over the shared state.
struct Hooks(Arc<State>);

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MeshHooks({})", self.0.trust_domain)
    }
}

fn not_ready() -> Error {
    Error::General("this sidecar has no mesh certificate yet".into())
}

impl Hooks {
    fn current_key(&self) -> Option<Arc<CertifiedKey>> {
        self.0.current.load().as_ref().map(|c| c.certified.clone())
    }

    fn algorithms(&self) -> &rustls::crypto::WebPkiSupportedAlgorithms {
        &self.0.provider.signature_verification_algorithms
    }
}

impl ResolvesServerCert for Hooks {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current_key()
    }
}

impl ResolvesClientCert for Hooks {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current_key()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for Hooks {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Every mesh peer holds one leaf from the mesh CA: there is nothing to choose between.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let current = self.0.current.load_full().ok_or_else(not_ready)?;
        current.client_verifier.verify_client_cert(end_entity, intermediates, now)?;
        // A chain from the mesh CA is not enough: the caller must be a service of this trust domain.
        let (_, ids) =
            read_leaf(end_entity).map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if !ids.iter().any(|id| service_of(&self.0.trust_domain, id).is_some()) {
            return Err(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, self.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, self.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms().supported_schemes()
    }
}

impl ServerCertVerifier for Hooks {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let current = self.0.current.load_full().ok_or_else(not_ready)?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &current.roots,
            intermediates,
            now,
            self.algorithms().all,
        )?;
        // The name asked for is `<service>.svc.<trust-domain>`; the leaf must carry exactly that
        // service's SPIFFE ID. Anything else is a peer claiming to be what it is not.
        let expected = match server_name {
            ServerName::DnsName(name) => name
                .as_ref()
                .strip_suffix(self.0.name_suffix.as_str())
                .and_then(|s| trellis_shared::ServiceName::new(s).ok())
                .map(|service| spiffe_id(&self.0.trust_domain, &service)),
            _ => None,
        };
        let expected = expected.ok_or(Error::InvalidCertificate(CertificateError::NotValidForName))?;
        let (_, ids) =
            read_leaf(end_entity).map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if !ids.contains(&expected) {
            return Err(Error::InvalidCertificate(CertificateError::NotValidForName));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, self.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, self.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms().supported_schemes()
    }
}
