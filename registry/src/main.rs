//! The `registry` binary: parse the CLI, set up logging, run until a signal.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use trellis_registry::config::{Cli, Command};
use trellis_registry::probe::{local_addr_for, probe};
use trellis_registry::store::etcd::setup as etcd_setup;

/// glibc's malloc was about 5 % of the proxy's time in perf profiles (docs/bench.md);
/// mimalloc's thread-local free lists make the per-request allocations cheap.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Init(args)) = &cli.command {
        return match trellis_registry::init::init(args) {
            Ok(written) => {
                print!("{}", trellis_registry::init::summary(&written));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("registry init: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Operator(command)) = &cli.command {
        return trellis_registry::cli::run(command);
    }
    let mut builder = match cli.config.workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                b.worker_threads(n);
            }
            b
        }
    };
    let runtime = match builder.thread_name("registry").enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("registry: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Probe { addr, timeout }) = cli.command {
        let addr = addr.unwrap_or_else(|| local_addr_for(cli.config.listen));
        return match runtime.block_on(probe(addr, timeout, &cli.config.tls)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("registry probe: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::EtcdSetup(args)) = &cli.command {
        return match runtime.block_on(etcd_setup::run(args)) {
            Ok(outcome) => {
                let prefix = args.prefix.clone().unwrap_or_else(|| match &args.store {
                    trellis_registry::store::StoreSpec::Etcd { prefix, .. } => prefix.clone(),
                    trellis_registry::store::StoreSpec::Memory => String::new(),
                });
                let done = match outcome {
                    etcd_setup::Outcome::Enabled => "authentication enabled",
                    etcd_setup::Outcome::AlreadyEnabled => "authentication was already enabled",
                };
                println!("registry etcd-setup: {done}; user {:?} may read and write {prefix}/", args.user);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("registry etcd-setup: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cli.config.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi).init();
    if let Err(e) = cli.config.validate() {
        eprintln!("registry: {e}");
        return ExitCode::from(2);
    }
    runtime.block_on(async {
        let listener = match tokio::net::TcpListener::bind(cli.config.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("registry: cannot listen on {}: {e}", cli.config.listen);
                return ExitCode::FAILURE;
            }
        };
        match trellis_registry::run(listener, cli.config, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("registry: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received");
}
