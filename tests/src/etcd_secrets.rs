//! Credentials for an etcd cluster with TLS and auth, made at run time in the
//! layout `registry init DIR --etcd-member NAME...` writes, so the etcd tests
//! and the `ha` compose test read the same files the documentation describes:
//!
//! ```text
//! DIR/ca.pem                              the CA every party trusts
//! DIR/etcd/<member>.pem, <member>-key.pem  each member (server and client: peers and
//!                                         etcd's own gateway dial with it); SAN the
//!                                         member's name, localhost and 127.0.0.1
//! DIR/etcd/registry-client.pem, -key.pem  the registry's client certificate
//! DIR/etcd/root.password                  etcd's root user
//! DIR/etcd/trellis.password               the registry's etcd user
//! ```
//!
//! Keys and passwords are 0600, certificates 0644; `owner` gives everything to
//! another uid (the images' 65532) when the test runs as root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::distr::{Alphanumeric, SampleString};
use trellis_registry::init::{init, InitArgs, Owner};

/// The etcd user the registry runs as.
pub const ETCD_USER: &str = "trellis";

/// The folder of generated credentials.
#[derive(Debug, Clone)]
pub struct EtcdSecrets {
    pub dir: PathBuf,
}

const DAY: Duration = Duration::from_secs(86_400);

/// A random password; only ever in the files, never in the test's output.
pub fn password() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 32)
}

impl EtcdSecrets {
    /// A new CA, certificates for `members` and the registry, and two
    /// passwords, in `dir`: what `registry init` writes, by the same code.
    pub fn generate(dir: &Path, members: &[&str], owner: Option<u32>) -> std::io::Result<EtcdSecrets> {
        let args = InitArgs {
            dir: dir.to_path_buf(),
            names: Vec::new(),
            services: Vec::new(),
            etcd_members: members.iter().map(|m| m.to_string()).collect(),
            ca_ttl: DAY,
            cert_ttl: DAY,
            owner: owner.map(|uid| Owner { uid, gid: Some(uid) }),
            force: true,
        };
        init(&args).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(EtcdSecrets { dir: dir.to_path_buf() })
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn member_cert(&self, member: &str) -> PathBuf {
        self.dir.join("etcd").join(format!("{member}.pem"))
    }

    pub fn member_key(&self, member: &str) -> PathBuf {
        self.dir.join("etcd").join(format!("{member}-key.pem"))
    }

    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("etcd/registry-client.pem")
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir.join("etcd/registry-client-key.pem")
    }

    /// The password file of an etcd user (`root` or [`ETCD_USER`]).
    pub fn password_file(&self, user: &str) -> PathBuf {
        self.dir.join("etcd").join(format!("{user}.password"))
    }

    /// The password itself, to check it never shows up in output.
    pub fn password(&self, user: &str) -> String {
        std::fs::read_to_string(self.password_file(user)).unwrap_or_default().trim_end().to_string()
    }

    /// The registry's TLS flags towards etcd (CA and client certificate).
    pub fn registry_tls_args(&self) -> Vec<String> {
        let p = |p: PathBuf| p.display().to_string();
        vec![
            "--etcd-ca".into(),
            p(self.ca()),
            "--etcd-cert".into(),
            p(self.client_cert()),
            "--etcd-key".into(),
            p(self.client_key()),
        ]
    }

    /// The registry's TLS and auth flags towards etcd.
    pub fn registry_args(&self) -> Vec<String> {
        let mut args = self.registry_tls_args();
        args.extend([
            "--etcd-user".into(),
            ETCD_USER.into(),
            "--etcd-password-file".into(),
            self.password_file(ETCD_USER).display().to_string(),
        ]);
        args
    }

    /// An HTTP client that trusts the CA and presents the registry's client certificate.
    pub fn http_client(&self) -> reqwest::Client {
        let ca = std::fs::read(self.ca()).expect("ca.pem");
        let mut identity = std::fs::read(self.client_cert()).expect("client certificate");
        identity.extend(std::fs::read(self.client_key()).expect("client key"));
        reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .no_proxy()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA certificate"))
            .identity(reqwest::Identity::from_pem(&identity).expect("client identity"))
            .build()
            .expect("TLS client")
    }
}
