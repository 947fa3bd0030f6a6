//! The outbound side of mutual TLS: a TCP connection to an endpoint that
//! registered `mesh_tls` becomes a TLS connection that presents this
//! sidecar's leaf and accepts only a server proving the identity of the
//! service the request is for (see [`crate::identity`]).
//!
//! - **Server name**: `<service>.svc.<trust-domain>` (the service the caller
//!   asked for, never the endpoint's address); the verifier maps it back to
//!   the SPIFFE ID the server's leaf must carry exactly.
//! - **ALPN**: `h2` when the attempt goes out over HTTP/2, `http/1.1`
//!   otherwise (and for upgrades): one offer, so the server cannot pick a
//!   protocol the proxy did not plan for.
//! - **Resumption**: every handshake of one ALPN uses the one `ClientConfig`
//!   the identity built, whose session cache is keyed by the server name: a
//!   reconnect to a service this sidecar spoke to before resumes (one round
//!   trip, no certificate sent or checked again), whichever endpoint of the
//!   service issued the ticket it still holds. `mtls_handshakes{kind}` counts
//!   full and resumed handshakes.
//! - **Failures**: a server presenting another identity, a leaf from another
//!   CA, an expired leaf, no TLS at all, or a mesh endpoint while this sidecar
//!   has no identity: the attempt failed before anything was sent, like a
//!   refused connect (retried elsewhere for any method, and the endpoint is
//!   ejected at once), counted in `mtls_failures{service,reason}` and logged.
//!   A forged registration therefore never receives a request.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use rustls::{CertificateError, HandshakeKind};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::warn;
use trellis_shared::ServiceName;

use crate::identity::MeshIdentity;
use crate::metrics::Metrics;

/// Why a mesh handshake failed (the `reason` label of `mtls_failures`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshFailure {
    /// This sidecar has no mesh identity (no `--mtls`), or no certificate yet.
    NoIdentity,
    /// The server's leaf is valid but names another service (or none).
    WrongIdentity,
    /// The server's leaf does not chain to the mesh's roots.
    Untrusted,
    /// The server's leaf (or a certificate of its chain) is expired or not valid yet.
    Expired,
    /// Anything else: the server refused our certificate, spoke no TLS, closed, or was too slow.
    Handshake,
}

impl MeshFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            MeshFailure::NoIdentity => "no_identity",
            MeshFailure::WrongIdentity => "wrong_identity",
            MeshFailure::Untrusted => "untrusted",
            MeshFailure::Expired => "expired",
            MeshFailure::Handshake => "handshake",
        }
    }

    /// What a rustls error met during the handshake says.
    fn of(e: &std::io::Error) -> MeshFailure {
        let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) else {
            return MeshFailure::Handshake;
        };
        match tls {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                    MeshFailure::WrongIdentity
                }
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => MeshFailure::Expired,
                _ => MeshFailure::Untrusted,
            },
            // The identity's verifier says so before its first certificate is installed.
            rustls::Error::General(_) => MeshFailure::NoIdentity,
            _ => MeshFailure::Handshake,
        }
    }
}

/// A failed mesh handshake: the attempt is treated like a refused connect.
#[derive(Debug)]
pub struct MeshError {
    pub reason: MeshFailure,
    pub cause: String,
}

/// Makes the outbound TLS connections; shared by the HTTP/1.1 pool, the
/// HTTP/2 connections and upgrades.
pub struct MeshConnector {
    identity: Option<MeshIdentity>,
    metrics: Arc<Metrics>,
    full: Counter,
    resumed: Counter,
}

impl MeshConnector {
    /// `identity`: `None` when this sidecar runs without `--mtls` (every mesh
    /// endpoint then fails with [`MeshFailure::NoIdentity`]).
    pub fn new(identity: Option<MeshIdentity>, metrics: Arc<Metrics>) -> Self {
        let (full, resumed) = metrics.mtls_handshake_counters();
        MeshConnector { identity, metrics, full, resumed }
    }

    /// TLS over `tcp` to an endpoint of `service`, offering `h2` or
    /// `http/1.1`, within `timeout`. `authority` is for the log only.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        service: &ServiceName,
        authority: &str,
        h2: bool,
        timeout: Duration,
    ) -> Result<TlsStream<TcpStream>, MeshError> {
        let result = match &self.identity {
            None => Err(MeshError {
                reason: MeshFailure::NoIdentity,
                cause: "the endpoint is reached only over mutual TLS and this sidecar has no mesh identity \
                        (start it with --mtls)"
                    .into(),
            }),
            Some(id) => {
                let connector = TlsConnector::from(id.client_config(h2));
                match tokio::time::timeout(timeout, connector.connect(id.server_name(service), tcp)).await {
                    // Offering only `h2`, a server that picked nothing would be spoken
                    // HTTP/2 to without having agreed to it.
                    Ok(Ok(tls)) if h2 && tls.get_ref().1.alpn_protocol() != Some(b"h2") => Err(MeshError {
                        reason: MeshFailure::Handshake,
                        cause: "mTLS handshake: the endpoint did not agree to HTTP/2 (ALPN h2)".into(),
                    }),
                    Ok(Ok(tls)) => Ok(tls),
                    Ok(Err(e)) => {
                        Err(MeshError { reason: MeshFailure::of(&e), cause: format!("mTLS handshake: {e}") })
                    }
                    Err(_) => Err(MeshError {
                        reason: MeshFailure::Handshake,
                        cause: format!("mTLS handshake timed out after {timeout:?}"),
                    }),
                }
            }
        };
        match result {
            Ok(tls) => {
                match tls.get_ref().1.handshake_kind() {
                    Some(HandshakeKind::Resumed) => self.resumed.inc(),
                    _ => self.full.inc(),
                };
                Ok(tls)
            }
            Err(e) => {
                self.metrics.mtls_failure(service.as_str(), e.reason.as_str());
                warn!(service = %service, endpoint = %authority, reason = e.reason.as_str(), cause = %e.cause, "mesh endpoint failed its mTLS handshake; trying another");
                Err(e)
            }
        }
    }
}

impl std::fmt::Debug for MeshConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshConnector").field("identity", &self.identity).finish()
    }
}
