//! The ACL file: TOML, read strictly. Unknown keys, duplicate names or
//! secrets, bad hex and empty secrets are refused, with messages that name the
//! token but never its secret.
//!
//! ```toml
//! default = "deny"             # or "read": what a request without a token may do
//! [[tokens]]
//! name = "users"
//! secret_sha256 = "9f86d08..." # hex SHA-256 of the secret, or secret = "..." (tests, demos)
//! write = ["users"]            # register, heartbeat, deregister; "billing-*" is a prefix
//! read = ["*"]                 # discover (default ["*"])
//! [[tokens]]
//! name = "ops"
//! secret_sha256 = "..."
//! admin = true                 # everything
//! ```

use std::collections::HashSet;

use serde::Deserialize;

use super::rules::{digest_of, Anonymous, Digest, Pattern, Rules, Token};

/// Why a file was refused. No variant carries a secret or its digest.
#[derive(Debug, thiserror::Error)]
pub enum AclFileError {
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    default: DefaultDoc,
    #[serde(default)]
    tokens: Vec<TokenDoc>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum DefaultDoc {
    Deny,
    Read,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenDoc {
    name: String,
    secret_sha256: Option<String>,
    secret: Option<Secret>,
    #[serde(default)]
    write: Vec<String>,
    read: Option<Vec<String>>,
    #[serde(default)]
    admin: bool,
}

/// A secret written in clear in the file; never printed.
#[derive(Deserialize)]
#[serde(transparent)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Parses a file's text. Errors name the token (by position and name), never a secret.
pub fn parse(text: &str) -> Result<Rules, String> {
    // toml's messages quote the offending line, which may hold a secret: keep
    // only the message's first line and the position.
    let doc: FileDoc = toml::from_str(text).map_err(describe_toml_error)?;
    let anonymous = match doc.default {
        DefaultDoc::Deny => Anonymous::Deny,
        DefaultDoc::Read => Anonymous::Read,
    };
    let mut names = HashSet::new();
    let mut digests: HashSet<Digest> = HashSet::new();
    let mut tokens = Vec::with_capacity(doc.tokens.len());
    for (i, t) in doc.tokens.into_iter().enumerate() {
        let which = format!("token #{} ({:?})", i + 1, t.name);
        if t.name.trim().is_empty() || t.name.len() > 64 || t.name.chars().any(char::is_control) {
            return Err(format!("token #{}: name must be 1 to 64 printable characters", i + 1));
        }
        if !names.insert(t.name.clone()) {
            return Err(format!("{which}: the name is used by an earlier token"));
        }
        let digest = match (&t.secret_sha256, &t.secret) {
            (Some(hex), None) => parse_hex(hex).ok_or_else(|| {
                format!("{which}: secret_sha256 must be 64 hex digits (the SHA-256 of the secret)")
            })?,
            (None, Some(secret)) if secret.0.is_empty() => {
                return Err(format!("{which}: secret is empty"));
            }
            (None, Some(secret)) => digest_of(secret.0.as_bytes()),
            (None, None) => return Err(format!("{which}: needs secret_sha256 (or secret)")),
            (Some(_), Some(_)) => return Err(format!("{which}: give secret_sha256 or secret, not both")),
        };
        if digest == digest_of(b"") {
            return Err(format!("{which}: secret_sha256 is the hash of an empty secret"));
        }
        if !digests.insert(digest) {
            return Err(format!("{which}: the secret is the same as an earlier token's"));
        }
        let patterns = |list: &[String], key: &str| -> Result<Vec<Pattern>, String> {
            list.iter().map(|p| Pattern::parse(p).map_err(|e| format!("{which}: {key}: {e}"))).collect()
        };
        let write = patterns(&t.write, "write")?;
        let read = match &t.read {
            Some(list) => patterns(list, "read")?,
            None => vec![Pattern::Any],
        };
        tokens.push(Token { name: t.name, digest, admin: t.admin, write, read });
    }
    Ok(Rules::new(anonymous, tokens))
}

fn describe_toml_error(e: toml::de::Error) -> String {
    let what = e.message().lines().next().unwrap_or("invalid TOML").to_string();
    match e.span() {
        Some(span) => format!("invalid at byte {}: {what}", span.start),
        None => what,
    }
}

fn parse_hex(s: &str) -> Option<Digest> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use trellis_shared::ServiceName;

    use super::*;

    const HASH_OF_TEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn parses_the_documented_file() {
        let rules = parse(&format!(
            r#"
default = "deny"
[[tokens]]
name = "users"
secret_sha256 = "{HASH_OF_TEST}"
write = ["users", "billing-*"]
[[tokens]]
name = "ops"
secret = "hunter2-ops"
admin = true
"#
        ))
        .unwrap();
        assert_eq!(rules.anonymous, Anonymous::Deny);
        let (_, users) = rules.find(b"test").unwrap();
        let svc = |s| ServiceName::new(s).unwrap();
        assert!(users.may_write(&svc("users")) && users.may_write(&svc("billing-eu")));
        assert!(!users.may_write(&svc("billing")) && users.may_read(&svc("billing")), "read defaults to *");
        assert!(rules.find(b"hunter2-ops").unwrap().1.admin);
    }

    #[test]
    fn refuses_bad_files_without_quoting_secrets() {
        let secret = "sup3r-s3cret-value";
        let token = |extra: &str| format!("default = \"deny\"\n[[tokens]]\nname = \"a\"\n{extra}\n");
        let cases = [
            token(&format!("secret = \"{secret}\"\nwrte = [\"a\"]")),
            token(&format!("secret_sha256 = \"{secret}\"")),
            token("secret_sha256 = \"zz86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\""),
            token("secret = \"\""),
            token(""),
            token(&format!("secret = \"{secret}\"\nsecret_sha256 = \"{HASH_OF_TEST}\"")),
            token(&format!("secret = \"{secret}\"\nwrite = [\"Billing\"]")),
            format!(
                "{}[[tokens]]\nname = \"a\"\nsecret = \"other\"\n",
                token(&format!("secret = \"{secret}\""))
            ),
            format!(
                "{}[[tokens]]\nname = \"b\"\nsecret = \"{secret}\"\n",
                token(&format!("secret = \"{secret}\""))
            ),
            format!("default = \"allow\"\n[[tokens]]\nname = \"a\"\nsecret = \"{secret}\"\n"),
            format!("default = \"deny\"\n[[tokens]]\nname = \"a\"\nsecret = \"{secret}"),
        ];
        for text in cases {
            let err = parse(&text).err().unwrap_or_else(|| panic!("accepted:\n{text}"));
            assert!(!err.contains(secret), "{err}");
        }
    }
}
