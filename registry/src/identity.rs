//! The mesh CA: the `--ca-*` flags, and signing a sidecar's certificate
//! request into a short-lived leaf (`POST /v1/identity/sign`, docs/mtls.md).
//!
//! The registry trusts nothing in a request but its public key: the signature
//! over it is checked (the caller holds the private key), the key must be
//! ECDSA P-256, and every name, extension and subject the request carries is
//! dropped. The leaf gets a fresh random serial, an empty subject, one URI SAN
//! (the SPIFFE ID of the service the caller's token may write), both TLS
//! usages, and a validity from a little before now (clock skew) to now plus
//! `--cert-ttl`.
//!
//! Replicas given the same `--ca-cert`/`--ca-key` files issue leaves that
//! chain to the same root, whichever store they share.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::Args;
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber, SubjectPublicKeyInfo, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use trellis_shared::identity::{check_trust_domain, rfc3339, spiffe_id, SignResponse, DEFAULT_TRUST_DOMAIN};
use trellis_shared::ServiceName;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::pki::{Authority, PkiError};

/// Shortest `--cert-ttl`: a leaf must outlive a renewal round trip.
pub const MIN_CERT_TTL: Duration = Duration::from_secs(1);

/// A leaf is valid from this long before it was signed: clocks drift.
const BACKDATE: Duration = Duration::from_secs(60);

/// The mesh CA's flags. Without `--ca-cert` and `--ca-key` the registry
/// issues no identities and `POST /v1/identity/sign` answers `404`.
#[derive(Debug, Clone, Args)]
pub struct IdentityArgs {
    /// PEM certificate of the CA that signs mesh identities (`registry init DIR`
    /// writes DIR/ca.pem). Needs --ca-key. Default: no mesh CA.
    #[arg(long, env = "TRELLIS_CA_CERT", value_name = "PATH", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// PEM private key of --ca-cert (`registry init DIR` writes DIR/ca-key.pem, mode 0600).
    #[arg(long, env = "TRELLIS_CA_KEY", value_name = "PATH", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// PEM roots handed to sidecars with each leaf, which they verify peers
    /// against: one or two certificates, one of them --ca-cert (two while the
    /// CA is rotated, docs/mtls.md). Default: --ca-cert alone.
    #[arg(long, env = "TRELLIS_CA_BUNDLE", value_name = "PATH", requires = "ca_cert")]
    pub ca_bundle: Option<PathBuf>,
    /// Trust domain of the identities issued: `spiffe://<trust-domain>/svc/<service>`.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Lifetime of an issued leaf; sidecars renew at about 70 % of it.
    #[arg(long, env = "TRELLIS_CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,
}

impl IdentityArgs {
    pub fn enabled(&self) -> bool {
        self.ca_cert.is_some() && self.ca_key.is_some()
    }

    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        check_trust_domain(&self.trust_domain).map_err(|e| format!("--trust-domain: {e}"))?;
        if self.cert_ttl < MIN_CERT_TTL {
            return Err(format!("--cert-ttl must be at least {}", humantime::format_duration(MIN_CERT_TTL)));
        }
        Ok(())
    }
}

/// A mesh CA that cannot be loaded; the registry does not start.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {flag} {}: {source}", path.display())]
    Read { flag: &'static str, path: PathBuf, source: std::io::Error },
    #[error("--ca-cert/--ca-key: {0}")]
    Ca(String),
    #[error("--ca-bundle {}: {reason}", path.display())]
    Bundle { path: PathBuf, reason: String },
}

/// Why a request cannot be signed: the caller's fault, answered `400`.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("csr is not a PEM certificate request (-----BEGIN CERTIFICATE REQUEST-----)")]
    NotPem,
    #[error("csr cannot be parsed: {0}")]
    Parse(String),
    #[error("csr's signature does not verify with its own public key")]
    Signature,
    #[error("csr's key must be ECDSA P-256")]
    KeyType,
}

/// A failure to sign a request that was fine: the CA's fault (`500`).
#[derive(Debug, thiserror::Error)]
#[error("cannot sign the leaf: {0}")]
pub struct SignFailure(#[from] PkiError);

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error(transparent)]
    Failed(#[from] SignFailure),
}

/// The loaded mesh CA.
pub struct MeshCa {
    authority: Authority,
    bundle: String,
    trust_domain: String,
    ttl: Duration,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa")
            .field("trust_domain", &self.trust_domain)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn read(flag: &'static str, path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

impl MeshCa {
    /// The CA the flags name, `None` without `--ca-cert`. The key must belong
    /// to the certificate, the certificate must be a CA still valid, and the
    /// bundle must hold it: otherwise the leaves would not verify.
    pub fn load(args: &IdentityArgs) -> Result<Option<Self>, IdentityError> {
        let (Some(cert_path), Some(key_path)) = (&args.ca_cert, &args.ca_key) else { return Ok(None) };
        let cert_pem = read("--ca-cert", cert_path)?;
        let key_pem = read("--ca-key", key_path)?;
        let bundle = match &args.ca_bundle {
            Some(path) => read("--ca-bundle", path)?,
            None => cert_pem.clone(),
        };
        let ca = Self::from_pem(&cert_pem, &key_pem, bundle, &args.trust_domain, args.cert_ttl);
        ca.map(Some).map_err(|e| match (e, &args.ca_bundle) {
            (IdentityError::Bundle { reason, .. }, Some(path)) => {
                IdentityError::Bundle { path: path.clone(), reason }
            }
            (e, _) => e,
        })
    }

    /// The CA from PEM text (what [`MeshCa::load`] read).
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        bundle: String,
        trust_domain: &str,
        ttl: Duration,
    ) -> Result<Self, IdentityError> {
        let bad = |why: String| IdentityError::Ca(why);
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| bad(format!("the certificate is not PEM: {e}")))?;
        let (_, cert) = X509Certificate::from_der(&cert_der)
            .map_err(|e| bad(format!("the certificate cannot be parsed: {e}")))?;
        if !cert.is_ca() {
            return Err(bad("the certificate is not a CA (basic constraints)".into()));
        }
        if !cert.validity().is_valid() {
            return Err(bad(format!(
                "the certificate is not valid now (until {})",
                cert.validity().not_after
            )));
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| bad(format!("the key cannot be read: {e}")))?;
        if key.subject_public_key_info() != cert.tbs_certificate.subject_pki.raw {
            return Err(bad("the key does not belong to the certificate".into()));
        }
        let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(bundle.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| IdentityError::Bundle { path: PathBuf::new(), reason: format!("not PEM: {e}") })?;
        if !roots.iter().any(|r| r.as_ref() == cert_der.as_ref()) {
            return Err(IdentityError::Bundle {
                path: PathBuf::new(),
                reason: "does not hold the --ca-cert certificate, so no leaf would verify against it".into(),
            });
        }
        let authority = Authority::load(cert_pem, key_pem).map_err(|e| bad(e.to_string()))?;
        Ok(MeshCa { authority, bundle, trust_domain: trust_domain.to_string(), ttl })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Certifies the key of `csr_pem` as `service` for `--cert-ttl`.
    pub fn sign(&self, service: &ServiceName, csr_pem: &str) -> Result<SignResponse, SignError> {
        let key = requested_key(csr_pem)?;
        let id = spiffe_id(&self.trust_domain, service);
        let now = SystemTime::now();
        let not_after = now + self.ttl;
        let mut params = CertificateParams::default();
        // No subject: the identity is the SAN alone (rcgen then marks it critical).
        params.distinguished_name = DistinguishedName::new();
        let uri = id.clone().try_into().map_err(|e: rcgen::Error| SignFailure(e.into()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        // rcgen's default serial is a hash of the key: a renewal with the same
        // key would repeat it.
        let mut serial = rand::random::<[u8; 16]>();
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        let leaf = self.authority.certify(&params, &key).map_err(SignFailure)?;
        Ok(SignResponse {
            spiffe_id: id,
            certificate: leaf.pem(),
            ca_bundle: self.bundle.clone(),
            not_after: rfc3339(not_after),
        })
    }
}

/// The public key of a PEM certificate request whose signature it verifies.
fn requested_key(csr_pem: &str) -> Result<SubjectPublicKeyInfo, CsrError> {
    let der =
        CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|_| CsrError::NotPem)?;
    let (_, csr) =
        X509CertificationRequest::from_der(der.as_ref()).map_err(|e| CsrError::Parse(e.to_string()))?;
    csr.verify_signature().map_err(|_| CsrError::Signature)?;
    // The algorithm is matched on the key's own identifier (curve included),
    // not on the request's signature algorithm, which does not name a curve.
    let key = SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|_| CsrError::KeyType)?;
    if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(CsrError::KeyType);
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use x509_parser::extensions::GeneralName;

    use super::*;

    fn ca(ttl: Duration) -> (Authority, MeshCa) {
        let root = Authority::generate("test mesh CA", Duration::from_secs(3600)).unwrap();
        let mesh =
            MeshCa::from_pem(root.cert_pem(), root.key_pem(), root.cert_pem().into(), "trellis.local", ttl)
                .unwrap();
        (root, mesh)
    }

    fn csr(key: &KeyPair, sans: &[&str]) -> String {
        let params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn signs_only_the_key_with_the_services_identity() {
        let (_, mesh) = ca(Duration::from_secs(600));
        let key = KeyPair::generate().unwrap();
        let users = ServiceName::new("users").unwrap();
        let before = SystemTime::now();
        let signed = mesh.sign(&users, &csr(&key, &["admin.example.com", "billing"])).unwrap();
        assert_eq!(signed.spiffe_id, "spiffe://trellis.local/svc/users");
        let der = CertificateDer::from_pem_slice(signed.certificate.as_bytes()).unwrap();
        let (_, leaf) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(leaf.tbs_certificate.subject_pki.raw, key.subject_public_key_info().as_slice());
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "an empty subject makes the SAN critical");
        assert_eq!(san.value.general_names, vec![GeneralName::URI("spiffe://trellis.local/svc/users")]);
        assert!(leaf.subject().iter_attributes().next().is_none(), "no subject at all");
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!leaf.is_ca());
        let lifetime = leaf.validity().not_after.timestamp()
            - before.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!((599..=601).contains(&lifetime), "{lifetime}");
        assert_eq!(
            signed.expires().map(|t| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64),
            Some(leaf.validity().not_after.timestamp())
        );
        // Two leaves for one key still differ in serial.
        let again = mesh.sign(&users, &csr(&key, &[])).unwrap();
        let der2 = CertificateDer::from_pem_slice(again.certificate.as_bytes()).unwrap();
        let (_, leaf2) = X509Certificate::from_der(&der2).unwrap();
        assert_ne!(leaf.serial, leaf2.serial);
    }

    #[test]
    fn refuses_what_is_not_a_p256_request_signed_by_its_key() {
        let (_, mesh) = ca(Duration::from_secs(60));
        let users = ServiceName::new("users").unwrap();
        let refused = |pem: &str| mesh.sign(&users, pem).unwrap_err().to_string();
        assert!(refused("hello").contains("PEM"));
        let junk = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n";
        assert!(refused(junk).contains("parsed"));
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert!(refused(&csr(&p384, &[])).contains("P-256"));
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert!(refused(&csr(&ed, &[])).contains("P-256"));
        // A request whose signature was made by another key.
        let good = csr(&KeyPair::generate().unwrap(), &[]);
        let mut der =
            CertificateSigningRequestDer::from_pem_slice(good.as_bytes()).unwrap().as_ref().to_vec();
        let last = der.len() - 1;
        der[last] ^= 1;
        let tampered = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64_encode(&der)
        );
        assert!(refused(&tampered).contains("signature"));
    }

    #[test]
    fn a_ca_must_match_its_key_and_be_in_the_bundle() {
        let a = Authority::generate("a", Duration::from_secs(3600)).unwrap();
        let b = Authority::generate("b", Duration::from_secs(3600)).unwrap();
        let ttl = Duration::from_secs(60);
        let e = MeshCa::from_pem(a.cert_pem(), b.key_pem(), a.cert_pem().into(), "t", ttl).unwrap_err();
        assert!(e.to_string().contains("does not belong"), "{e}");
        let e = MeshCa::from_pem(a.cert_pem(), a.key_pem(), b.cert_pem().into(), "t", ttl).unwrap_err();
        assert!(e.to_string().contains("does not hold"), "{e}");
        let two = format!("{}{}", b.cert_pem(), a.cert_pem());
        let mesh = MeshCa::from_pem(a.cert_pem(), a.key_pem(), two.clone(), "t", ttl).unwrap();
        let signed =
            mesh.sign(&ServiceName::new("x").unwrap(), &csr(&KeyPair::generate().unwrap(), &[])).unwrap();
        assert_eq!(signed.ca_bundle, two);
        let leaf = a.issue(&["leaf".into()], crate::pki::Usage::Server, ttl).unwrap();
        let e = MeshCa::from_pem(&leaf.cert_pem, &leaf.key_pem, leaf.cert_pem.clone(), "t", ttl).unwrap_err();
        assert!(e.to_string().contains("not a CA"), "{e}");
    }

    fn base64_encode(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }
}
