//! Resident memory per instance in the registry's memory store: 100 services of
//! 1,000 instances each, every service's discovery answer rendered once (as a
//! sidecar's first read would). In-process, so the figure is the store's alone,
//! without connections or buffers.

use std::collections::BTreeMap;
use std::time::Duration;

use trellis_registry::metrics::StoreMetrics;
use trellis_registry::store::{LeasedInstance, MemoryStore, Store};
use trellis_shared::{Address, HealthStatus, Instance, InstanceId, ServiceName, Zone};

const SERVICES: usize = 100;
const PER_SERVICE: usize = 1_000;

fn rss_bytes() -> Result<usize, String> {
    let statm = std::fs::read_to_string("/proc/self/statm").map_err(|e| format!("/proc/self/statm: {e}"))?;
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("cannot read the resident pages from {statm:?}"))?;
    Ok(pages * 4096)
}

/// Registers the instances, each with one metadata entry when `metadata`, and
/// prints the growth of resident memory per instance.
pub fn run(metadata: bool) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    runtime.block_on(fill(metadata))
}

async fn fill(metadata: bool) -> Result<(), String> {
    let store = MemoryStore::new(StoreMetrics::default());
    let before = rss_bytes()?;
    let mut extra = BTreeMap::new();
    if metadata {
        extra.insert("version".to_string(), "1.4.2".to_string());
    }
    let bad = |e: trellis_shared::NameError| e.to_string();
    let zone = Zone::new("eu-west-1a").map_err(bad)?;
    for s in 0..SERVICES {
        let service = ServiceName::new(format!("service-{s}")).map_err(bad)?;
        for i in 0..PER_SERVICE {
            let instance = Instance {
                id: InstanceId::new(format!("service-{s}-{i}")).map_err(bad)?,
                address: Address::new(format!("10.{}.{}.{}", s, i / 250, i % 250)).map_err(bad)?,
                port: 8080,
                zone: Some(zone.clone()),
                weight: 100,
                metadata: extra.clone(),
                status: HealthStatus::Passing,
                output: String::new(),
                tags: Vec::new(),
                mesh_tls: false,
            };
            let registration = LeasedInstance { instance, ttl: Duration::from_secs(30) };
            store.register(&service, registration).await.map_err(|e| e.to_string())?;
        }
        store.snapshot(&service).json(store.epoch(), false);
    }
    let instances = SERVICES * PER_SERVICE;
    let per = rss_bytes()?.saturating_sub(before) / instances;
    let with = if metadata { "with one metadata entry" } else { "without metadata" };
    println!("resident memory: {per} bytes per instance {with} ({instances} instances)");
    Ok(())
}
