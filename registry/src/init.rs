//! `registry init DIR`: the credentials a deployment needs to run with TLS and
//! tokens, in one command, with no openssl and no hand-written secret.
//!
//! ```text
//! DIR/ca.pem               the CA every client trusts (--registry-ca, --tls-client-ca)
//! DIR/ca-key.pem           its key (0600): the registry's --ca-key when it signs mesh identities
//!                          (docs/mtls.md), otherwise keep it offline once the leaves are issued
//! DIR/registry.pem         the registry's certificate for the --name values
//! DIR/registry-key.pem     its key (0600)
//! DIR/acl.toml             --acl-file: default deny, one token per --service, admin, observer
//! DIR/tokens/NAME.token    each token's secret (0600), 64 hex characters, no newline
//! DIR/etcd/...             with --etcd-member: member and client certificates, etcd passwords
//! ```
//!
//! Everything is generated in memory first, so a failure writes nothing, and
//! each file is written beside its final name and renamed over it, so a file
//! is never seen half written nor with the wrong mode. The summary names paths
//! and tokens, never a secret.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rand::TryRngCore;
use trellis_shared::names::ServiceName;

use crate::pki::{Authority, PkiError, Usage};

/// Names the registry certificate is valid for when no `--name` is given:
/// the compose service name, and loopback for healthchecks and curl.
pub const DEFAULT_NAMES: [&str; 3] = ["registry", "localhost", "127.0.0.1"];

/// Token names `init` always writes; a `--service` may not take them.
const ADMIN: &str = "admin";
const OBSERVER: &str = "observer";
/// The registry's client certificate towards etcd, beside the members' files.
const ETCD_CLIENT: &str = "registry-client";

/// `registry init DIR`. Its flags read no environment variable on purpose: a
/// one-shot command run in a shell that has `TRELLIS_SERVICE` set for a
/// sidecar must not quietly pick it up.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// Folder to write into; created when missing.
    pub dir: PathBuf,
    /// A DNS name or IP address the registry's certificate is valid for; repeat
    /// for several. Default: registry, localhost, 127.0.0.1.
    #[arg(long = "name", value_name = "NAME")]
    pub names: Vec<String>,
    /// A service that gets its own token, which may register, heartbeat and
    /// deregister that service and discover every service; repeat for several.
    #[arg(long = "service", value_name = "SERVICE")]
    pub services: Vec<ServiceName>,
    /// An etcd member (its host name) to issue a certificate for; repeat for
    /// each. Also writes the registry's etcd client certificate and the
    /// passwords of etcd's `root` and `trellis` users.
    #[arg(long = "etcd-member", value_name = "NAME")]
    pub etcd_members: Vec<String>,
    /// How long the CA is valid.
    #[arg(long, default_value = "10y", value_parser = humantime::parse_duration)]
    pub ca_ttl: Duration,
    /// How long the registry's and etcd's certificates are valid.
    #[arg(long, default_value = "1y", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,
    /// Give every file and folder written to this user (`UID` or `UID:GID`),
    /// for example the images' user 65532 when run as root. Default: the caller.
    #[arg(long, value_name = "UID[:GID]")]
    pub owner: Option<Owner>,
    /// Replace the credentials in a folder that already holds a `ca.pem`
    /// (every certificate and token is new afterwards).
    #[arg(long)]
    pub force: bool,
}

/// The owner to give the files: a numeric user and, optionally, group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: Option<u32>,
}

impl FromStr for Owner {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let number = |v: &str| v.parse::<u32>().map_err(|_| format!("{s:?} is not UID or UID:GID (numbers)"));
        match s.split_once(':') {
            Some((uid, gid)) => Ok(Owner { uid: number(uid)?, gid: Some(number(gid)?) }),
            None => Ok(Owner { uid: number(s)?, gid: None }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{0} already holds credentials (ca.pem); pass --force to replace all of them")]
    Exists(PathBuf),
    #[error("{0}")]
    Pki(#[from] PkiError),
    #[error("--service {0} is reserved for a token init always writes")]
    Reserved(String),
    #[error("{what} {name} is given twice")]
    Duplicate { what: &'static str, name: String },
    #[error("the system's random source failed: {0}")]
    Random(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InitError + '_ {
    move |source| InitError::Io { path: path.to_path_buf(), source }
}

/// Who may read a file: the public certificates anyone, keys and secrets only the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Public,
    Secret,
}

impl Mode {
    fn bits(self) -> u32 {
        match self {
            Mode::Public => 0o644,
            Mode::Secret => 0o600,
        }
    }
}

/// One file to write, relative to DIR.
struct Planned {
    path: PathBuf,
    contents: String,
    mode: Mode,
}

impl std::fmt::Debug for Planned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let contents = if self.mode == Mode::Secret { "<redacted>" } else { &self.contents };
        f.debug_struct("Planned").field("path", &self.path).field("contents", &contents).finish()
    }
}

/// What `init` wrote, for the summary: paths relative to DIR and token names.
#[derive(Debug)]
pub struct Written {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub tokens: Vec<String>,
    pub etcd_members: Vec<String>,
}

/// A token secret: 32 bytes from the operating system's random source, as 64
/// lowercase hex characters (what clients send, and what `secret_sha256` hashes).
fn secret() -> Result<String, InitError> {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.try_fill_bytes(&mut bytes).map_err(|e| InitError::Random(e.to_string()))?;
    Ok(hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The hex SHA-256 of a secret as a client presents it: what acl.toml stores.
pub fn secret_sha256(secret: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

/// One `[[tokens]]` entry of acl.toml.
struct TokenRule<'a> {
    name: &'a str,
    hash: String,
    write: Vec<&'a str>,
    admin: bool,
    comment: &'a str,
}

fn acl_toml(rules: &[TokenRule<'_>]) -> String {
    // Names are validated labels (no quote, no backslash), so plain quoting is TOML-safe.
    let mut s = String::from(
        "# Who may do what on the Trellis registry, written by `registry init`.\n\
         # Give it to every registry replica: --acl-file PATH (TRELLIS_ACL_FILE). The registry re-reads it\n\
         # on SIGHUP and when it changes; an invalid file is refused and the old rules stay.\n\
         #\n\
         # default        what a request without a token may do: \"deny\" or \"read\".\n\
         # [[tokens]]     one per client. A client presents the secret as `Authorization: Bearer SECRET`\n\
         #                or `X-Trellis-Token: SECRET`; the secrets are in tokens/NAME.token, not here.\n\
         #   name           shown in logs and metrics (the secret never is).\n\
         #   secret_sha256  hex SHA-256 of the secret: printf %s \"$(cat tokens/NAME.token)\" | sha256sum\n\
         #   write          services it may register, heartbeat and deregister; \"billing-*\" is a prefix.\n\
         #   read           services it may discover (default [\"*\"]).\n\
         #   admin = true   everything, /metrics included.\n\
         \n\
         default = \"deny\"\n",
    );
    for r in rules {
        let _ = write!(
            s,
            "\n# {}\n[[tokens]]\nname = \"{}\"\nsecret_sha256 = \"{}\"\n",
            r.comment, r.name, r.hash
        );
        if !r.write.is_empty() {
            let list: Vec<String> = r.write.iter().map(|w| format!("\"{w}\"")).collect();
            let _ = writeln!(s, "write = [{}]", list.join(", "));
        }
        if r.admin {
            s.push_str("admin = true\n");
        } else {
            s.push_str("read = [\"*\"]\n");
        }
    }
    s
}

fn no_duplicates<'a>(what: &'static str, names: impl IntoIterator<Item = &'a str>) -> Result<(), InitError> {
    let mut seen = std::collections::BTreeSet::new();
    for n in names {
        if !seen.insert(n) {
            return Err(InitError::Duplicate { what, name: n.to_string() });
        }
    }
    Ok(())
}

/// Everything to write, generated in memory, and the token names.
fn plan(args: &InitArgs) -> Result<(Vec<Planned>, Vec<String>), InitError> {
    let names: Vec<String> = if args.names.is_empty() {
        DEFAULT_NAMES.iter().map(|n| n.to_string()).collect()
    } else {
        args.names.clone()
    };
    no_duplicates("--name", names.iter().map(String::as_str))?;
    no_duplicates("--service", args.services.iter().map(ServiceName::as_str))?;
    no_duplicates("--etcd-member", args.etcd_members.iter().map(String::as_str))?;
    if let Some(s) = args.services.iter().find(|s| [ADMIN, OBSERVER].contains(&s.as_str())) {
        return Err(InitError::Reserved(s.to_string()));
    }
    if let Some(m) = args.etcd_members.iter().find(|m| *m == ETCD_CLIENT) {
        return Err(InitError::Duplicate { what: "--etcd-member", name: m.clone() });
    }

    let ca = Authority::generate("Trellis CA", args.ca_ttl)?;
    let registry = ca.issue(&names, Usage::Both, args.cert_ttl)?;
    let mut files = vec![
        Planned { path: "ca.pem".into(), contents: ca.cert_pem().to_string(), mode: Mode::Public },
        Planned { path: "ca-key.pem".into(), contents: ca.key_pem().to_string(), mode: Mode::Secret },
        Planned { path: "registry.pem".into(), contents: registry.cert_pem, mode: Mode::Public },
        Planned { path: "registry-key.pem".into(), contents: registry.key_pem, mode: Mode::Secret },
    ];

    let mut tokens: Vec<(String, String, Vec<&str>, bool, String)> = Vec::new();
    for s in &args.services {
        let comment = format!("may register {s}, discover everything");
        tokens.push((s.to_string(), secret()?, vec![s.as_str()], false, comment));
    }
    tokens.push((ADMIN.into(), secret()?, vec![], true, "operators: everything".into()));
    tokens.push((
        OBSERVER.into(),
        secret()?,
        vec![],
        false,
        "dashboards and curl: discover everything".into(),
    ));
    let rules: Vec<TokenRule<'_>> = tokens
        .iter()
        .map(|(name, secret, write, admin, comment)| TokenRule {
            name,
            hash: secret_sha256(secret),
            write: write.clone(),
            admin: *admin,
            comment,
        })
        .collect();
    files.push(Planned { path: "acl.toml".into(), contents: acl_toml(&rules), mode: Mode::Public });
    for (name, secret, ..) in &tokens {
        let path = Path::new("tokens").join(format!("{name}.token"));
        files.push(Planned { path, contents: secret.clone(), mode: Mode::Secret });
    }

    if !args.etcd_members.is_empty() {
        let etcd = Path::new("etcd");
        for m in &args.etcd_members {
            let member_names = [m.clone(), "localhost".into(), "127.0.0.1".into()];
            let member = ca.issue(&member_names, Usage::Both, args.cert_ttl)?;
            files.push(Planned {
                path: etcd.join(format!("{m}.pem")),
                contents: member.cert_pem,
                mode: Mode::Public,
            });
            files.push(Planned {
                path: etcd.join(format!("{m}-key.pem")),
                contents: member.key_pem,
                mode: Mode::Secret,
            });
        }
        // etcd's JSON gateway refuses every request whose client certificate has a
        // common name once auth is on (it would take the name for the user), so
        // the registry's certificate towards etcd has none.
        let client = ca.issue_nameless_client(&[ETCD_CLIENT.to_string()], args.cert_ttl)?;
        files.push(Planned {
            path: etcd.join(format!("{ETCD_CLIENT}.pem")),
            contents: client.cert_pem,
            mode: Mode::Public,
        });
        files.push(Planned {
            path: etcd.join(format!("{ETCD_CLIENT}-key.pem")),
            contents: client.key_pem,
            mode: Mode::Secret,
        });
        for user in ["root", "trellis"] {
            files.push(Planned {
                path: etcd.join(format!("{user}.password")),
                contents: secret()?,
                mode: Mode::Secret,
            });
        }
    }
    Ok((files, tokens.into_iter().map(|(name, ..)| name).collect()))
}

/// Writes `contents` to `path` with `mode`, through a temporary file renamed over it.
fn write_file(path: &Path, contents: &str, mode: Mode, owner: Option<Owner>) -> Result<(), InitError> {
    let tmp = path.with_extension("init-tmp");
    // A temporary file left by an interrupted run would make create_new fail.
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode.bits())
        .open(&tmp)
        .map_err(io(&tmp))?;
    // The umask may have taken bits away from a public file; set them exactly.
    f.set_permissions(std::fs::Permissions::from_mode(mode.bits())).map_err(io(&tmp))?;
    f.write_all(contents.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    if let Some(o) = owner {
        std::os::unix::fs::chown(&tmp, Some(o.uid), o.gid).map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Creates `dir` (and its parents) with `mode` when missing, and gives it to `owner`.
fn make_dir(dir: &Path, mode: u32, owner: Option<Owner>) -> Result<(), InitError> {
    if !dir.is_dir() {
        std::fs::DirBuilder::new().recursive(true).mode(mode).create(dir).map_err(io(dir))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(io(dir))?;
    if let Some(o) = owner {
        std::os::unix::fs::chown(dir, Some(o.uid), o.gid).map_err(io(dir))?;
    }
    Ok(())
}

/// Runs `registry init`: refuses a folder holding credentials unless `force`,
/// generates everything, then writes it.
pub fn init(args: &InitArgs) -> Result<Written, InitError> {
    if args.dir.join("ca.pem").exists() && !args.force {
        return Err(InitError::Exists(args.dir.clone()));
    }
    let (files, tokens) = plan(args)?;
    // DIR and etcd/ hold public certificates beside 0600 keys; tokens/ holds only secrets.
    make_dir(&args.dir, 0o755, args.owner)?;
    make_dir(&args.dir.join("tokens"), 0o700, args.owner)?;
    if !args.etcd_members.is_empty() {
        make_dir(&args.dir.join("etcd"), 0o755, args.owner)?;
    }
    for f in &files {
        write_file(&args.dir.join(&f.path), &f.contents, f.mode, args.owner)?;
    }
    Ok(Written {
        dir: args.dir.clone(),
        files: files.into_iter().map(|f| f.path).collect(),
        tokens,
        etcd_members: args.etcd_members.clone(),
    })
}

/// What `registry init` prints: what it wrote and what to run next; never a secret.
pub fn summary(w: &Written) -> String {
    let d = w.dir.display();
    let mut s = format!("registry init: wrote {} files into {d}:\n", w.files.len());
    for f in &w.files {
        let _ = writeln!(s, "  {}", f.display());
    }
    let _ = writeln!(s, "tokens (secrets in {d}/tokens/NAME.token): {}", w.tokens.join(", "));
    let _ = write!(
        s,
        "next:\n  \
         registry --acl-file {d}/acl.toml --tls-cert {d}/registry.pem --tls-key {d}/registry-key.pem \
         --ca-cert {d}/ca.pem --ca-key {d}/ca-key.pem\n  \
         sidecar --registry https://registry:7600 --registry-ca {d}/ca.pem --token-file {d}/tokens/SERVICE.token --mtls ...\n  \
         curl --cacert {d}/ca.pem -H \"Authorization: Bearer $(cat {d}/tokens/observer.token)\" \
         https://127.0.0.1:7600/v1/services\n"
    );
    if !w.etcd_members.is_empty() {
        let _ = write!(
            s,
            "  etcd members: --cert-file {d}/etcd/MEMBER.pem --key-file {d}/etcd/MEMBER-key.pem \
             --trusted-ca-file {d}/ca.pem --client-cert-auth\n  \
             registry --etcd-ca {d}/ca.pem --etcd-cert {d}/etcd/{ETCD_CLIENT}.pem \
             --etcd-key {d}/etcd/{ETCD_CLIENT}-key.pem --etcd-user trellis \
             --etcd-password-file {d}/etcd/trellis.password\n"
        );
    }
    s.push_str("keep ca-key.pem offline once done; rotation: docs/security.md\n");
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("trellis-init-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn args(dir: &Path, extra: &[&str]) -> InitArgs {
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            init: InitArgs,
        }
        let mut argv = vec!["init".to_string(), dir.display().to_string()];
        argv.extend(extra.iter().map(|s| s.to_string()));
        <Wrap as clap::Parser>::try_parse_from(argv).unwrap().init
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Acl {
        default: String,
        tokens: Vec<Token>,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Token {
        name: String,
        secret_sha256: String,
        #[serde(default)]
        write: Vec<String>,
        #[serde(default)]
        read: Vec<String>,
        #[serde(default)]
        admin: bool,
    }

    #[test]
    fn writes_the_layout_with_private_modes_and_an_acl_matching_the_tokens() {
        let dir = scratch("layout");
        let w = init(&args(&dir, &["--service", "users", "--service", "orders"])).unwrap();
        assert_eq!(w.tokens, ["users", "orders", "admin", "observer"]);
        for (file, want) in [
            ("ca.pem", 0o644),
            ("ca-key.pem", 0o600),
            ("registry.pem", 0o644),
            ("registry-key.pem", 0o600),
            ("acl.toml", 0o644),
            ("tokens", 0o700),
            ("tokens/users.token", 0o600),
            ("tokens/admin.token", 0o600),
        ] {
            assert_eq!(mode(&dir.join(file)), want, "{file}");
        }
        assert!(!dir.join("etcd").exists(), "no etcd files unless asked");

        let acl: Acl = toml::from_str(&std::fs::read_to_string(dir.join("acl.toml")).unwrap()).unwrap();
        assert_eq!(acl.default, "deny");
        let by_name: BTreeMap<&str, &Token> = acl.tokens.iter().map(|t| (t.name.as_str(), t)).collect();
        assert_eq!(by_name.len(), 4);
        for (name, t) in &by_name {
            let secret = std::fs::read_to_string(dir.join(format!("tokens/{name}.token"))).unwrap();
            assert_eq!(secret.len(), 64, "{name}: 32 bytes as hex, no newline");
            assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));
            assert_eq!(t.secret_sha256, secret_sha256(&secret), "{name}");
            assert!(!std::fs::read_to_string(dir.join("acl.toml")).unwrap().contains(&secret));
        }
        assert_eq!(by_name["users"].write, ["users"]);
        assert_eq!(by_name["users"].read, ["*"]);
        assert!(!by_name["users"].admin);
        assert!(by_name["admin"].admin && by_name["admin"].write.is_empty());
        assert_eq!(by_name["observer"].read, ["*"]);
        assert!(by_name["observer"].write.is_empty() && !by_name["observer"].admin);
        let secrets: std::collections::BTreeSet<&str> =
            acl.tokens.iter().map(|t| t.secret_sha256.as_str()).collect();
        assert_eq!(secrets.len(), 4, "every token has its own secret");

        // The certificate chain loads back as a CA that can keep issuing.
        let ca = Authority::load(
            &std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
            &std::fs::read_to_string(dir.join("ca-key.pem")).unwrap(),
        );
        assert!(ca.is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn etcd_members_get_certificates_and_passwords() {
        let dir = scratch("etcd");
        init(&args(&dir, &["--etcd-member", "etcd1", "--etcd-member", "etcd2"])).unwrap();
        for f in ["etcd1.pem", "etcd2.pem", "registry-client.pem"] {
            assert!(std::fs::read_to_string(dir.join("etcd").join(f)).unwrap().contains("BEGIN CERTIFICATE"));
            assert_eq!(mode(&dir.join("etcd").join(f)), 0o644, "{f}");
        }
        for f in
            ["etcd1-key.pem", "etcd2-key.pem", "registry-client-key.pem", "root.password", "trellis.password"]
        {
            assert_eq!(mode(&dir.join("etcd").join(f)), 0o600, "{f}");
        }
        let root = std::fs::read_to_string(dir.join("etcd/root.password")).unwrap();
        let trellis = std::fs::read_to_string(dir.join("etcd/trellis.password")).unwrap();
        assert_eq!(root.len(), 64);
        assert_ne!(root, trellis);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_existing_credentials_without_force_and_replaces_them_with_it() {
        let dir = scratch("force");
        init(&args(&dir, &[])).unwrap();
        let before = std::fs::read_to_string(dir.join("tokens/admin.token")).unwrap();
        let err = init(&args(&dir, &[])).unwrap_err();
        assert!(matches!(err, InitError::Exists(_)), "{err}");
        assert!(err.to_string().contains("--force"));
        assert_eq!(std::fs::read_to_string(dir.join("tokens/admin.token")).unwrap(), before, "untouched");
        init(&args(&dir, &["--force"])).unwrap();
        assert_ne!(std::fs::read_to_string(dir.join("tokens/admin.token")).unwrap(), before);
        assert_eq!(mode(&dir.join("tokens/admin.token")), 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_bad_input_before_writing_anything() {
        let dir = scratch("bad");
        for extra in [
            &["--service", "admin"][..],
            &["--service", "a", "--service", "a"],
            &["--name", "not a name"],
            &["--etcd-member", "registry-client"],
        ] {
            let err = init(&args(&dir, extra)).unwrap_err();
            println!("{extra:?}: {err}");
            assert!(!dir.exists(), "{extra:?} wrote something");
        }
        let wrap_err = |argv: &[&str]| {
            #[derive(clap::Parser, Debug)]
            struct Wrap {
                #[command(flatten)]
                _init: InitArgs,
            }
            <Wrap as clap::Parser>::try_parse_from(argv).is_err()
        };
        assert!(wrap_err(&["init", "d", "--service", "Bad_Name"]));
        assert!(wrap_err(&["init", "d", "--owner", "me"]));
        assert_eq!("65532:65532".parse(), Ok(Owner { uid: 65532, gid: Some(65532) }));
        assert_eq!("1000".parse(), Ok(Owner { uid: 1000, gid: None }));
    }

    #[test]
    fn the_summary_names_tokens_but_never_a_secret() {
        let dir = scratch("summary");
        let w = init(&args(&dir, &["--service", "users", "--etcd-member", "etcd1"])).unwrap();
        let s = summary(&w);
        assert!(s.contains("users, admin, observer"), "{s}");
        assert!(s.contains("tokens/users.token") && s.contains("--acl-file"));
        for entry in std::fs::read_dir(dir.join("tokens")).unwrap() {
            let secret = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            assert!(!s.contains(&secret));
        }
        assert!(!s.contains(&std::fs::read_to_string(dir.join("etcd/trellis.password")).unwrap()));
        assert!(!s.contains("PRIVATE KEY"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn owner_hands_every_file_to_another_user() {
        // Only root may give files away; elsewhere the chown path is covered by
        // the compose tests, which run init as root with --owner.
        if euid() != 0 {
            println!("SKIPPED: not root, cannot chown");
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let dir = scratch("owner");
        let w = init(&args(&dir, &["--owner", "65532:65533"])).unwrap();
        for f in w.files.iter().chain([&PathBuf::from("tokens"), &PathBuf::from("")]) {
            let m = std::fs::metadata(dir.join(f)).unwrap();
            assert_eq!((m.uid(), m.gid()), (65532, 65533), "{}", f.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The effective uid, read from /proc (the registry does not link libc for this).
    fn euid() -> u32 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX)
    }
}
