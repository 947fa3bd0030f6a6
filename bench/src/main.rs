//! `trellis-bench`: the benchmark harness behind BENCHMARKS.md.
//!
//! Modules:
//! - `backend`: the fast HTTP/1.1 backend (also a subcommand of this binary).
//! - `http1`: the minimal response parser the load generators use.
//! - `load`: closed-loop and constant-rate (open-loop) generators with HDR histograms.
//! - `procs`: child processes (pinned with taskset), readiness waits.
//! - `procstat`: CPU time and RSS of a process tree from /proc.
//! - `peers`: the targets (direct, Trellis sidecar, HAProxy, nginx) and their configurations.
//! - `mesh`: the two-hop targets of the mTLS case (client-side and server-side proxy).
//! - `cases`: the benchmark cases, one file each.
//! - `chart`: latency-percentile SVG charts.
//! - `footprint`: resident memory per instance in the registry's memory store.
//! - `report`: BENCHMARKS.md.

mod backend;
mod cases;
mod chart;
mod footprint;
mod http1;
mod load;
mod mesh;
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
        /// How long answers on the first address wait (a slow instance), e.g. `2s`.
        #[arg(long, env = "TRELLIS_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
        delay: std::time::Duration,
        /// Once listening, write `{"listen":["IP:PORT",...]}` here (the bound
        /// addresses, in `--listen` order), so `--listen` may have port 0.
        #[arg(long, env = "TRELLIS_READY_FILE", value_name = "PATH")]
        ready_file: Option<PathBuf>,
    },
    /// Start three backends and one target in front of them, print where it
    /// listens and keep it running until Enter or EOF on stdin (for profiling).
    Serve {
        /// direct, trellis, haproxy or nginx.
        #[arg(long, env = "TRELLIS_TARGET", default_value = "trellis")]
        target: String,
        /// Directory holding `registry` and `sidecar` [default: next to this binary].
        #[arg(long, env = "TRELLIS_BIN_DIR")]
        bin_dir: Option<PathBuf>,
    },
    /// Resident memory per instance in the registry's memory store (100,000
    /// instances in-process); run it alone.
    Footprint {
        /// Give each instance one metadata entry.
        #[arg(long)]
        metadata: bool,
    },
    /// Closed-loop load against an address, printing requests/s and percentiles.
    Load {
        #[arg(long, env = "TRELLIS_ADDR")]
        addr: SocketAddr,
        /// Connections.
        #[arg(long, env = "TRELLIS_CONNECTIONS", default_value_t = 64)]
        connections: usize,
        /// How long, e.g. `10s`.
        #[arg(long, env = "TRELLIS_DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Requests/s for an open loop; closed loop when absent.
        #[arg(long, env = "TRELLIS_RATE")]
        rate: Option<f64>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Backend { listen, name, delay, ready_file } => {
            backend::run(&listen, &name, delay, ready_file.as_deref()).map_err(|e| e.to_string())
        }
        Command::Run(args) => cases::run(args),
        Command::Serve { target, bin_dir } => serve(&target, bin_dir),
        Command::Footprint { metadata } => footprint::run(metadata),
        Command::Load { addr, connections, duration, rate } => {
            let t = load::Target { addrs: vec![addr], host: peers::SERVICE.into(), path: "/".into() };
            let r = match rate {
                Some(rate) => Ok(load::open_loop(&t, rate, connections, std::time::Duration::ZERO, duration)),
                None => load::closed_loop(&t, connections, std::time::Duration::ZERO, duration),
            };
            r.map(|r| {
                println!(
                    "{:.0} req/s, {} failed, p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs",
                    r.rps(),
                    r.failed,
                    r.pct_us(50.0),
                    r.pct_us(99.0),
                    r.pct_us(99.9)
                )
            })
            .map_err(|e| e.to_string())
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn serve(target: &str, bin_dir: Option<PathBuf>) -> Result<(), String> {
    let kind = peers::Kind::ALL
        .into_iter()
        .find(|k| k.name() == target)
        .ok_or_else(|| format!("unknown target {target}"))?;
    let work = std::env::temp_dir().join(format!("trellis-bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let env = peers::Env {
        work,
        bin_dir: bin_dir.unwrap_or_else(default_bin_dir),
        self_exe: std::env::current_exe().map_err(|e| e.to_string())?,
        proxy_core: None,
        load_core: None,
    };
    let backends = peers::start_backends(&env, "serve").map_err(|e| e.to_string())?;
    let t = peers::start(kind, &env, &backends, "serve").map_err(|e| e.to_string())?;
    println!("{} listening on {:?} pid {:?}", kind.name(), t.addrs, t.pid());
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    Ok(())
}

/// Where the workspace's other binaries are: next to this one.
fn default_bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("."))
}
