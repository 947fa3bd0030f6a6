//! A mesh's credentials for end-to-end tests, made at run time by `registry
//! init`'s own code: the CA the registry signs identities with, the ACL file
//! and one token per service. [`MeshSecrets::registry_args`] and
//! [`MeshSecrets::sidecar_args`] are the flags of a registry that issues
//! identities and of a sidecar that asks for one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use trellis_registry::init::{init, InitArgs};
use trellis_shared::ServiceName;

use crate::process::{log_dir, unique_path};

/// The folder `registry init DIR --service S...` wrote.
#[derive(Debug, Clone)]
pub struct MeshSecrets {
    pub dir: PathBuf,
}

const DAY: Duration = Duration::from_secs(86_400);

impl MeshSecrets {
    /// A new CA, ACL file and tokens (one per service, plus `admin` and
    /// `observer`) in a fresh folder of this test run.
    pub fn generate(name: &str, services: &[&str]) -> MeshSecrets {
        let dir = unique_path(&log_dir(), name, "mesh");
        let args = InitArgs {
            dir: dir.clone(),
            names: Vec::new(),
            services: services.iter().map(|s| ServiceName::new(*s).expect("a service name")).collect(),
            etcd_members: Vec::new(),
            ca_ttl: DAY,
            cert_ttl: DAY,
            owner: None,
            force: true,
        };
        init(&args).unwrap_or_else(|e| panic!("registry init {}: {e}", dir.display()));
        MeshSecrets { dir }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }

    pub fn acl(&self) -> PathBuf {
        self.dir.join("acl.toml")
    }

    /// The file of a token `registry init` wrote (a service's, `admin`, `observer`).
    pub fn token_file(&self, name: &str) -> PathBuf {
        self.dir.join("tokens").join(format!("{name}.token"))
    }

    /// The token itself.
    pub fn token(&self, name: &str) -> String {
        read(&self.token_file(name)).trim().to_string()
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        read(&self.ca())
    }

    /// A registry with tokens that signs identities: `--acl-file`, `--ca-cert`, `--ca-key`.
    pub fn registry_args(&self) -> Vec<String> {
        vec![
            "--acl-file".into(),
            self.acl().display().to_string(),
            "--ca-cert".into(),
            self.ca().display().to_string(),
            "--ca-key".into(),
            self.ca_key().display().to_string(),
        ]
    }

    /// A sidecar holding `service`'s identity with its token: `--token-file`, `--mtls`.
    pub fn sidecar_args(&self, service: &str) -> Vec<String> {
        vec!["--token-file".into(), self.token_file(service).display().to_string(), "--mtls".into()]
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
