//! `registry probe`: a healthcheck for images without a shell or curl.
//!
//! When the registry serves TLS (the probe sees the same `TRELLIS_TLS_*`
//! variables as the server in its container), the probe speaks TLS too. It
//! does not verify the server's certificate: it sends no secret and reads
//! only the status of `/health` from the registry on its own host, and the
//! registry's certificate names its public names, not the loopback address
//! probed, while the CA that signed it is not among the files the registry
//! is given. When the registry requires client certificates, the probe
//! presents the registry's own certificate and key (`registry init` issues
//! it for both server and client use).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper::{header, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::tls::{load_certs, load_key, TlsArgs};

/// True when `GET /health` on `addr` answers 200 within `timeout`; over TLS
/// when `tls` names a certificate.
pub async fn probe(addr: SocketAddr, timeout: Duration, tls: &TlsArgs) -> Result<(), String> {
    let client = if tls.enabled() { Some(client_config(tls).map_err(|e| e.to_string())?) } else { None };
    let attempt = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        match client {
            None => get_health(stream, addr).await,
            Some(config) => {
                let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
                let name = ServerName::IpAddress(addr.ip().into());
                let stream =
                    connector.connect(name, stream).await.map_err(|e| format!("TLS handshake: {e}"))?;
                get_health(stream, addr).await
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("no answer from {addr} within {timeout:?}"))?
}

async fn get_health<IO>(io: IO, addr: SocketAddr) -> Result<(), String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        http1::handshake(TokioIo::new(io)).await.map_err(|e| format!("handshake: {e}"))?;
    // The connection is driven beside the request; it ends with it.
    tokio::spawn(conn);
    let req = Request::get("/health")
        .header(header::HOST, addr.to_string())
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let resp = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
    match resp.status() {
        StatusCode::OK => Ok(()),
        other => Err(format!("unexpected answer {other}")),
    }
}

/// The probe's TLS client: HTTP/1.1, no server verification (see the module
/// doc), the registry's own certificate as client certificate when the
/// registry asks for one.
fn client_config(tls: &TlsArgs) -> Result<ClientConfig, crate::tls::TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match (&tls.tls_client_ca, &tls.tls_cert, &tls.tls_key) {
        (Some(_), Some(cert), Some(key)) => {
            builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Accepts any server certificate, but still checks that the server holds
/// its key (the handshake signatures), as a handshake with no verification
/// at all would not even prove that.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The address to probe for a listen address: loopback for a wildcard.
pub fn local_addr_for(listen: SocketAddr) -> SocketAddr {
    let mut a = listen;
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    a
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use hyper::Response;
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn passes_only_on_a_200() {
        for (status, passes) in [(200, true), (503, false)] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                let (stream, _) = listener.accept().await.unwrap();
                let service = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, Infallible>(
                        Response::builder().status(status).body(Empty::<Bytes>::new()).unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
            let result = probe(addr, Duration::from_secs(10), &TlsArgs::default()).await;
            println!("{status}: {result:?}");
            assert_eq!(result.is_ok(), passes, "{status}: {result:?}");
        }
    }
}
