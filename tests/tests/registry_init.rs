//! `registry init DIR` run as the real binary: the files and their modes, the
//! ACL agreeing with the token files (checked with `sha256sum`), certificates
//! that curl accepts for the names asked and refuses for others, a refusal to
//! overwrite without `--force`, and no secret on stdout or stderr.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_tests::bin;
use trellis_tests::process::{log_dir, unique_path};

fn scratch(name: &str) -> PathBuf {
    let d = unique_path(&log_dir(), name, "init");
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn init(dir: &Path, extra: &[&str]) -> Output {
    let out = Command::new(bin("registry"))
        .arg("init")
        .arg(dir)
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("running registry init: {e}"));
    println!(
        "registry init {extra:?}: {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every secret init wrote: token files, passwords and private keys.
fn secrets(dir: &Path) -> Vec<String> {
    let mut all = Vec::new();
    for sub in ["tokens", "etcd", ""] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
            if name.ends_with(".token") || name.ends_with(".password") || name.ends_with("-key.pem") {
                all.push(read(&p));
            }
        }
    }
    all
}

fn assert_no_secret_in(out: &Output, dir: &Path) {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let secrets = secrets(dir);
    assert!(!secrets.is_empty());
    for s in &secrets {
        // A key's body lines are what would leak; the PEM armour alone is no secret.
        for line in s.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!text.contains(line), "a secret appeared in init's output");
        }
    }
    assert!(!text.contains("PRIVATE KEY"));
}

fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string()
}

#[test]
fn init_writes_credentials_with_private_modes_and_prints_no_secret() {
    let dir = scratch("layout");
    let out = init(
        &dir,
        &["--service", "demo", "--service", "client", "--etcd-member", "etcd1", "--etcd-member", "etcd2"],
    );
    assert!(out.status.success());
    for (file, want) in [
        ("", 0o755),
        ("ca.pem", 0o644),
        ("ca-key.pem", 0o600),
        ("registry.pem", 0o644),
        ("registry-key.pem", 0o600),
        ("acl.toml", 0o644),
        ("tokens", 0o700),
        ("tokens/demo.token", 0o600),
        ("tokens/client.token", 0o600),
        ("tokens/admin.token", 0o600),
        ("tokens/observer.token", 0o600),
        ("etcd/etcd1.pem", 0o644),
        ("etcd/etcd1-key.pem", 0o600),
        ("etcd/etcd2.pem", 0o644),
        ("etcd/etcd2-key.pem", 0o600),
        ("etcd/registry-client.pem", 0o644),
        ("etcd/registry-client-key.pem", 0o600),
        ("etcd/root.password", 0o600),
        ("etcd/trellis.password", 0o600),
    ] {
        let got = mode(&dir.join(file));
        assert_eq!(got, want, "{file}: mode {got:o}, want {want:o}");
    }
    // Nothing but what the layout names (no temporary file left behind).
    let count = |d: &Path| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
    assert_eq!((count(&dir), count(&dir.join("tokens")), count(&dir.join("etcd"))), (7, 4, 8));

    let acl: toml::Table = read(&dir.join("acl.toml")).parse().expect("acl.toml is TOML");
    assert_eq!(acl["default"].as_str(), Some("deny"));
    let tokens: BTreeMap<String, toml::Table> = acl["tokens"]
        .as_array()
        .expect("[[tokens]]")
        .iter()
        .filter_map(|t| t.as_table())
        .map(|t| (t["name"].as_str().unwrap_or("").to_string(), t.clone()))
        .collect();
    assert_eq!(tokens.keys().collect::<Vec<_>>(), ["admin", "client", "demo", "observer"]);
    for (name, t) in &tokens {
        assert!(t.get("secret").is_none(), "{name}: only the hash is stored");
        let file = dir.join(format!("tokens/{name}.token"));
        assert_eq!(read(&file).len(), 64, "{name}: 32 random bytes as hex");
        // The file holds exactly the secret (no newline), so its checksum is the secret's.
        assert_eq!(t["secret_sha256"].as_str(), Some(sha256sum(&file).as_str()), "{name}");
    }
    let list = |t: &toml::Table, k: &str| -> Vec<String> {
        t.get(k)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    assert_eq!(list(&tokens["demo"], "write"), ["demo"]);
    assert_eq!(list(&tokens["demo"], "read"), ["*"]);
    assert_eq!(list(&tokens["client"], "write"), ["client"]);
    assert_eq!(tokens["admin"].get("admin").and_then(|v| v.as_bool()), Some(true));
    assert!(list(&tokens["observer"], "write").is_empty());
    assert_eq!(list(&tokens["observer"], "read"), ["*"]);

    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("demo, client, admin, observer"), "the summary names the tokens");
    assert!(stdout.contains("--acl-file"), "the summary shows what to run next");
    assert_no_secret_in(&out, &dir);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn init_refuses_to_overwrite_credentials_without_force() {
    let dir = scratch("force");
    assert!(init(&dir, &["--service", "demo"]).status.success());
    let before = read(&dir.join("tokens/demo.token"));
    let ca_before = read(&dir.join("ca.pem"));

    let refused = init(&dir, &["--service", "demo"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
    assert!(stderr.contains("--force") && stderr.contains("ca.pem"), "{stderr}");
    assert_eq!(read(&dir.join("tokens/demo.token")), before, "untouched");
    assert_eq!(read(&dir.join("ca.pem")), ca_before, "untouched");

    let forced = init(&dir, &["--service", "demo", "--force"]);
    assert!(forced.status.success());
    assert_ne!(read(&dir.join("tokens/demo.token")), before, "a new secret");
    assert_ne!(read(&dir.join("ca.pem")), ca_before, "a new CA");
    assert_eq!(mode(&dir.join("tokens/demo.token")), 0o600);
    assert_no_secret_in(&forced, &dir);

    let bad_dir = scratch("bad");
    let bad = init(&bad_dir, &["--service", "Not_A_Service"]);
    assert!(!bad.status.success());
    let bad = init(&bad_dir, &["--name", "two words"]);
    assert!(!bad.status.success());
    assert_eq!(String::from_utf8_lossy(&bad.stderr).trim().lines().count(), 1);
    assert!(!bad_dir.exists(), "a refused run writes nothing");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A TLS server with init's registry certificate, answering every connection
/// with `200 OK`; returns its port.
async fn tls_server(dir: &Path) -> u16 {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("registry.pem"))
        .expect("registry.pem")
        .collect::<Result<_, _>>()
        .expect("registry.pem parses");
    let key = PrivateKeyDer::from_pem_file(dir.join("registry-key.pem")).expect("registry-key.pem parses");
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("the key matches the certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut buf = [0u8; 1024];
                let _ = tls.read(&mut buf).await;
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

/// curl's exit code and HTTP status for `https://NAME:PORT/` with NAME pointing at loopback.
async fn curl(ca: &Path, name: &str, port: u16) -> (i32, String) {
    let url_host = if name.contains(':') { format!("[{name}]") } else { name.to_string() };
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{name}:{port}:127.0.0.1")])
        .arg(format!("https://{url_host}:{port}/"))
        .output()
        .await
        .expect("curl");
    let code = out.status.code().unwrap_or(-1);
    println!("curl https://{name}:{port}/ -> exit {code}, {}", String::from_utf8_lossy(&out.stderr).trim());
    (code, String::from_utf8_lossy(&out.stdout).to_string())
}

#[tokio::test]
async fn the_registry_certificate_is_trusted_through_the_ca_for_its_names_only() {
    let dir = scratch("tls");
    let out = init(&dir, &["--name", "registry", "--name", "registry.example.com", "--name", "127.0.0.1"]);
    assert!(out.status.success());
    let port = tls_server(&dir).await;
    let ca = dir.join("ca.pem");
    for name in ["registry", "registry.example.com", "127.0.0.1"] {
        assert_eq!(curl(&ca, name, port).await, (0, "200".into()), "{name} is in the certificate");
    }
    // Not a name asked for: curl refuses the certificate (exit 60), it does not fall back.
    let (code, _) = curl(&ca, "localhost", port).await;
    assert_eq!(code, 60, "localhost was not asked for");
    // Another CA does not vouch for it.
    let other = scratch("tls-other");
    assert!(init(&other, &[]).status.success());
    let (code, _) = curl(&other.join("ca.pem"), "registry", port).await;
    assert_eq!(code, 60, "a certificate from another CA is refused");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&other).unwrap();
}
