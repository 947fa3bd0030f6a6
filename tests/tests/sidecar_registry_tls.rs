//! The sidecar speaks TLS to the registry: it registers through `https://`
//! with `--registry-ca` (and a client certificate when one is required), and
//! a certificate that does not verify, a missing client certificate or a
//! plain `http://` URL to the TLS port never registers: `/ready` stays 503.
//!
//! The registry here is the real binary on plain loopback HTTP behind a TLS
//! front served in-process (tokio-rustls on port 0, certificates from
//! `trellis_registry::pki::Authority`), so these tests do not depend on the
//! registry's own TLS flags.
//!
//! Build first: `cargo build --release --workspace --bins`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use trellis_registry::pki::{Authority, Usage};
use trellis_tests::process::{log_dir, unique_path};
use trellis_tests::{registering_args, strings, wait_for, AppProc, RegistryProc, SidecarProc};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SERVICE: &str = "users";
const WITHIN: Duration = Duration::from_secs(30);
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

fn write(name: &str, text: &str) -> PathBuf {
    let path = unique_path(&log_dir(), name, "pem");
    std::fs::write(&path, text).unwrap();
    path
}

/// A CA and a server certificate for `localhost` and `127.0.0.1`.
struct Pki {
    ca: Authority,
    ca_file: PathBuf,
    server_cert: String,
    server_key: String,
}

fn pki() -> Pki {
    let ca = Authority::generate("trellis test CA", YEAR).unwrap();
    let server = ca.issue(&strings(&["localhost", "127.0.0.1"]), Usage::Server, YEAR).unwrap();
    let ca_file = write("ca", ca.cert_pem());
    Pki { ca, ca_file, server_cert: server.cert_pem, server_key: server.key_pem }
}

/// Serves TLS on a loopback port and relays each connection's plain bytes to
/// `backend`; with `client_ca`, a client certificate signed by it is required.
async fn tls_front(backend: SocketAddr, pki: &Pki, client_ca: Option<&str>) -> SocketAddr {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pki.server_cert.as_bytes()).collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(pki.server_key.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let Ok(mut plain) = TcpStream::connect(backend).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

/// The instances of `users` the registry holds, whatever their health.
async fn registered(registry: &RegistryProc) -> usize {
    let url = format!("{}/v1/services/{SERVICE}?all=true", registry.url());
    let v: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap_or_default();
    v["instances"].as_array().map_or(0, Vec::len)
}

async fn ready_status(sidecar: &SidecarProc) -> u16 {
    reqwest::get(format!("http://{}/ready", sidecar.admin)).await.map_or(0, |r| r.status().as_u16())
}

/// A backend app and a sidecar registering it with `registry_url` and `extra` flags, not waiting for ready.
async fn app_sidecar(registry_url: &str, extra: &[String]) -> (AppProc, SidecarProc) {
    let app = AppProc::start("app", "tls-1", &[]).await;
    let addr = app.addr.to_string();
    let mut args = registering_args(SERVICE, &addr, "tls-1");
    args.extend_from_slice(extra);
    let sidecar = SidecarProc::spawn("tls-sidecar", registry_url, &args).await;
    (app, sidecar)
}

/// Failed registry calls the sidecar counted.
async fn registry_errors(sidecar: &SidecarProc) -> f64 {
    let Ok(resp) = reqwest::get(format!("http://{}/metrics", sidecar.admin)).await else { return 0.0 };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("trellis_sidecar_registry_errors_total"))
        .and_then(|l| l.rsplit_once(' ')?.1.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until the sidecar's log has `text` and it retried a few times, then
/// checks it never registered.
async fn assert_not_registered(registry: &RegistryProc, sidecar: &SidecarProc, text: &str) {
    wait_for(&format!("the sidecar to log {text:?}"), WITHIN, || async {
        sidecar.proc.log_text().contains(text).then_some(())
    })
    .await;
    // Further failed rounds, so a retry that would succeed had its chance.
    let failed = wait_for("three failed registry calls", WITHIN, || async {
        let n = registry_errors(sidecar).await;
        (n >= 3.0).then_some(n)
    })
    .await;
    println!("{failed} failed registry calls; log has {text:?}");
    assert_eq!(ready_status(sidecar).await, 503, "/ready must stay 503");
    assert_eq!(registered(registry).await, 0, "the instance must not be registered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_registers_through_tls_with_its_private_ca() {
    let _serial = SERIAL.lock().await;
    let pki = pki();
    let registry = RegistryProc::start("registry", &[]).await;
    let front = tls_front(registry.addr, &pki, None).await;
    let url = format!("https://localhost:{}", front.port());
    let ca = pki.ca_file.display().to_string();
    let (_app, sidecar) = app_sidecar(&url, &strings(&["--registry-ca", &ca])).await;
    trellis_tests::wait_http_ok(&format!("http://{}/ready", sidecar.admin), WITHIN).await;
    assert_eq!(registered(&registry).await, 1);

    // curl, a real client, agrees: verified with the CA, refused without it, and no plain text.
    let curl = |args: &[&str]| std::process::Command::new("curl").args(args).output().unwrap();
    let ok = curl(&["-sS", "--cacert", &ca, &format!("{url}/v1/services")]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let untrusted = curl(&["-sS", &format!("{url}/v1/services")]);
    assert!(!untrusted.status.success(), "curl trusted a private CA it was not given");
    let plain = curl(&["-sS", "--max-time", "5", &format!("http://127.0.0.1:{}/v1/services", front.port())]);
    assert!(!plain.status.success(), "the TLS port answered plain HTTP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_trusting_another_ca_does_not_register() {
    let _serial = SERIAL.lock().await;
    let pki = pki();
    let wrong = write("wrong-ca", Authority::generate("another CA", YEAR).unwrap().cert_pem());
    let registry = RegistryProc::start("registry", &[]).await;
    let front = tls_front(registry.addr, &pki, None).await;
    let url = format!("https://localhost:{}", front.port());
    let (_app, sidecar) = app_sidecar(&url, &strings(&["--registry-ca", &wrong.display().to_string()])).await;
    assert_not_registered(&registry, &sidecar, "certificate did not verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_the_tls_port_does_not_register() {
    let _serial = SERIAL.lock().await;
    let pki = pki();
    let registry = RegistryProc::start("registry", &[]).await;
    let front = tls_front(registry.addr, &pki, None).await;
    let (_app, sidecar) = app_sidecar(&format!("http://127.0.0.1:{}", front.port()), &[]).await;
    assert_not_registered(&registry, &sidecar, "registration failed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_client_certificate_is_presented() {
    let _serial = SERIAL.lock().await;
    let pki = pki();
    let client = pki.ca.issue(&strings(&["users-sidecar"]), Usage::Client, YEAR).unwrap();
    let (cert, key) = (write("client-cert", &client.cert_pem), write("client-key", &client.key_pem));
    let registry = RegistryProc::start("registry", &[]).await;
    let front = tls_front(registry.addr, &pki, Some(pki.ca.cert_pem())).await;
    let url = format!("https://localhost:{}", front.port());
    let ca = pki.ca_file.display().to_string();

    // Without a client certificate: refused.
    let (app, sidecar) = app_sidecar(&url, &strings(&["--registry-ca", &ca])).await;
    assert_not_registered(&registry, &sidecar, "registration failed").await;
    drop((sidecar, app));

    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let (_app, sidecar) = app_sidecar(
        &url,
        &strings(&["--registry-ca", &ca, "--registry-cert", &cert, "--registry-key", &key]),
    )
    .await;
    trellis_tests::wait_http_ok(&format!("http://{}/ready", sidecar.admin), WITHIN).await;
    assert_eq!(registered(&registry).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_stop_the_sidecar_at_start() {
    let _serial = SERIAL.lock().await;
    let not_pem = write("not-a-ca", "this is not a certificate\n");
    let out = std::process::Command::new(trellis_tests::bin("sidecar"))
        .args(["--registry", "https://localhost:1", "--registry-ca", &not_pem.display().to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a bad CA file");
    assert!(stderr.contains("--registry-ca") && stderr.contains("not-a-ca"), "{stderr}");
    let plain = std::process::Command::new(trellis_tests::bin("sidecar"))
        .args(["--registry", "http://localhost:1", "--registry-ca", &pki().ca_file.display().to_string()])
        .output()
        .unwrap();
    assert!(!plain.status.success(), "TLS files with an http:// URL must be refused");
}
