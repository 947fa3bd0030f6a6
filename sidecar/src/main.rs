//! The `sidecar` binary: parses the CLI, binds the listeners, starts health
//! checks, registration, discovery, the admin server and the outbound proxy,
//! and shuts them down in order (see `shutdown.rs`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;
use trellis_shared::RegistryClient;

use trellis_sidecar::admin::{self, Admin, Readiness};
use trellis_sidecar::config::{Cli, Command, ProbeArgs, Settings};
use trellis_sidecar::discovery::Directory;
use trellis_sidecar::endpoints::Resolve;
use trellis_sidecar::health::{self, HealthReport};
use trellis_sidecar::metrics::Metrics;
use trellis_sidecar::proxy::{self, ProxyConfig};
use trellis_sidecar::registration::Registration;
use trellis_sidecar::shutdown::{self, bounded, DEREGISTER_TIMEOUT};

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
    let proxy_config = cli.run.proxy.proxy_config();
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
    let result = runtime.block_on(run(settings, proxy_config));
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

/// What `--ready-file` reports: the addresses actually bound.
#[derive(serde::Serialize)]
struct BoundAddrs {
    outbound: SocketAddr,
    admin: SocketAddr,
    upstreams: std::collections::BTreeMap<String, SocketAddr>,
}

impl BoundAddrs {
    fn of(listeners: &[proxy::Listener], admin: &TcpListener) -> std::io::Result<Self> {
        let mut outbound = None;
        let mut upstreams = std::collections::BTreeMap::new();
        for l in listeners {
            let addr = l.listener.local_addr()?;
            match &l.service {
                Some(s) => {
                    upstreams.insert(s.to_string(), addr);
                }
                None => outbound = Some(addr),
            }
        }
        let outbound = outbound.ok_or_else(|| std::io::Error::other("no outbound listener"))?;
        Ok(BoundAddrs { outbound, admin: admin.local_addr()?, upstreams })
    }
}

async fn bind(addr: SocketAddr, flag: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {flag} {addr}: {e}"))
}

async fn run(settings: Settings, proxy_config: ProxyConfig) -> Result<(), String> {
    let outbound = bind(settings.outbound, "--outbound").await?;
    let mut listeners = vec![proxy::Listener { listener: outbound, service: None }];
    for (service, addr) in &settings.upstream_ports {
        let listener = bind(*addr, &format!("--upstream {service}=")).await?;
        listeners.push(proxy::Listener { listener, service: Some(service.clone()) });
    }
    let admin_listener = bind(settings.admin, "--admin").await?;
    let bound = BoundAddrs::of(&listeners, &admin_listener)
        .map_err(|e| format!("cannot read a bound address: {e}"))?;
    info!(outbound = %bound.outbound, admin = %bound.admin, "listeners bound");
    if let Some(path) = &settings.ready_file {
        trellis_shared::ready_file::write(path, &bound)
            .map_err(|e| format!("cannot write --ready-file {}: {e}", path.display()))?;
    }
    let client =
        RegistryClient::new(settings.registry.clone(), settings.client.clone()).map_err(|e| e.to_string())?;
    let metrics = Arc::new(Metrics::new());

    // Tokens in the order things stop.
    let stop_registration = CancellationToken::new();
    let stop_health = CancellationToken::new();
    let stop_proxy = CancellationToken::new();
    let stop_rest = CancellationToken::new();

    let directory = Arc::new(Directory::new(
        client.clone(),
        settings.discovery.clone(),
        Arc::clone(&metrics) as _,
        stop_rest.clone(),
    ));
    for service in &settings.upstream_services {
        directory.watch_pinned(service);
    }
    tokio::spawn(Arc::clone(&directory).run_sweeper());

    let mut registration_task = None;
    let mut registered = None;
    if let Some(app) = settings.app.clone() {
        info!(
            service = %app.registration.service,
            instance = %app.registration.id,
            advertise = %format!("{}:{}", app.registration.request.address, app.registration.request.port),
            app = %app.health.target,
            "registering the local app once healthy"
        );
        let (health_tx, health_rx) = watch::channel(HealthReport::default());
        tokio::spawn(health::run(app.health, health_tx, stop_health.clone()));
        let (registered_tx, registered_rx) = watch::channel(false);
        let registration = Registration::new(
            client.clone(),
            app.registration,
            health_rx,
            registered_tx,
            Arc::clone(&metrics) as _,
        );
        registration_task = Some(tokio::spawn(registration.run(stop_registration.clone())));
        registered = Some(registered_rx);
    }

    let readiness = Arc::new(Readiness::new(registered));
    let admin_state = Arc::new(Admin {
        readiness: Arc::clone(&readiness),
        metrics: Arc::clone(&metrics),
        directory: Arc::clone(&directory),
    });
    tokio::spawn(admin::serve(admin_listener, admin_state, stop_rest.clone()));

    let resolver: Arc<dyn Resolve> = directory.clone();
    let mut proxy_task = tokio::spawn(proxy::serve_all(
        listeners,
        resolver,
        proxy_config,
        Arc::clone(&metrics),
        stop_proxy.clone(),
    ));
    readiness.set_proxy_listening();
    info!(outbound = %bound.outbound, admin = %bound.admin, registry = %client.current_url(), "sidecar started");

    tokio::select! {
        sig = shutdown::signal() => info!(signal = sig, "shutting down: deregistering, then draining"),
        r = &mut proxy_task => {
            stop_rest.cancel();
            return match r {
                Ok(Ok(())) => Err("the outbound proxy stopped unexpectedly".into()),
                Ok(Err(e)) => Err(format!("the outbound proxy failed: {e}")),
                Err(e) => Err(format!("the outbound proxy crashed: {e}")),
            };
        }
    }
    let started = tokio::time::Instant::now();
    let force = CancellationToken::new();
    {
        let force = force.clone();
        tokio::spawn(async move {
            shutdown::signal().await;
            force.cancel();
        });
    }
    readiness.set_shutting_down();

    // 1. Deregister, so peers stop choosing this instance.
    if let Some(task) = registration_task {
        stop_registration.cancel();
        bounded(
            "deregister",
            DEREGISTER_TIMEOUT,
            async {
                let _ = task.await;
            },
            &force,
        )
        .await;
    }
    stop_health.cancel();

    // 2. Keep proxying while peers' watches catch up and the app winds down.
    let drain = settings.shutdown.drain;
    bounded("drain", drain + Duration::from_millis(100), tokio::time::sleep(drain), &force).await;

    // 3. Stop accepting; let in-flight requests finish within the grace.
    stop_proxy.cancel();
    bounded(
        "finish in-flight requests",
        settings.shutdown.grace,
        async {
            match (&mut proxy_task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(error = %e, "outbound proxy ended with an error"),
                Err(e) => error!(error = %e, "outbound proxy crashed"),
            }
        },
        &force,
    )
    .await;
    stop_rest.cancel();
    info!(took_ms = started.elapsed().as_millis() as u64, "sidecar stopped");
    Ok(())
}
