//! `trellis-bench`: the benchmark harness behind BENCHMARKS.md.
//!
//! Modules:
//! - `backend`: the fast HTTP/1.1 backend (also a subcommand of this binary).
//! - `http1`: the minimal response parser the load generators use.
//! - `load`: closed-loop and constant-rate (open-loop) generators with HDR histograms.
//! - `procs`: child processes (pinned with taskset), readiness waits.
//! - `procstat`: CPU time and RSS of a process tree from /proc.
//! - `peers`: the targets (direct, Trellis sidecar, HAProxy, nginx) and their configurations.
//! - `cases`: the benchmark cases, one file each.
//! - `chart`: latency-percentile SVG charts.
//! - `report`: BENCHMARKS.md.

mod backend;
mod cases;
mod chart;
mod http1;
mod load;
mod peers;
mod procs;
mod procstat;
mod report;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "trellis-bench",
    version,
    about = "Benchmarks Trellis against HAProxy, nginx and etcd on loopback"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run every case and write BENCHMARKS.md.
    Run(cases::RunArgs),
    /// Serve the benchmark backend until killed.
    Backend {
        /// Address to serve on; repeat for several (traffic and health ports).
        #[arg(long, env = "TRELLIS_LISTEN", required = true)]
        listen: Vec<SocketAddr>,
        /// Name put in the `x-backend` header and the body.
        #[arg(long, env = "TRELLIS_NAME", default_value = "backend")]
        name: String,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Backend { listen, name } => backend::run(&listen, &name).map_err(|e| e.to_string()),
        Command::Run(args) => cases::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Where the workspace's other binaries are: next to this one.
fn default_bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("."))
}
