//! The `sidecar` binary: parses the command line, sets up logging and the
//! runtime, and runs [`trellis_sidecar::run`] (or the `probe` subcommand).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tracing::error;
use tracing_subscriber::EnvFilter;

use trellis_sidecar::config::{Cli, Command, ProbeArgs};

/// glibc's malloc was about 5 % of the proxy's time in perf profiles (docs/bench.md);
/// mimalloc's thread-local free lists make the per-request allocations cheap.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Probe(args)) = cli.command {
        return probe(args);
    }
    let settings = match cli.run.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sidecar: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(v),
        _ => EnvFilter::try_new(&settings.log_level),
    };
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!("sidecar: configuration error: bad log filter: {e}");
            return ExitCode::from(2);
        }
    };
    // Colours only for a terminal: log files and container logs stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).init();

    // One worker: a current-thread runtime. Everything then runs on the main
    // thread, with no work-stealing queues and no cross-thread wake-ups
    // between the client's connection task and the pooled upstream one.
    let mut builder = if settings.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(settings.workers);
        b
    };
    let runtime = match builder.thread_name("sidecar").enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(trellis_sidecar::run(settings));
    // Whatever is still running (an abandoned registry call) must not hold the exit up.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "sidecar failed");
            eprintln!("sidecar: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `sidecar probe`: 0 when the local admin `/ready` answers 200.
fn probe(args: ProbeArgs) -> ExitCode {
    let ip = match args.admin.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let url = format!("http://{}/ready", SocketAddr::new(ip, args.admin.port()));
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sidecar probe: {e}");
            return ExitCode::FAILURE;
        }
    };
    let answer = runtime.block_on(async {
        let client = reqwest::Client::builder().timeout(args.timeout).no_proxy().build()?;
        client.get(&url).send().await.map(|r| r.status())
    });
    match answer {
        Ok(s) if s == reqwest::StatusCode::OK => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("sidecar probe: {url} answered {s}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("sidecar probe: {url}: {e}");
            ExitCode::FAILURE
        }
    }
}
