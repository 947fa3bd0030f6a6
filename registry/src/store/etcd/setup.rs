//! `registry etcd-setup`: prepares an etcd cluster for the registry through
//! the same JSON gateway the store uses (container images have no shell and
//! no etcdctl).
//!
//! Idempotent. With etcd's auth off it creates `root` (with the root password)
//! and turns auth on at the end; with auth on it logs in as root. Either way
//! it makes sure of the role named like the user, with readwrite on
//! `<prefix>/` and nothing else, and of the user with that role and the
//! password in its file (so running it again with a new file rotates the
//! password). Last, it logs in as the user and reads the prefix, which proves
//! the registry will be able to.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::auth::{plain, Credentials};
use super::client::{prefix_end, EtcdClient, EtcdError};
use super::config::{read_password, with_scheme, AccessError, EtcdAccess, EtcdTlsArgs};
use crate::store::StoreSpec;

/// The flags of `registry etcd-setup`.
#[derive(Debug, Clone, clap::Args)]
pub struct SetupArgs {
    /// The etcd cluster, as for the registry: `etcd://host:2379,...[/prefix]`
    /// or `etcd+https://...`.
    #[arg(long, env = "TRELLIS_STORE")]
    pub store: StoreSpec,
    #[command(flatten)]
    pub tls: EtcdTlsArgs,
    /// File holding etcd's root password: set when auth is still off, used to
    /// log in when it is on.
    #[arg(long, env = "TRELLIS_ETCD_ROOT_PASSWORD_FILE", value_name = "PATH")]
    pub root_password_file: PathBuf,
    /// The etcd user the registry will run as (and the name of its role).
    #[arg(long, env = "TRELLIS_ETCD_USER", default_value = "trellis", value_name = "NAME")]
    pub user: String,
    /// File holding the password of `--user`.
    #[arg(long, env = "TRELLIS_ETCD_PASSWORD_FILE", value_name = "PATH")]
    pub password_file: PathBuf,
    /// Key prefix the user may read and write; default the prefix of `--store`.
    #[arg(long, value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// How long to wait for etcd to answer at all (it may still be starting).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("--store must name an etcd cluster (etcd://host:port,...)")]
    NotEtcd,
    #[error("--prefix must start with '/' and not end with one, got {0:?}")]
    Prefix(String),
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("{step}: {source}")]
    Etcd { step: String, source: EtcdError },
}

/// What `run` found and did, for the one line it prints.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Auth was off: it is now on.
    Enabled,
    /// Auth was already on: users and roles were checked (and brought in line).
    AlreadyEnabled,
}

/// One request per attempt to one member.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

fn step(what: impl Into<String>) -> impl FnOnce(EtcdError) -> SetupError {
    let step = what.into();
    move |source| SetupError::Etcd { step, source }
}

/// Ignores etcd's "already exists": the point is that it exists.
fn exists_ok(r: Result<Value, EtcdError>) -> Result<bool, EtcdError> {
    match r {
        Ok(_) => Ok(true),
        Err(EtcdError::Refused { message, .. }) if message.contains("already exists") => Ok(false),
        Err(e) => Err(e),
    }
}

/// Runs the setup, again from the start while etcd is out of reach or has no
/// leader yet (every step is idempotent), up to `--wait`.
pub async fn run(args: &SetupArgs) -> Result<Outcome, SetupError> {
    let deadline = Instant::now() + args.wait;
    loop {
        match attempt(args).await {
            Err(SetupError::Etcd { source, .. }) if !source.is_fatal() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            done => return done,
        }
    }
}

async fn attempt(args: &SetupArgs) -> Result<Outcome, SetupError> {
    let StoreSpec::Etcd { endpoints, prefix } = &args.store else { return Err(SetupError::NotEtcd) };
    let prefix = args.prefix.clone().unwrap_or_else(|| prefix.clone());
    if !prefix.starts_with('/') || prefix.ends_with('/') {
        return Err(SetupError::Prefix(prefix));
    }
    let endpoints = with_scheme(endpoints.clone(), &args.tls);
    let root = Credentials {
        user: "root".into(),
        password: read_password("--root-password-file", &args.root_password_file)?,
    };
    let user = Credentials {
        user: args.user.clone(),
        password: read_password("--password-file", &args.password_file)?,
    };
    let access = |credentials: Option<Credentials>| -> Result<EtcdAccess, AccessError> {
        Ok(EtcdAccess {
            tls: args.tls.load()?,
            private_ca: args.tls.etcd_ca.is_some(),
            credentials,
            token_refresh: Duration::from_secs(60),
        })
    };
    let connect = step("cannot connect");
    let admin =
        EtcdClient::new(endpoints.clone(), REQUEST_TIMEOUT, &access(Some(root.clone()))?).map_err(connect)?;

    // Logging in as root tells whether auth is on (a token) or off (none).
    admin.login().await.map_err(step("logging in as root"))?;
    let auth_on = admin.has_token();

    if !auth_on {
        let root_pw = json!({"name": "root", "password": root.password.expose()});
        if !exists_ok(admin.post("v3/auth/user/add", &root_pw).await).map_err(step("adding user root"))? {
            admin.post("v3/auth/user/changepw", &root_pw).await.map_err(step("setting root's password"))?;
        }
        admin
            .post("v3/auth/user/grant", &json!({"user": "root", "role": "root"}))
            .await
            .map_err(step("granting root the root role"))?;
    }

    let role = &args.user;
    exists_ok(admin.post("v3/auth/role/add", &json!({"name": role})).await)
        .map_err(step(format!("adding role {role}")))?;
    let key = format!("{prefix}/").into_bytes();
    let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b);
    let perm = json!({"name": role, "perm": {
        "permType": "READWRITE",
        "key": b64(&key),
        "range_end": b64(&prefix_end(&key)),
    }});
    admin.post("v3/auth/role/grant", &perm).await.map_err(step(format!("granting role {role} {prefix}/")))?;

    let user_pw = json!({"name": user.user, "password": user.password.expose()});
    let added = exists_ok(admin.post("v3/auth/user/add", &user_pw).await)
        .map_err(step(format!("adding user {}", user.user)))?;
    if !added {
        admin
            .post("v3/auth/user/changepw", &user_pw)
            .await
            .map_err(step(format!("setting the password of user {}", user.user)))?;
    }
    admin
        .post("v3/auth/user/grant", &json!({"user": user.user, "role": role}))
        .await
        .map_err(step(format!("granting user {} the role {role}", user.user)))?;

    if !auth_on {
        match admin.post("v3/auth/enable", &json!({})).await {
            Ok(_) => {}
            // Another etcd-setup got there first.
            Err(EtcdError::Refused { message, .. }) if plain(&message).contains("already") => {}
            Err(e) => return Err(step("enabling authentication")(e)),
        }
    }

    // Proof: the user can log in and read its prefix.
    let check = EtcdClient::new(endpoints, REQUEST_TIMEOUT, &access(Some(user.clone()))?)
        .map_err(step("checking"))?;
    check.login().await.map_err(step(format!("logging in as {}", user.user)))?;
    check.check(&key).await.map_err(step(format!("reading {prefix}/ as {}", user.user)))?;
    Ok(if auth_on { Outcome::AlreadyEnabled } else { Outcome::Enabled })
}
