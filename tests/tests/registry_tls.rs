//! The registry over HTTPS, against the real binary on loopback: curl and
//! reqwest over HTTP/2 and HTTP/1.1, a wrong CA, plain HTTP to the TLS port,
//! required client certificates, reload on SIGHUP, bad files at start, and
//! `registry probe`. Certificates are made at run time with the registry's
//! own CA code. Needs `cargo build --release --workspace --bins` and curl.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use trellis_registry::pki::{Authority, Usage};
use trellis_tests::process::unique_path;
use trellis_tests::{bin, wait_for, Launch, RegistryProc};

const DAY: Duration = Duration::from_secs(86_400);

/// A directory of PEM files for one test.
struct Files(PathBuf);

impl Files {
    fn new(name: &str) -> Files {
        let dir = unique_path(&std::env::temp_dir(), name, "d");
        std::fs::create_dir_all(&dir).unwrap();
        Files(dir)
    }

    fn write(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ca(name: &str) -> Authority {
    Authority::generate(name, DAY).unwrap()
}

/// Writes `cert.pem` and `key.pem`: a leaf of `ca` for 127.0.0.1 and localhost.
fn issue_into(files: &Files, ca: &Authority, usage: Usage, prefix: &str) {
    let leaf = ca.issue(&["127.0.0.1".into(), "localhost".into()], usage, DAY).unwrap();
    files.write(&format!("{prefix}cert.pem"), &leaf.cert_pem);
    files.write(&format!("{prefix}key.pem"), &leaf.key_pem);
}

fn tls_args(files: &Files) -> Vec<String> {
    trellis_tests::strings(&["--tls-cert", &files.path("cert.pem"), "--tls-key", &files.path("key.pem")])
}

/// curl's exit code and output (`-w` included).
async fn curl(args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("curl runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn https(reg: &RegistryProc, path: &str) -> String {
    format!("https://{}{path}", reg.addr)
}

fn client_trusting(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn metric(reg: &RegistryProc, ca_pem: &str, name: &str) -> f64 {
    let text =
        client_trusting(ca_pem).get(https(reg, "/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// `registry probe` against `addr` with the given environment; its exit success.
async fn probe(addr: std::net::SocketAddr, env: &[(&str, String)]) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(bin("registry"));
    cmd.args(["probe", "--addr", &addr.to_string(), "--timeout", "5s"]).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.expect("registry probe runs");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn https_serves_h2_and_http11_to_curl_and_reqwest_and_refuses_a_wrong_ca_and_plain_http() {
    let files = Files::new("tls-basic");
    let authority = ca("test CA");
    issue_into(&files, &authority, Usage::Server, "");
    let ca_pem = files.write("ca.pem", authority.cert_pem());
    let other_pem = files.write("other.pem", ca("another CA").cert_pem());
    let reg = RegistryProc::start("registry-tls", &tls_args(&files)).await;
    let health = https(&reg, "/health");

    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let (code, out) = curl(&["--cacert", &ca_pem, flag, "-w", " %{http_version}", &health]).await;
        println!("curl {flag}: exit {code}, {out}");
        assert_eq!(code, 0, "{out}");
        assert_eq!(out, format!(r#"{{"status":"ok"}} {version}"#));
    }

    // reqwest trusting the CA: a registration and its read-back, over h2 by ALPN.
    let client = client_trusting(authority.cert_pem());
    let r = client
        .put(https(&reg, "/v1/services/users/instances/u1"))
        .json(&json!({"address":"10.0.0.1","port":80,"ttl":"1m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let view: serde_json::Value =
        client.get(https(&reg, "/v1/services/users")).send().await.unwrap().json().await.unwrap();
    assert_eq!(view["instances"][0]["id"], "u1");

    // A client trusting another CA fails the handshake; nothing is served in clear.
    let failures_before =
        metric(&reg, authority.cert_pem(), "trellis_registry_tls_handshake_failures_total").await;
    let (code, out) = curl(&["--cacert", &other_pem, &health]).await;
    println!("curl with the wrong CA: exit {code}, {out}");
    assert_ne!(code, 0, "{out}");
    assert!(!out.contains("\"ok\""), "{out}");
    let err =
        client_trusting(&std::fs::read_to_string(&other_pem).unwrap()).get(&health).send().await.unwrap_err();
    println!("reqwest with the wrong CA: {err:?}");
    assert!(err.is_connect(), "{err:?}");

    // Plain HTTP to the TLS port is not served.
    let (code, out) = curl(&["--http1.1", &format!("http://{}/health", reg.addr)]).await;
    println!("plain HTTP to the TLS port: exit {code}, {out}");
    assert_ne!(code, 0, "{out}");
    assert!(!out.contains("\"ok\""), "{out}");
    let err = reqwest::Client::new().get(format!("http://{}/health", reg.addr)).send().await;
    assert!(err.is_err(), "{err:?}");

    let failures_after =
        metric(&reg, authority.cert_pem(), "trellis_registry_tls_handshake_failures_total").await;
    println!("TLS handshake failures counted: {failures_before} -> {failures_after}");
    assert!(failures_after >= failures_before + 3.0, "{failures_before} -> {failures_after}");

    // The probe speaks TLS with the server's variables, and fails without them.
    let env = [("TRELLIS_TLS_CERT", files.path("cert.pem")), ("TRELLIS_TLS_KEY", files.path("key.pem"))];
    let (ok, err) = probe(reg.addr, &env).await;
    assert!(ok, "probe over TLS: {err}");
    let (ok, err) = probe(reg.addr, &[]).await;
    println!("plain probe of the TLS port: {err}");
    assert!(!ok);
}

#[tokio::test]
async fn a_required_client_certificate_must_be_present_and_signed_by_the_client_ca() {
    let files = Files::new("tls-mtls");
    let authority = ca("test CA");
    // The registry's certificate serves both ways, as `registry init` issues it,
    // so its probe can present it.
    issue_into(&files, &authority, Usage::Both, "");
    issue_into(&files, &authority, Usage::Client, "client-");
    issue_into(&files, &ca("rogue CA"), Usage::Client, "rogue-");
    let ca_pem = files.write("ca.pem", authority.cert_pem());
    let mut args = tls_args(&files);
    args.extend(trellis_tests::strings(&["--tls-client-ca", &ca_pem]));
    let reg = RegistryProc::start("registry-mtls", &args).await;
    let health = https(&reg, "/health");

    let (code, out) = curl(&["--cacert", &ca_pem, &health]).await;
    println!("no client certificate: exit {code}, {out}");
    assert_ne!(code, 0, "{out}");
    assert!(!out.contains("\"ok\""), "{out}");

    let rogue = ["--cert", &files.path("rogue-cert.pem"), "--key", &files.path("rogue-key.pem")];
    let (code, out) = curl(&[&["--cacert", ca_pem.as_str()][..], &rogue, &[health.as_str()]].concat()).await;
    println!("client certificate from another CA: exit {code}, {out}");
    assert_ne!(code, 0, "{out}");
    assert!(!out.contains("\"ok\""), "{out}");

    let good = ["--cert", &files.path("client-cert.pem"), "--key", &files.path("client-key.pem")];
    for flag in ["--http2", "--http1.1"] {
        let (code, out) =
            curl(&[&["--cacert", ca_pem.as_str(), flag], &good[..], &[health.as_str()]].concat()).await;
        assert_eq!((code, out.as_str()), (0, r#"{"status":"ok"}"#), "{flag}");
    }

    let env = [
        ("TRELLIS_TLS_CERT", files.path("cert.pem")),
        ("TRELLIS_TLS_KEY", files.path("key.pem")),
        ("TRELLIS_TLS_CLIENT_CA", ca_pem.clone()),
    ];
    let (ok, err) = probe(reg.addr, &env).await;
    assert!(ok, "probe with the registry's own certificate: {err}");
    let (ok, err) = probe(reg.addr, &env[..2]).await;
    println!("probe without a client certificate: {err}");
    assert!(!ok, "the registry requires one");
}

#[tokio::test]
async fn sighup_reloads_the_certificate_and_a_bad_file_keeps_the_old_one() {
    let files = Files::new("tls-reload");
    let first = ca("first CA");
    let second = ca("second CA");
    issue_into(&files, &first, Usage::Server, "");
    let first_pem = files.write("first.pem", first.cert_pem());
    let second_pem = files.write("second.pem", second.cert_pem());
    let reg = RegistryProc::start("registry-reload", &tls_args(&files)).await;
    let health = https(&reg, "/health");
    assert_eq!(curl(&["--cacert", &first_pem, &health]).await.0, 0);
    assert_ne!(curl(&["--cacert", &second_pem, &health]).await.0, 0);

    issue_into(&files, &second, Usage::Server, "");
    reg.proc.signal(libc::SIGHUP);
    wait_for("the certificate from the second CA to be served", Duration::from_secs(10), || {
        let (pem, health) = (second_pem.clone(), health.clone());
        async move { (curl(&["--cacert", &pem, &health]).await.0 == 0).then_some(()) }
    })
    .await;
    let (code, _) = curl(&["--cacert", &first_pem, &health]).await;
    assert_ne!(code, 0, "the old certificate is no longer served");
    assert!(client_trusting(second.cert_pem()).get(&health).send().await.unwrap().status().is_success());

    // A broken key: the reload is refused with one clear line, the second certificate stays.
    files.write("key.pem", "-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n");
    reg.proc.signal(libc::SIGHUP);
    wait_for("the failed reload to be logged", Duration::from_secs(10), || {
        let log = reg.proc.log_text();
        async move { log.contains("TLS reload failed").then_some(()) }
    })
    .await;
    let line =
        reg.proc.log_text().lines().find(|l| l.contains("TLS reload failed")).unwrap_or_default().to_string();
    println!("{line}");
    assert!(line.contains("key.pem") && !line.contains("broken"), "{line}");
    assert_eq!(curl(&["--cacert", &second_pem, &health]).await.0, 0, "still serving");
}

#[tokio::test]
async fn bad_tls_files_or_flags_stop_the_registry_at_start_with_a_message() {
    let files = Files::new("tls-bad");
    let authority = ca("test CA");
    issue_into(&files, &authority, Usage::Server, "");
    files.write("garbage.pem", "hello\n");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            trellis_tests::strings(&[
                "--tls-cert",
                &files.path("missing.pem"),
                "--tls-key",
                &files.path("key.pem"),
            ]),
            "missing.pem",
        ),
        (
            trellis_tests::strings(&[
                "--tls-cert",
                &files.path("cert.pem"),
                "--tls-key",
                &files.path("garbage.pem"),
            ]),
            "garbage.pem",
        ),
        (
            trellis_tests::strings(&[
                "--tls-cert",
                &files.path("garbage.pem"),
                "--tls-key",
                &files.path("key.pem"),
            ]),
            "garbage.pem",
        ),
        (trellis_tests::strings(&["--tls-cert", &files.path("cert.pem")]), "--tls-key"),
    ];
    for (args, named) in cases {
        let mut proc = Launch::new("registry-bad-tls", &bin("registry"))
            .args(&trellis_tests::strings(&["--listen", "127.0.0.1:0"]))
            .args(&args)
            .spawn()
            .unwrap();
        let status = proc.wait_exit(Duration::from_secs(30)).expect("the registry exits");
        let log = proc.log_text();
        println!("{args:?}: {status}: {}", log.trim());
        assert!(!status.success());
        assert!(log.contains(named), "{log}");
        assert!(!log.contains("panicked"), "{log}");
    }
}
