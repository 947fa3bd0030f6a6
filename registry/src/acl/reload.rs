//! [`Acl`]: the live rules and their reloads.
//!
//! Requests load the rules from an `ArcSwap` (one atomic load, no lock); a
//! reload parses the whole file and swaps it in, or refuses it with one error
//! line and keeps the rules in force. Reloads happen on SIGHUP and when the
//! file's content changes.
//!
//! Changes are found by reading the file once a second and comparing the
//! SHA-256 of its content, rather than by inotify: config management and
//! Kubernetes replace files by renaming (a watch on the old inode sees
//! nothing), mtimes can be too coarse to see two writes within a second, and
//! reading a file of a few kilobytes a second costs nothing measurable. It
//! needs no extra crate and bounds how stale a replica's rules can be.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::failures::Failures;
use super::file::{parse, AclFileError};
use super::rules::{digest_of, Digest, Rules};
use crate::lock;
use crate::metrics::Metrics;

/// How often the file is read for changes.
pub const POLL_EVERY: Duration = Duration::from_secs(1);

pub struct Acl {
    path: PathBuf,
    rules: ArcSwap<Rules>,
    /// Digest of the content last tried (loaded or refused), so a refused file
    /// is reported once, not every second; `None` after a failed read.
    seen: Mutex<Option<Digest>>,
    pub failures: Failures,
    metrics: Arc<Metrics>,
}

impl Acl {
    /// Reads the file; a registry does not start on an invalid one.
    pub fn load(path: &Path, metrics: Arc<Metrics>) -> Result<Self, AclFileError> {
        let text = read(path)?;
        let rules = parse(&text).map_err(|message| invalid(path, message))?;
        info!(path = %path.display(), tokens = rules.len(), default = ?rules.anonymous, "ACL loaded");
        Ok(Acl {
            path: path.to_path_buf(),
            rules: ArcSwap::from_pointee(rules),
            seen: Mutex::new(Some(digest_of(text.as_bytes()))),
            failures: Failures::default(),
            metrics,
        })
    }

    /// The rules in force: one atomic load, no lock, no allocation.
    pub fn rules(&self) -> arc_swap::Guard<Arc<Rules>> {
        self.rules.load()
    }

    /// Reloads the file if its content changed since the last attempt, or
    /// whatever it holds when `force`d (SIGHUP). Returns whether new rules
    /// were swapped in.
    pub fn reload(&self, trigger: &'static str, force: bool) -> bool {
        let path = self.path.display();
        let text = match read(&self.path) {
            Ok(t) => t,
            Err(e) => {
                // A replace by rename can be caught mid-way: report once.
                if lock(&self.seen).take().is_some() || force {
                    self.count(false);
                    error!(%path, trigger, error = %e, "ACL file not reloaded; the previous rules stay");
                }
                return false;
            }
        };
        let digest = digest_of(text.as_bytes());
        if lock(&self.seen).replace(digest) == Some(digest) && !force {
            return false;
        }
        match parse(&text) {
            Ok(rules) => {
                let tokens = rules.len();
                let default = rules.anonymous;
                self.rules.store(Arc::new(rules));
                self.count(true);
                info!(%path, trigger, tokens, ?default, "ACL reloaded");
                true
            }
            Err(message) => {
                self.count(false);
                error!(%path, trigger, error = %message, "ACL file refused; the previous rules stay");
                false
            }
        }
    }

    fn count(&self, ok: bool) {
        self.metrics.acl_reloads.get_or_create(&crate::metrics::ResultLabels::of(ok)).inc();
    }

    /// Reloads on SIGHUP and on change until `stop`.
    pub async fn follow(self: Arc<Self>, stop: CancellationToken) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGHUP; the ACL file reloads on change only");
                None
            }
        };
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                Some(()) = async { hup.as_mut()?.recv().await } => {
                    self.reload("SIGHUP", true);
                }
                _ = tick.tick() => {
                    self.reload("file changed", false);
                }
            }
        }
    }
}

fn read(path: &Path) -> Result<String, AclFileError> {
    std::fs::read_to_string(path)
        .map_err(|error| AclFileError::Read { path: path.display().to_string(), error })
}

fn invalid(path: &Path, message: String) -> AclFileError {
    AclFileError::Invalid { path: path.display().to_string(), message }
}
