//! The access-control flags.

use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Clone, Default, Args)]
pub struct AclArgs {
    /// Tokens and what each may do (TOML; see docs/security.md). Reloaded on
    /// SIGHUP and within a second of a change; an invalid file is refused and
    /// the previous rules stay. Without it every request is allowed.
    #[arg(long, env = "TRELLIS_ACL_FILE", value_name = "PATH")]
    pub acl_file: Option<PathBuf>,
}
