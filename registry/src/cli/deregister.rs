//! `registry deregister SERVICE ID`: removes one instance now.
//!
//! Discovery stops returning it at once and watchers are woken. A sidecar that
//! is still running registers its app again at its next heartbeat (it takes
//! the registry's `unknown_instance` for a forgotten lease), so this is for
//! instances whose sidecar is gone, or to take one out while its sidecar is stopped.

use std::io::Write;

use clap::Args;
use serde::Serialize;
use trellis_shared::{InstanceId, RegistryClient, ServiceName};

use super::args::{Format, Target};
use super::error::CliError;

#[derive(Debug, Args)]
pub struct DeregisterArgs {
    /// The service.
    #[arg(value_name = "SERVICE")]
    pub service: ServiceName,
    /// The instance's id (the ID column of `registry show`).
    #[arg(value_name = "ID")]
    pub id: InstanceId,
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub format: Format,
}

/// What `--json` prints on success.
#[derive(Serialize)]
struct Deregistered<'a> {
    service: &'a ServiceName,
    id: &'a InstanceId,
    deregistered: bool,
}

pub async fn run(
    args: &DeregisterArgs,
    client: &RegistryClient,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    match client.deregister(&args.service, &args.id).await {
        Ok(()) => {}
        Err(e) if e.is_unknown_instance() => {
            return Err(CliError::UnknownInstance { service: args.service.clone(), id: args.id.clone() })
        }
        Err(e) => return Err(e.into()),
    }
    if args.format.json {
        let done = Deregistered { service: &args.service, id: &args.id, deregistered: true };
        serde_json::to_writer(&mut *out, &done).map_err(std::io::Error::from)?;
        writeln!(out)?;
    } else {
        writeln!(out, "deregistered {}/{}", args.service, args.id)?;
    }
    Ok(())
}
