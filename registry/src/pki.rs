//! A small certificate authority: the CA and the certificates that
//! `registry init` writes, and that tests issue for themselves. ECDSA P-256
//! keys throughout (what rustls, etcd and every browser accept), made by
//! rcgen over ring.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid name {name:?} for a certificate: {reason}")]
    Name { name: String, reason: String },
}

/// What a leaf certificate may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A TLS server (the registry, an etcd member).
    Server,
    /// A TLS client (the registry towards etcd, a sidecar towards the registry).
    Client,
    /// Both: a registry whose healthcheck presents its own certificate to itself.
    Both,
}

/// A leaf certificate and its private key, both PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("cert_pem", &self.cert_pem).field("key_pem", &"<redacted>").finish()
    }
}

/// A CA that can sign leaves.
pub struct Authority {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

/// Clocks drift: a certificate is valid from a little before it was made.
const BACKDATE: Duration = Duration::from_secs(300);

fn validity(params: &mut CertificateParams, valid_for: Duration) {
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + valid_for).into();
}

fn subject(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Trellis");
    dn.push(DnType::CommonName, common_name);
    dn
}

impl Authority {
    /// A new self-signed CA, valid for `valid_for`.
    pub fn generate(common_name: &str, valid_for: Duration) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        validity(&mut params, valid_for);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Authority { cert_pem: cert.pem(), key_pem, issuer: Issuer::new(params, key) })
    }

    /// A CA from its PEM certificate and key (as `generate` wrote them).
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Authority { cert_pem: cert_pem.to_string(), key_pem: key_pem.to_string(), issuer })
    }

    /// The CA certificate, PEM: what clients and servers trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key, PEM: written once, with mode 0600, by `registry init`.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A leaf for `names` (DNS names or IP addresses, the first also its
    /// common name), valid for `valid_for`.
    pub fn issue(&self, names: &[String], usage: Usage, valid_for: Duration) -> Result<Issued, PkiError> {
        let common_name = names.first().map(String::as_str).unwrap_or("trellis");
        self.sign(names, Some(common_name), usage, valid_for)
    }

    /// A client leaf for `names` with no common name: with its auth on, etcd
    /// refuses on its JSON gateway any client certificate that has one (it
    /// cannot map it to a user there); the registry logs in with a password.
    pub fn issue_nameless_client(&self, names: &[String], valid_for: Duration) -> Result<Issued, PkiError> {
        self.sign(names, None, Usage::Client, valid_for)
    }

    /// Signs `params` for a key this CA never sees the private half of (a
    /// certificate request's): the mesh identities of `crate::identity`.
    pub fn certify(
        &self,
        params: &CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<rcgen::Certificate, PkiError> {
        Ok(params.signed_by(public_key, &self.issuer)?)
    }

    fn sign(
        &self,
        names: &[String],
        common_name: Option<&str>,
        usage: Usage,
        valid_for: Duration,
    ) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = match common_name {
            Some(cn) => subject(cn),
            None => {
                let mut dn = DistinguishedName::new();
                dn.push(DnType::OrganizationName, "Trellis");
                dn
            }
        };
        params.subject_alt_names = names.iter().map(|n| san(n)).collect::<Result<_, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Both => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, valid_for);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

fn san(name: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let label_ok =
        |l: &str| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(PkiError::Name {
            name: name.to_string(),
            reason: "is neither an IP address nor a DNS name (letters, digits, '-', dot-separated)".into(),
        });
    }
    let dns = name
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| PkiError::Name { name: name.to_string(), reason: e.to_string() })?;
    Ok(SanType::DnsName(dns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_leaves_that_a_reloaded_ca_can_keep_issuing() {
        let day = Duration::from_secs(86_400);
        let ca = Authority::generate("Trellis test CA", day).unwrap();
        let leaf = ca.issue(&["registry".into(), "127.0.0.1".into()], Usage::Both, day).unwrap();
        assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(leaf.key_pem.contains("PRIVATE KEY"));
        assert!(!format!("{leaf:?}").contains("PRIVATE KEY"), "Debug never shows the key");
        let again = Authority::load(ca.cert_pem(), ca.key_pem()).unwrap();
        assert!(again.issue(&["etcd1".into()], Usage::Server, day).is_ok());
        assert!(ca.issue(&["not a name!".into()], Usage::Server, day).is_err());
    }
}
