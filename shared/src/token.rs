//! The bearer token the registry client presents on every call.
//!
//! It comes from a file (re-read when its modification time or length changes,
//! polled once a second, and at once after a `401`, so a rotated token is
//! picked up without a restart) or from a secret given once (the sidecar reads
//! `TRELLIS_TOKEN`; a flag would show in `ps`). The current value is kept as a
//! ready-made, sensitive `Authorization` header behind an `ArcSwap`, so a
//! request reads it without a lock. The secret never appears in `Debug` output
//! or in a log line; the file's path may.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use reqwest::header::HeaderValue;

/// How often a token file is checked for a change.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Where the token comes from.
#[derive(Clone, Default)]
pub enum TokenSpec {
    /// No token: requests carry no `Authorization` header.
    #[default]
    None,
    /// A secret given once (from the environment).
    Secret(String),
    /// A file holding the secret; surrounding whitespace is ignored.
    File(PathBuf),
}

impl std::fmt::Debug for TokenSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSpec::None => f.write_str("None"),
            TokenSpec::Secret(_) => f.write_str("Secret(<redacted>)"),
            TokenSpec::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

/// Why a token could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the token file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the token file {} is empty", path.display())]
    EmptyFile { path: PathBuf },
    #[error("the token is empty")]
    Empty,
    // The reason never quotes the secret.
    #[error("the token{} holds characters an HTTP header cannot carry", from.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default())]
    Invalid { from: Option<PathBuf> },
}

/// The header value for `secret`, trimmed, marked sensitive (hyper's HPACK
/// never indexes it, and its `Debug` prints `Sensitive`).
fn header_of(secret: &str, from: Option<&Path>) -> Result<HeaderValue, TokenError> {
    let secret = secret.trim();
    if secret.is_empty() {
        return Err(match from {
            Some(p) => TokenError::EmptyFile { path: p.to_path_buf() },
            None => TokenError::Empty,
        });
    }
    let mut value = HeaderValue::try_from(format!("Bearer {secret}"))
        .map_err(|_| TokenError::Invalid { from: from.map(Path::to_path_buf) })?;
    value.set_sensitive(true);
    Ok(value)
}

/// What identifies a version of the token file without reading it.
type Stamp = (Option<SystemTime>, u64);

fn stamp_of(path: &Path) -> std::io::Result<Stamp> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.modified().ok(), meta.len()))
}

fn read_file(path: &Path) -> Result<(HeaderValue, Stamp), TokenError> {
    let read = |source| TokenError::Read { path: path.to_path_buf(), source };
    let stamp = stamp_of(path).map_err(read)?;
    let text = std::fs::read_to_string(path).map_err(read)?;
    Ok((header_of(&text, Some(path))?, stamp))
}

/// The current token, shared by every clone of a client.
pub struct TokenSource {
    header: ArcSwap<Option<HeaderValue>>,
    file: Option<PathBuf>,
    /// The stamp of the file version loaded; taken only by reloads, never by requests.
    stamp: Mutex<Option<Stamp>>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self.header.load().is_some();
        f.debug_struct("TokenSource")
            .field("token", &if set { "<redacted>" } else { "none" })
            .field("file", &self.file)
            .finish()
    }
}

impl TokenSource {
    /// Loads the token; a file that cannot be read, or holds no usable token, is an error.
    pub fn load(spec: &TokenSpec) -> Result<Self, TokenError> {
        let (header, file, stamp) = match spec {
            TokenSpec::None => (None, None, None),
            TokenSpec::Secret(s) => (Some(header_of(s, None)?), None, None),
            TokenSpec::File(path) => {
                let (h, stamp) = read_file(path)?;
                (Some(h), Some(path.clone()), Some(stamp))
            }
        };
        Ok(TokenSource { header: ArcSwap::from_pointee(header), file, stamp: Mutex::new(stamp) })
    }

    /// The `Authorization` header to send, if any. Lock-free.
    pub fn header(&self) -> Option<HeaderValue> {
        self.header.load().as_ref().clone()
    }

    /// Whether the token comes from a file that may change.
    pub fn is_file(&self) -> bool {
        self.file.is_some()
    }

    /// Re-reads the file when it changed (always with `force`); true when the
    /// token changed. A file that became unreadable or empty keeps the last
    /// token and is reported once per change of the file.
    pub fn reload(&self, force: bool) -> bool {
        let Some(path) = &self.file else { return false };
        let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamp_of(path).ok();
        if !force && now.is_some() && now == *last {
            return false;
        }
        match read_file(path) {
            Ok((header, stamp)) => {
                *last = Some(stamp);
                let changed = self.header.load().as_ref().as_ref().map(HeaderValue::as_bytes)
                    != Some(header.as_bytes());
                if changed {
                    self.header.store(Arc::new(Some(header)));
                    tracing::info!(path = %path.display(), "registry token reloaded from its file");
                }
                changed
            }
            Err(e) => {
                if now != *last {
                    *last = now;
                    tracing::warn!(error = %e, "cannot reload the registry token; keeping the last one");
                }
                false
            }
        }
    }

    /// Polls the token file once a second for as long as `source` lives
    /// (needs a Tokio runtime; does nothing without a file).
    pub fn spawn_poll(source: &Arc<TokenSource>) {
        if source.file.is_none() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let weak: Weak<TokenSource> = Arc::downgrade(source);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(POLL_INTERVAL).await;
                let Some(source) = weak.upgrade() else { return };
                source.reload(false);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("trellis-token-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("token")
    }

    #[test]
    fn a_file_token_is_trimmed_and_reloaded_when_it_changes() {
        let path = temp_file("reload");
        std::fs::write(&path, "first-secret\n").unwrap();
        let source = TokenSource::load(&TokenSpec::File(path.clone())).unwrap();
        assert_eq!(source.header().unwrap().as_bytes(), b"Bearer first-secret");
        assert!(source.header().unwrap().is_sensitive());
        assert!(!source.reload(false), "an unchanged file is not a change");
        std::fs::write(&path, "  second-secret-longer \n").unwrap();
        assert!(source.reload(false));
        assert_eq!(source.header().unwrap().as_bytes(), b"Bearer second-secret-longer");
        // An emptied file keeps the last token.
        std::fs::write(&path, "\n").unwrap();
        assert!(!source.reload(true));
        assert_eq!(source.header().unwrap().as_bytes(), b"Bearer second-secret-longer");
    }

    #[test]
    fn secrets_never_show_in_debug_or_errors() {
        let secret = "s3cr3t-value-for-debug";
        let spec = TokenSpec::Secret(secret.into());
        let source = TokenSource::load(&spec).unwrap();
        assert!(!format!("{spec:?} {source:?}").contains(secret));
        let bad = TokenSource::load(&TokenSpec::Secret("bad\u{7f}secret".into())).unwrap_err();
        assert!(!bad.to_string().contains("secret"), "{bad}");
        assert!(TokenSource::load(&TokenSpec::Secret("  ".into())).is_err());
        assert!(TokenSource::load(&TokenSpec::File("/nonexistent/token".into())).is_err());
    }
}
