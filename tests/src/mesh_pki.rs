//! Mesh certificates made at run time for the mTLS tests: a CA, leaves whose
//! identity is the SPIFFE URI SAN `spiffe://<trust-domain>/svc/<service>`
//! (ECDSA P-256, EKU serverAuth and clientAuth, as the registry issues them),
//! an expired leaf, and leaves from another CA. Keys live only in memory and
//! in the PEM strings handed to the code under test.

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};

/// The trust domain the tests use (the sidecar's default).
pub const TRUST_DOMAIN: &str = "trellis.local";

/// A leaf: its certificate chain and private key, PEM.
#[derive(Clone)]
pub struct Leaf {
    pub chain_pem: String,
    pub key_pem: String,
}

/// A certificate authority of the tests.
pub struct MeshCa {
    params: CertificateParams,
    key: KeyPair,
    /// The CA certificate, PEM: the roots every party trusts.
    pub cert_pem: String,
}

impl MeshCa {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> MeshCa {
        let key = KeyPair::generate().expect("generate a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert_pem = params.self_signed(&key).expect("self-sign the CA").pem();
        MeshCa { params, key, cert_pem }
    }

    /// A leaf for `service`, valid from yesterday for a year.
    pub fn leaf(&self, service: &str) -> Leaf {
        let now = time::OffsetDateTime::now_utc();
        self.leaf_valid(service, now - time::Duration::days(1), now + time::Duration::days(365))
    }

    /// A leaf for `service` that expired in 2021.
    pub fn expired_leaf(&self, service: &str) -> Leaf {
        self.leaf_valid(service, date_time_ymd(2020, 1, 1), date_time_ymd(2021, 1, 1))
    }

    fn leaf_valid(
        &self,
        service: &str,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Leaf {
        let key = KeyPair::generate().expect("generate a leaf key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf parameters");
        let uri = format!("spiffe://{TRUST_DOMAIN}/svc/{service}");
        params.subject_alt_names = vec![SanType::URI(uri.try_into().expect("a SPIFFE ID is IA5"))];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = not_before;
        params.not_after = not_after;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("sign the leaf");
        Leaf { chain_pem: cert.pem(), key_pem: key.serialize_pem() }
    }
}
