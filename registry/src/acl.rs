//! Access control: which token may register, heartbeat, deregister and
//! discover which services (`--acl-file`, `docs/security.md`).
//!
//! - [`config`]: the `--acl-file` flag.
//! - [`file`]: the TOML file, parsed and checked strictly into [`Rules`].
//! - [`rules`]: the compiled rules: patterns, tokens found by their secret's digest.
//! - [`decision`]: what a request needs ([`Need`]) and whether its token has it.
//! - [`reload`]: [`Acl`], the live rules behind an `ArcSwap`, reloaded on
//!   SIGHUP and when the file changes.
//! - [`failures`]: failed checks counted per client, warnings rate-limited.

pub mod config;
pub mod decision;
pub mod failures;
pub mod file;
pub mod reload;
pub mod rules;

pub use self::config::AclArgs;
pub use self::decision::{Grant, Need, Refusal};
pub use self::file::AclFileError;
pub use self::reload::Acl;
pub use self::rules::{Anonymous, Pattern, Rules, Token};
