//! The operator's command line: `registry services`, `registry show`,
//! `registry watch` and `registry deregister`, run against a live registry
//! over its HTTP API with the shared client (token, TLS, failover across URLs),
//! so there is no second binary to ship.
//!
//! Each command prints an aligned table for people or, with `--json`, the
//! registry's own JSON for scripts. Whatever goes wrong is one line on stderr,
//! `registry <command>: <what>`, and a non-zero exit (see [`error`]).
//!
//! - `cli/args.rs`: where the registry is and how to reach it (URL, token,
//!   TLS, timeout), and the output format.
//! - `cli/table.rs`: aligned columns, and peer-written text made safe to print.
//! - `cli/error.rs`: what went wrong, as one line, and the exit code.
//! - `cli/services.rs`, `cli/show.rs`, `cli/watch.rs`, `cli/deregister.rs`: the commands.

pub mod args;
pub mod deregister;
pub mod error;
pub mod services;
pub mod show;
pub mod table;
pub mod watch;

use std::io::Write;
use std::process::ExitCode;

use clap::Subcommand;

use self::args::Target;
use self::error::CliError;

/// The operator commands, flattened into the registry's own subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List every service with instances: how many, and how many are healthy.
    Services(services::ServicesArgs),
    /// Show every instance of SERVICE, critical ones included.
    Show(show::ShowArgs),
    /// Print SERVICE's instances, then each change as it happens, until interrupted.
    Watch(watch::WatchArgs),
    /// Remove the instance ID of SERVICE now (a live sidecar registers it again at its next heartbeat).
    Deregister(deregister::DeregisterArgs),
}

impl Command {
    /// The name errors are reported under.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Services(_) => "services",
            Command::Show(_) => "show",
            Command::Watch(_) => "watch",
            Command::Deregister(_) => "deregister",
        }
    }

    fn target(&self) -> &Target {
        match self {
            Command::Services(a) => &a.target,
            Command::Show(a) => &a.target,
            Command::Watch(a) => &a.target,
            Command::Deregister(a) => &a.target,
        }
    }

    async fn execute(&self, out: &mut dyn Write, err: &mut dyn Write) -> Result<(), CliError> {
        let client = self.target().client()?;
        match self {
            Command::Services(a) => services::run(a, &client, out).await,
            Command::Show(a) => show::run(a, &client, out).await,
            Command::Watch(a) => watch::run(a, client, out, err).await,
            Command::Deregister(a) => deregister::run(a, &client, out).await,
        }
    }
}

/// Runs `command` to completion on a runtime of its own and reports the outcome.
pub fn run(command: &Command) -> ExitCode {
    let name = command.name();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("registry {name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let result = runtime.block_on(command.execute(&mut out, &mut err));
    let result = result.and_then(|()| out.flush().map_err(CliError::Output));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_closed_output() => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(err, "registry {name}: {}", e.line(&command.target().context()));
            ExitCode::from(e.exit_code())
        }
    }
}
