//! `mesh-intruder`: what a process on the mesh network that holds no mesh
//! certificate gets from the demo's replicas. The compose failure tests run it
//! as a container on the demo's network and assert on its output; anyone can:
//! `docker-compose --profile intruder run --rm intruder`.
//!
//! For each `--target HOST` it makes five tries and prints one line per try:
//!
//! ```text
//! attempt target=app1 try=app port=8080 connected=false handshake=- answered=false detail=Connection refused (os error 111)
//! attempt target=app1 try=inbound-tcp port=15006 connected=true handshake=- answered=false detail=-
//! attempt target=app1 try=inbound-plain port=15006 connected=true handshake=- answered=false detail=closed without an answer
//! attempt target=app1 try=inbound-no-cert port=15006 connected=true handshake=ok answered=false detail=received fatal alert: CertificateRequired
//! attempt target=app1 try=inbound-forged port=15006 connected=true handshake=ok answered=false detail=received fatal alert: UnknownCA
//! summary attempts=5 answered=0
//! ```
//!
//! - `app`: TCP to the app's own port, then `GET /hello` if it connects.
//! - `inbound-tcp`: TCP to the sidecar's inbound port and nothing else: the
//!   control, showing that the network lets the intruder through, so what
//!   fails below fails on TLS.
//! - `inbound-plain`: `GET /hello` in plain text to the inbound port.
//! - `inbound-no-cert`: TLS without a client certificate, then the GET.
//! - `inbound-forged`: TLS with a certificate claiming the client's identity
//!   (`spiffe://trellis.local/svc/client`), signed by a CA the intruder made
//!   itself, then the GET.
//!
//! The intruder does not check the server's certificate (it wants in, it does
//! not care who answers). `handshake` is the client's view: in TLS 1.3 the
//! server checks the client's certificate after the client has finished its
//! part, so a refusal shows as the server's alert on the first read
//! (`detail`). `answered=true` means an HTTP answer came back: an intrusion.
//! `detail` is the rest of the line. Exit status 0 once every try has been
//! made, whatever they got: the caller judges.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser, Debug)]
#[command(name = "mesh-intruder", about = "Tries to reach the mesh's apps without a mesh certificate")]
struct Args {
    /// A replica's host name on the network; repeat for several.
    #[arg(long = "target", env = "INTRUDER_TARGETS", value_delimiter = ',', required = true)]
    targets: Vec<String>,
    /// The app's own port.
    #[arg(long, env = "INTRUDER_APP_PORT", default_value_t = 8080)]
    app_port: u16,
    /// The sidecar's inbound (mutual TLS) port.
    #[arg(long, env = "INTRUDER_INBOUND_PORT", default_value_t = 15006)]
    inbound_port: u16,
    /// Host header of the GETs: the service.
    #[arg(long, env = "INTRUDER_HOST", default_value = "demo")]
    host: String,
    /// How long each try may take.
    #[arg(long, env = "INTRUDER_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// What one try got.
#[derive(Debug, Default)]
struct Outcome {
    connected: bool,
    /// `None` when the try speaks no TLS.
    handshake: Option<bool>,
    answered: bool,
    detail: String,
}

impl Outcome {
    fn line(&self, target: &str, name: &str, port: u16) -> String {
        let handshake = match self.handshake {
            None => "-",
            Some(true) => "ok",
            Some(false) => "failed",
        };
        let detail = if self.detail.is_empty() { "-" } else { self.detail.as_str() };
        format!(
            "attempt target={target} try={name} port={port} connected={} handshake={handshake} answered={} detail={detail}",
            self.connected, self.answered
        )
    }
}

/// Accepts any server: the intruder wants in, it does not care who answers.
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
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A leaf for the client's identity from a CA of the intruder's own, and its key.
fn forged_identity() -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), rcgen::Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::URI("spiffe://trellis.local/svc/client".try_into()?)];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf.signed_by(&key, &issuer)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((vec![leaf.der().clone(), ca_cert.der().clone()], key))
}

fn tls_config(
    provider: &Arc<CryptoProvider>,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider.clone())));
    let mut config = match client_cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Sends the GET and reads until the peer closes: whether an HTTP answer came.
async fn get<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, host: &str, out: &mut Outcome) {
    let request = format!("GET /hello HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        out.detail = e.to_string();
        return;
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) => {
                out.detail = e.to_string();
                break;
            }
        }
    }
    if answer.starts_with(b"HTTP/") {
        out.answered = true;
        let status_line = answer.split(|b| *b == b'\r').next().unwrap_or_default();
        out.detail = String::from_utf8_lossy(status_line).into_owned();
    } else if out.detail.is_empty() {
        out.detail = if answer.is_empty() {
            "closed without an answer".into()
        } else {
            format!("{} bytes that are not HTTP", answer.len())
        };
    }
}

enum Try {
    App,
    InboundTcp,
    InboundPlain,
    InboundTls(Arc<rustls::ClientConfig>),
}

async fn attempt(addr: &str, how: &Try, host: &str) -> Outcome {
    let mut out = Outcome::default();
    let mut tcp = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            out.detail = e.to_string();
            return out;
        }
    };
    out.connected = true;
    match how {
        Try::InboundTcp => {}
        Try::App | Try::InboundPlain => get(&mut tcp, host, &mut out).await,
        Try::InboundTls(config) => {
            let name = ServerName::try_from(format!("{host}.svc.trellis.local"))
                .unwrap_or_else(|_| ServerName::try_from("demo.svc.trellis.local").expect("a valid name"));
            match tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await {
                Ok(mut tls) => {
                    out.handshake = Some(true);
                    get(&mut tls, host, &mut out).await;
                }
                Err(e) => {
                    out.handshake = Some(false);
                    out.detail = e.to_string();
                }
            }
        }
    }
    out
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let configs = forged_identity().map_err(|e| e.to_string()).and_then(|forged| {
        Ok((
            tls_config(&provider, None).map_err(|e| e.to_string())?,
            tls_config(&provider, Some(forged)).map_err(|e| e.to_string())?,
        ))
    });
    let (no_cert, forged) = match configs {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mesh-intruder: cannot make its TLS configurations: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let tries = [
        ("app", args.app_port, Try::App),
        ("inbound-tcp", args.inbound_port, Try::InboundTcp),
        ("inbound-plain", args.inbound_port, Try::InboundPlain),
        ("inbound-no-cert", args.inbound_port, Try::InboundTls(no_cert)),
        ("inbound-forged", args.inbound_port, Try::InboundTls(forged)),
    ];
    let (mut attempts, mut answered) = (0, 0);
    for target in &args.targets {
        for (name, port, how) in &tries {
            let addr = format!("{target}:{port}");
            let out = match tokio::time::timeout(args.timeout, attempt(&addr, how, &args.host)).await {
                Ok(out) => out,
                Err(_) => {
                    Outcome { detail: format!("no outcome within {:?}", args.timeout), ..Outcome::default() }
                }
            };
            attempts += 1;
            answered += u32::from(out.answered);
            println!("{}", out.line(target, name, *port));
        }
    }
    println!("summary attempts={attempts} answered={answered}");
    std::process::ExitCode::SUCCESS
}
