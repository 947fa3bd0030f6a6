//! The registry's mesh CA over real sockets: `POST /v1/identity/sign` on the
//! registry binary, with the CA, ACL file and tokens `registry init` writes.
//! Leaves are checked with x509-parser against the CA's own certificate.
//!
//! Build first: `cargo build --release --workspace --bins`.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, PublicKeyData, SanType};
use reqwest::StatusCode;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde_json::{json, Value};
use trellis_registry::pki::Authority;
use trellis_tests::mesh::MeshSecrets;
use trellis_tests::process::{log_dir, unique_path, Launch};
use trellis_tests::{strings, RegistryProc};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A certificate request for `key` naming `sans` (DNS names, or URIs when they
/// contain `://`), which the registry must ignore.
fn csr(key: &KeyPair, sans: &[&str]) -> String {
    let mut params = CertificateParams::default();
    for s in sans {
        params.subject_alt_names.push(if s.contains("://") {
            SanType::URI((*s).try_into().unwrap())
        } else {
            SanType::DnsName((*s).try_into().unwrap())
        });
    }
    params.serialize_request(key).unwrap().pem().unwrap()
}

struct Answer {
    status: StatusCode,
    body: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"].as_str().unwrap_or("<no error code>")
    }
}

async fn sign(reg: &RegistryProc, token: Option<&str>, body: impl Into<reqwest::Body>) -> Answer {
    let mut req = reqwest::Client::new()
        .post(format!("{}/v1/identity/sign", reg.url()))
        .header("content-type", "application/json")
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("the registry answers");
    let status = resp.status();
    let body = resp.json().await.unwrap_or(Value::Null);
    Answer { status, body }
}

async fn sign_json(reg: &RegistryProc, token: Option<&str>, service: &str, csr: &str) -> Answer {
    sign(reg, token, json!({ "service": service, "csr": csr }).to_string()).await
}

fn der_of(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("a PEM certificate")
}

/// Checks `leaf_pem` was signed by `ca_pem`'s key for `key` and returns its
/// URI SANs and remaining lifetime in seconds.
fn check_leaf(leaf_pem: &str, ca_pem: &str, key: &KeyPair) -> (Vec<String>, i64) {
    let (leaf_der, ca_der) = (der_of(leaf_pem), der_of(ca_pem));
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    leaf.verify_signature(Some(ca.public_key())).expect("the leaf verifies against ca.pem");
    assert_eq!(leaf.issuer(), ca.subject());
    assert!(leaf.validity().is_valid());
    assert_eq!(leaf.public_key().raw, key.subject_public_key_info().as_slice(), "the leaf certifies our key");
    let eku = leaf.extended_key_usage().unwrap().expect("an EKU").value;
    assert!(eku.server_auth && eku.client_auth, "both TLS usages");
    let san = leaf.subject_alternative_name().unwrap().expect("a SAN");
    let names = san
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => u.to_string(),
            other => panic!("only URI SANs, got {other:?}"),
        })
        .collect();
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    (names, leaf.validity().not_after.timestamp() - now)
}

async fn metrics(reg: &RegistryProc, token: &str) -> String {
    let resp = reqwest::Client::new().get(format!("{}/metrics", reg.url())).bearer_auth(token).send().await;
    resp.expect("metrics answer").text().await.unwrap_or_default()
}

fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(line_start))?.rsplit_once(' ')?.1.parse().ok()
}

#[tokio::test]
async fn a_token_gets_a_leaf_for_its_own_service_only() {
    let mesh = MeshSecrets::generate("identity-sign", &["users", "billing"]);
    let mut args = mesh.registry_args();
    args.extend(strings(&["--cert-ttl", "90s"]));
    let reg = RegistryProc::start("identity-sign-registry", &args).await;
    let users = mesh.token("users");
    let key = KeyPair::generate().unwrap();

    // Names in the request, even another service's SPIFFE ID, are ignored.
    let asked = csr(&key, &["billing", "spiffe://trellis.local/svc/billing", "evil.example.com"]);
    let ok = sign_json(&reg, Some(&users), "users", &asked).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert_eq!(ok.body["spiffe_id"], "spiffe://trellis.local/svc/users");
    assert_eq!(ok.body["ca_bundle"].as_str(), Some(mesh.ca_pem().as_str()));
    let (sans, left) = check_leaf(ok.body["certificate"].as_str().unwrap(), &mesh.ca_pem(), &key);
    assert_eq!(sans, ["spiffe://trellis.local/svc/users"]);
    println!("a 90 s leaf has {left} s left when checked");
    assert!((80..=91).contains(&left), "--cert-ttl 90s gave a leaf with {left} s left");
    let not_after = humantime::parse_rfc3339(ok.body["not_after"].as_str().unwrap()).unwrap();
    let from_body = not_after.duration_since(SystemTime::now()).unwrap().as_secs() as i64;
    assert!((from_body - left).abs() <= 1, "not_after {} vs the leaf's {left} s", ok.body["not_after"]);

    // Another service's token, no token, an unknown token.
    let billing = mesh.token("billing");
    let denied = sign_json(&reg, Some(&billing), "users", &csr(&key, &[])).await;
    assert_eq!(
        (denied.status, denied.code()),
        (StatusCode::FORBIDDEN, "permission_denied"),
        "{}",
        denied.body
    );
    let anonymous = sign_json(&reg, None, "users", &csr(&key, &[])).await;
    assert_eq!((anonymous.status, anonymous.code()), (StatusCode::UNAUTHORIZED, "unauthenticated"));
    let unknown = sign_json(&reg, Some("not-a-token"), "users", &csr(&key, &[])).await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    // The observer reads everything but writes nothing.
    let observer = sign_json(&reg, Some(&mesh.token("observer")), "users", &csr(&key, &[])).await;
    assert_eq!(observer.status, StatusCode::FORBIDDEN);

    // Bad requests: 400 with a JSON body naming what is wrong.
    let garbage = sign_json(&reg, Some(&users), "users", "-----BEGIN CERTIFICATE REQUEST-----\nnope\n").await;
    assert_eq!(
        (garbage.status, garbage.code()),
        (StatusCode::BAD_REQUEST, "invalid_field"),
        "{}",
        garbage.body
    );
    assert!(garbage.body["message"].as_str().unwrap().contains("csr"), "{}", garbage.body);
    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let wrong_curve = sign_json(&reg, Some(&users), "users", &csr(&p384, &[])).await;
    assert_eq!(wrong_curve.status, StatusCode::BAD_REQUEST);
    assert!(wrong_curve.body["message"].as_str().unwrap().contains("P-256"), "{}", wrong_curve.body);
    let bad_name = sign_json(&reg, Some(&users), "Users!", &csr(&key, &[])).await;
    assert_eq!(bad_name.status, StatusCode::BAD_REQUEST, "{}", bad_name.body);
    let not_json = sign(&reg, Some(&users), "{\"service\":").await;
    assert_eq!((not_json.status, not_json.code()), (StatusCode::BAD_REQUEST, "invalid_json"));
    let extra = sign(&reg, Some(&users), json!({"service":"users","csr":"x","ttl":"10y"}).to_string()).await;
    assert_eq!((extra.status, extra.code()), (StatusCode::BAD_REQUEST, "invalid_field"), "{}", extra.body);
    let empty = sign(&reg, Some(&users), "").await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST);

    let text = metrics(&reg, &mesh.token("admin")).await;
    let count = |result: &str| {
        metric(&text, &format!("trellis_registry_certificates_signed_total{{result=\"{result}\"}}"))
            .unwrap_or(0.0)
    };
    assert_eq!(count("ok"), 1.0, "{text}");
    assert_eq!(count("refused"), 4.0);
    assert_eq!(count("invalid"), 6.0);
    assert!(reg.proc.log_tail().contains("mesh identity signed"));
    assert!(!reg.proc.log_tail().contains(&users), "no token in the log");
}

#[tokio::test]
async fn without_a_ca_the_route_answers_404_and_without_tokens_anyone_signs() {
    let plain = RegistryProc::start("identity-no-ca", &[]).await;
    let key = KeyPair::generate().unwrap();
    let none = sign_json(&plain, None, "users", &csr(&key, &[])).await;
    assert_eq!((none.status, none.code()), (StatusCode::NOT_FOUND, "not_found"), "{}", none.body);
    assert!(none.body["message"].as_str().unwrap().contains("--ca-cert"), "{}", none.body);

    // A CA but no ACL file: any caller gets any service's identity, and the
    // registry says so at start.
    let mesh = MeshSecrets::generate("identity-open", &[]);
    let ca_args = strings(&[
        "--ca-cert",
        &mesh.ca().display().to_string(),
        "--ca-key",
        &mesh.ca_key().display().to_string(),
        "--trust-domain",
        "prod.example",
    ]);
    let open = RegistryProc::start("identity-open-registry", &ca_args).await;
    let ok = sign_json(&open, None, "anything", &csr(&key, &[])).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    let (sans, _) = check_leaf(ok.body["certificate"].as_str().unwrap(), &mesh.ca_pem(), &key);
    assert_eq!(sans, ["spiffe://prod.example/svc/anything"]);
    assert!(open.proc.log_tail().contains("mesh CA without --acl-file"), "{}", open.proc.log_tail());
}

/// Replicas (on the etcd store, or any) given the same CA files issue leaves
/// of the same root; a rotation bundle hands out both roots.
#[tokio::test]
async fn replicas_with_the_same_ca_files_issue_leaves_of_one_root() {
    let mesh = MeshSecrets::generate("identity-replicas", &["users"]);
    let old = Authority::generate("old mesh CA", Duration::from_secs(3600)).unwrap();
    let bundle = unique_path(&log_dir(), "identity-bundle", "pem");
    let both = format!("{}{}", mesh.ca_pem(), old.cert_pem());
    std::fs::write(&bundle, &both).unwrap();
    let mut args = mesh.registry_args();
    args.extend(strings(&["--ca-bundle", &bundle.display().to_string()]));
    let a = RegistryProc::start("identity-replica-a", &args).await;
    let b = RegistryProc::start("identity-replica-b", &args).await;
    let users = mesh.token("users");
    for reg in [&a, &b] {
        let key = KeyPair::generate().unwrap();
        let ok = sign_json(reg, Some(&users), "users", &csr(&key, &[])).await;
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
        check_leaf(ok.body["certificate"].as_str().unwrap(), &mesh.ca_pem(), &key);
        let roots = ok.body["ca_bundle"].as_str().unwrap();
        assert_eq!(CertificateDer::pem_slice_iter(roots.as_bytes()).count(), 2, "both roots handed out");
        assert_eq!(roots, both);
    }
}

#[test]
fn a_bundle_without_the_ca_or_a_key_of_another_ca_stops_the_registry() {
    let mesh = MeshSecrets::generate("identity-bad-ca", &[]);
    let other = Authority::generate("another CA", Duration::from_secs(3600)).unwrap();
    let other_pem = unique_path(&log_dir(), "identity-other-ca", "pem");
    let other_key = unique_path(&log_dir(), "identity-other-key", "pem");
    std::fs::write(&other_pem, other.cert_pem()).unwrap();
    std::fs::write(&other_key, other.key_pem()).unwrap();
    let p = |p: &Path| p.display().to_string();
    let cases = [
        (vec![p(&mesh.ca()), p(&mesh.ca_key()), p(&other_pem)], "does not hold"),
        (vec![p(&mesh.ca()), p(&other_key), p(&mesh.ca())], "does not belong"),
    ];
    for (i, (files, needle)) in cases.iter().enumerate() {
        let args = strings(&[
            "--listen",
            "127.0.0.1:0",
            "--ca-cert",
            &files[0],
            "--ca-key",
            &files[1],
            "--ca-bundle",
            &files[2],
        ]);
        let mut proc = Launch::new(&format!("identity-bad-ca-{i}"), &trellis_tests::bin("registry"))
            .args(&args)
            .spawn()
            .unwrap();
        let status = proc.wait_exit(Duration::from_secs(30)).expect("the registry exits");
        assert!(!status.success());
        assert!(proc.log_tail().contains(needle), "{needle}: {}", proc.log_tail());
    }
}
