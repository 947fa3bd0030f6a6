//! Handshakes between identities over in-memory pipes: who is accepted, who is not, and rotation.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
}

/// A leaf for `uri` valid from `from` to `to` (seconds from now): (chain PEM, key PEM).
fn leaf_between(ca: &Ca, uri: &str, from: i64, to: i64) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::seconds(from);
    params.not_after = now + time::Duration::seconds(to);
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn leaf(ca: &Ca, uri: &str) -> (String, String) {
    leaf_between(ca, uri, -60, 3600)
}

fn svc(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

fn identity(ca: &Ca, service: &str) -> MeshIdentity {
    let (chain, key) = leaf(ca, &format!("spiffe://trellis.local/svc/{service}"));
    MeshIdentity::from_pem(TrustDomain::default(), svc(service), &ca.pem, &chain, &key).unwrap()
}

/// One handshake from `client` asking for `target` to `server`; Ok(the caller the server saw).
async fn handshake(
    client: &MeshIdentity,
    target: &str,
    server: &MeshIdentity,
) -> Result<ServiceName, String> {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(server.server_config());
    let server_side = async {
        let mut tls = acceptor.accept(b).await.map_err(|e| format!("server: {e}"))?;
        let caller = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| server.peer_service(c))
            .ok_or_else(|| "server: no caller".to_string())?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| format!("server read: {e}"))?;
        tls.write_all(&byte).await.map_err(|e| format!("server write: {e}"))?;
        tls.flush().await.map_err(|e| format!("server flush: {e}"))?;
        Ok::<_, String>(caller)
    };
    let connector = TlsConnector::from(client.client_config(false));
    let client_side = async {
        let mut tls = connector
            .connect(client.server_name(&svc(target)), a)
            .await
            .map_err(|e| format!("client: {e}"))?;
        tls.write_all(b"x").await.map_err(|e| format!("client write: {e}"))?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| format!("client read: {e}"))?;
        Ok::<_, String>(())
    };
    let (s, c) = tokio::join!(server_side, client_side);
    c?;
    s
}

#[tokio::test]
async fn callers_and_servers_prove_their_service() {
    let ca = ca("mesh");
    let users = identity(&ca, "users");
    let web = identity(&ca, "web");
    assert_eq!(handshake(&web, "users", &users).await.unwrap(), svc("web"));
    assert_eq!(handshake(&users, "web", &web).await.unwrap(), svc("users"));
}

#[tokio::test]
async fn a_server_with_another_identity_is_refused() {
    let ca = ca("mesh");
    let web = identity(&ca, "web");
    let billing = identity(&ca, "billing");
    // `billing` answers where `users` was asked for: a forged registration.
    let err = handshake(&web, "users", &billing).await.unwrap_err();
    assert!(err.contains("client"), "{err}");
}

#[tokio::test]
async fn another_ca_is_refused_both_ways() {
    let ca1 = ca("mesh");
    let ca2 = ca("intruder");
    let web = identity(&ca1, "web");
    let fake_users = identity(&ca2, "users");
    assert!(handshake(&web, "users", &fake_users).await.is_err());
    let fake_web = identity(&ca2, "web");
    let users = identity(&ca1, "users");
    assert!(handshake(&fake_web, "users", &users).await.is_err());
}

#[tokio::test]
async fn expired_leaves_are_refused() {
    let ca = ca("mesh");
    let users = identity(&ca, "users");
    let (chain, key) = leaf_between(&ca, "spiffe://trellis.local/svc/web", -7200, -3600);
    let expired = MeshIdentity::from_pem(TrustDomain::default(), svc("web"), &ca.pem, &chain, &key).unwrap();
    assert_eq!(expired.remaining(), Some(Duration::ZERO));
    let err = handshake(&expired, "users", &users).await.unwrap_err();
    assert!(err.contains("expired") || err.contains("Expired"), "{err}");
    let err = handshake(&users, "web", &expired).await.unwrap_err();
    assert!(err.contains("xpired"), "{err}");
}

#[tokio::test]
async fn a_leaf_of_another_trust_domain_is_refused() {
    let ca = ca("mesh");
    let users = identity(&ca, "users");
    let (chain, key) = leaf(&ca, "spiffe://elsewhere.example/svc/web");
    let foreign = MeshIdentity::from_pem(
        TrustDomain::new("elsewhere.example").unwrap(),
        svc("web"),
        &ca.pem,
        &chain,
        &key,
    )
    .unwrap();
    assert!(handshake(&foreign, "users", &users).await.is_err());
}

#[tokio::test]
async fn nothing_is_accepted_before_the_first_certificate() {
    let ca = ca("mesh");
    let users = identity(&ca, "users");
    let empty = MeshIdentity::new(TrustDomain::default(), svc("web"));
    assert_eq!(empty.not_after(), None);
    assert!(handshake(&empty, "users", &users).await.is_err());
    assert!(handshake(&users, "web", &empty).await.is_err());
}

#[tokio::test]
async fn rotation_and_a_second_root_take_effect_on_the_next_handshake() {
    let old = ca("mesh 1");
    let new = ca("mesh 2");
    let users = identity(&old, "users");
    let web = identity(&old, "web");
    // The CA is being rotated: `users` trusts both roots and moves to a leaf from the new one.
    let both = format!("{}{}", old.pem, new.pem);
    let (chain, key) = leaf(&new, "spiffe://trellis.local/svc/users");
    users.install(&both, &chain, PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap()).unwrap();
    // `web` still trusts only the old root, so it refuses the new leaf...
    assert!(handshake(&web, "users", &users).await.is_err());
    // ...until it trusts both; then old and new leaves meet.
    let (chain, key) = leaf(&old, "spiffe://trellis.local/svc/web");
    web.install(&both, &chain, PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap()).unwrap();
    assert_eq!(handshake(&web, "users", &users).await.unwrap(), svc("web"));
    assert_eq!(handshake(&users, "web", &web).await.unwrap(), svc("users"));
}

#[test]
fn install_refuses_what_is_not_this_identity() {
    let ca = ca("mesh");
    let id = MeshIdentity::new(TrustDomain::default(), svc("users"));
    let (chain, key) = leaf(&ca, "spiffe://trellis.local/svc/billing");
    let key_der = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let err = id.install(&ca.pem, &chain, key_der).unwrap_err();
    assert!(matches!(err, IdentityError::WrongIdentity { .. }), "{err}");
    // A key that is not the leaf's.
    let (chain, _) = leaf(&ca, "spiffe://trellis.local/svc/users");
    let (_, other_key) = leaf(&ca, "spiffe://trellis.local/svc/users");
    let err = id
        .install(&ca.pem, &chain, PrivateKeyDer::from_pem_slice(other_key.as_bytes()).unwrap())
        .unwrap_err();
    assert!(matches!(err, IdentityError::Key(_)), "{err}");
    // Garbage, and the message never quotes it.
    let secret = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0IQ==\n-----END PRIVATE KEY-----\n";
    let err =
        MeshIdentity::from_pem(TrustDomain::default(), svc("users"), &ca.pem, "nope", secret).unwrap_err();
    assert!(!err.to_string().contains("c2VjcmV0"), "{err}");
    assert_eq!(id.not_after(), None, "nothing was installed");
}

#[test]
fn names() {
    let td = TrustDomain::default();
    assert_eq!(spiffe_id(&td, &svc("users")), "spiffe://trellis.local/svc/users");
    let id = MeshIdentity::new(td.clone(), svc("web"));
    assert_eq!(
        format!("{:?}", id.server_name(&svc("users"))),
        format!("{:?}", ServerName::try_from("users.svc.trellis.local").unwrap())
    );
    assert_eq!(service_of(&td, "spiffe://trellis.local/svc/users"), Some(svc("users")));
    for bad in [
        "spiffe://trellis.local/svc/Users",
        "spiffe://trellis.localx/svc/a",
        "spiffe://trellis.local/ns/a",
        "http://trellis.local/svc/a",
    ] {
        assert_eq!(service_of(&td, bad), None, "{bad}");
    }
    for bad in ["", "Trellis.local", "a..b", "-a.b", "a b"] {
        assert!(TrustDomain::new(bad).is_err(), "{bad}");
    }
    assert!(TrustDomain::new("mesh.example.com").is_ok());
}
