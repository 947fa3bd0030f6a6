//! The sidecar assembled: binds the listeners, starts health checks,
//! registration, discovery, the admin server, the outbound proxy and the
//! inbound side (with `--inbound`), and shuts
//! them down in order (see [`crate::shutdown`]). `main.rs` only parses the
//! command line, sets up logging and the runtime, and calls [`run`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use trellis_shared::{ClientError, RegistryClient};

use crate::admin::{self, Admin, Readiness};
use crate::config::Settings;
use crate::discovery::Directory;
use crate::endpoints::Resolve;
use crate::health::{self, HealthReport};
use crate::identity::renew::Renewer;
use crate::identity::MeshIdentity;
use crate::inbound;
use crate::metrics::Metrics;
use crate::proxy;
use crate::refuse::EndpointFilter;
use crate::registration::Registration;
use crate::shutdown::{self, bounded, DEREGISTER_TIMEOUT};

/// Why the sidecar could not start, or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {flag} {addr}: {source}")]
    Bind { flag: String, addr: SocketAddr, source: std::io::Error },
    #[error("cannot read a bound address: {0}")]
    Listener(std::io::Error),
    #[error("cannot write --ready-file {}: {source}", path.display())]
    ReadyFile { path: PathBuf, source: std::io::Error },
    #[error("cannot build the registry client: {0}")]
    Client(ClientError),
    #[error("the outbound proxy stopped: {0}")]
    ProxyStopped(String),
    #[error("the inbound side stopped: {0}")]
    InboundStopped(String),
}

/// What `--ready-file` reports: the addresses actually bound.
#[derive(serde::Serialize)]
struct BoundAddrs {
    outbound: SocketAddr,
    admin: SocketAddr,
    upstreams: std::collections::BTreeMap<String, SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inbound: Option<SocketAddr>,
}

impl BoundAddrs {
    fn of(
        listeners: &[proxy::Listener],
        admin: &TcpListener,
        inbound: Option<&TcpListener>,
    ) -> std::io::Result<Self> {
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
        let inbound = inbound.map(TcpListener::local_addr).transpose()?;
        Ok(BoundAddrs { outbound, admin: admin.local_addr()?, upstreams, inbound })
    }
}

/// Why a listener's task ended on its own.
fn stopped(r: Result<std::io::Result<()>, tokio::task::JoinError>) -> String {
    match r {
        Ok(Ok(())) => "it stopped unexpectedly".into(),
        Ok(Err(e)) => format!("it failed: {e}"),
        Err(e) => format!("it crashed: {e}"),
    }
}

async fn bind(addr: SocketAddr, flag: &str) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr).await.map_err(|source| RunError::Bind { flag: flag.to_string(), addr, source })
}

/// Runs the sidecar until SIGTERM or SIGINT, then shuts down in order:
/// deregister, drain, finish in-flight requests (a second signal cuts each
/// step short). Returns an error when it cannot start, or when the proxy stops
/// on its own.
pub async fn run(settings: Settings) -> Result<(), RunError> {
    let outbound = bind(settings.outbound, "--outbound").await?;
    let mut listeners = vec![proxy::Listener { listener: outbound, service: None }];
    for (service, addr) in &settings.upstream_ports {
        let listener = bind(*addr, &format!("--upstream {service}=")).await?;
        listeners.push(proxy::Listener { listener, service: Some(service.clone()) });
    }
    let admin_listener = bind(settings.admin, "--admin").await?;
    let inbound_listener = match &settings.inbound {
        Some(inbound) => Some(bind(inbound.listen, "--inbound").await?),
        None => None,
    };
    let bound =
        BoundAddrs::of(&listeners, &admin_listener, inbound_listener.as_ref()).map_err(RunError::Listener)?;
    info!(outbound = %bound.outbound, admin = %bound.admin, inbound = ?bound.inbound, "listeners bound");
    if let Some(path) = &settings.ready_file {
        trellis_shared::ready_file::write(path, &bound)
            .map_err(|source| RunError::ReadyFile { path: path.clone(), source })?;
    }
    let client =
        RegistryClient::new(settings.registry.clone(), settings.client.clone()).map_err(RunError::Client)?;
    let metrics = Arc::new(Metrics::new());

    // Tokens in the order things stop.
    let stop_registration = CancellationToken::new();
    let stop_health = CancellationToken::new();
    let stop_proxy = CancellationToken::new();
    let stop_rest = CancellationToken::new();

    // The mesh identity first: the listeners that need it refuse handshakes
    // until its first certificate, and `/ready` waits for it.
    let identity = settings.identity.as_ref().map(|s| {
        let identity = MeshIdentity::new(s.trust_domain.clone(), s.service.clone());
        let renewer = Renewer::new(client.clone(), identity.clone(), metrics.identity.clone(), s.renew.clone());
        info!(service = %s.service, trust_domain = s.trust_domain.as_str(), "getting a mesh certificate from the registry");
        tokio::spawn(renewer.run(stop_rest.clone()));
        identity
    });

    // The sidecar's own listeners are never endpoints (a registry entry
    // pointing at them would loop the proxy or reach the admin API).
    let mut own = vec![bound.outbound, bound.admin];
    own.extend(bound.upstreams.values().copied());
    own.extend(bound.inbound);
    let directory = Arc::new(
        Directory::new(
            client.clone(),
            settings.discovery.clone(),
            Arc::clone(&metrics) as _,
            stop_rest.clone(),
        )
        .with_filter(EndpointFilter::for_listeners(own).require_mtls(settings.proxy.require_mtls)),
    );
    for service in &settings.upstream_services {
        directory.watch_pinned(service);
    }
    tokio::spawn(Arc::clone(&directory).run_sweeper());

    let mut registration_task = None;
    let mut registered = None;
    if let Some(mut app) = settings.app.clone() {
        // `--inbound` on port 0 without `--advertise`: advertise the port bound.
        if let (0, Some(inbound)) = (app.registration.request.port, bound.inbound) {
            app.registration.request.port = inbound.port();
        }
        info!(
            service = %app.registration.service,
            instance = %app.registration.id,
            advertise = %format!("{}:{}", app.registration.request.address, app.registration.request.port),
            mesh_tls = app.registration.request.mesh_tls,
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

    let readiness = Arc::new(Readiness::new(registered).with_identity(identity.clone()));
    let admin_state = Arc::new(Admin {
        readiness: Arc::clone(&readiness),
        metrics: Arc::clone(&metrics),
        directory: Arc::clone(&directory),
        identity: identity.clone(),
    });
    tokio::spawn(admin::serve(admin_listener, admin_state, stop_rest.clone()));

    let resolver: Arc<dyn Resolve> = directory.clone();
    let mut proxy_task = tokio::spawn(proxy::serve_all_with_identity(
        listeners,
        resolver,
        settings.proxy.clone(),
        Arc::clone(&metrics),
        identity.clone(),
        stop_proxy.clone(),
    ));
    let mut inbound_task = match (inbound_listener, &settings.inbound, &identity) {
        (Some(listener), Some(inbound), Some(identity)) => {
            // `--inbound` implies the identity (config.rs); until its first
            // certificate is installed every handshake fails.
            let identity = identity.clone();
            Some(tokio::spawn(inbound::serve(
                listener,
                identity,
                inbound.config.clone(),
                Arc::clone(&metrics),
                stop_proxy.clone(),
            )))
        }
        _ => None,
    };
    readiness.set_proxy_listening();
    info!(outbound = %bound.outbound, admin = %bound.admin, registry = %client.current_url(), "sidecar started");

    tokio::select! {
        sig = shutdown::signal() => info!(signal = sig, "shutting down: deregistering, then draining"),
        r = &mut proxy_task => {
            stop_rest.cancel();
            return Err(RunError::ProxyStopped(stopped(r)));
        }
        Some(r) = async { Some((&mut inbound_task.as_mut()?).await) } => {
            stop_proxy.cancel();
            stop_rest.cancel();
            return Err(RunError::InboundStopped(stopped(r)));
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
            if let Some(task) = inbound_task.as_mut() {
                match task.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => error!(error = %e, "inbound side ended with an error"),
                    Err(e) => error!(error = %e, "inbound side crashed"),
                }
            }
        },
        &force,
    )
    .await;
    stop_rest.cancel();
    info!(took_ms = started.elapsed().as_millis() as u64, "sidecar stopped");
    Ok(())
}
