//! The immutable state of one service at one index, as readers see it.
//!
//! A snapshot is built once per change and shared by every reader through an
//! `Arc`. Its JSON is rendered at most once per view (healthy or all), on first
//! demand, so a thousand watchers woken by one change cost one serialisation.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::{Serialize, Serializer};
use trellis_shared::{Instance, ServiceName, ServiceSummary, ServiceView};

#[derive(Debug)]
pub struct ServiceSnapshot {
    service: ServiceName,
    index: u64,
    /// Every instance, sorted by id.
    instances: Vec<Arc<Instance>>,
    healthy: usize,
    /// Discovery returns every instance, flagged, because too few are healthy.
    protected: bool,
    json_healthy: OnceLock<Bytes>,
    json_all: OnceLock<Bytes>,
}

impl ServiceSnapshot {
    /// `instances` must be sorted by id.
    pub fn new(service: ServiceName, index: u64, instances: Vec<Arc<Instance>>, protected: bool) -> Self {
        let healthy = instances.iter().filter(|i| i.status.is_healthy()).count();
        ServiceSnapshot {
            service,
            index,
            instances,
            healthy,
            protected,
            json_healthy: OnceLock::new(),
            json_all: OnceLock::new(),
        }
    }

    /// The state of a service never registered (or emptied and forgotten).
    pub fn empty(service: ServiceName) -> Self {
        Self::new(service, 0, Vec::new(), false)
    }

    pub fn service(&self) -> &ServiceName {
        &self.service
    }

    pub fn index(&self) -> u64 {
        self.index
    }

    pub fn instances(&self) -> &[Arc<Instance>] {
        &self.instances
    }

    pub fn healthy(&self) -> usize {
        self.healthy
    }

    pub fn protected(&self) -> bool {
        self.protected
    }

    pub fn summary(&self) -> ServiceSummary {
        ServiceSummary { name: self.service.clone(), instances: self.instances.len(), healthy: self.healthy }
    }

    /// The `ServiceView` JSON: healthy instances only unless `all` (or protected).
    pub fn json(&self, epoch: &str, all: bool) -> Bytes {
        let cell = if all { &self.json_all } else { &self.json_healthy };
        cell.get_or_init(|| {
            let out = ViewOut {
                service: &self.service,
                index: self.index,
                epoch,
                instances: InstancesOut { list: &self.instances, all: all || self.protected },
                protected: self.protected && !all,
            };
            // Serialising plain strings and numbers into a Vec cannot fail.
            Bytes::from(serde_json::to_vec(&out).unwrap_or_default())
        })
        .clone()
    }

    /// The same view as a typed value (tests and in-process callers).
    pub fn view(&self, epoch: &str, all: bool) -> ServiceView {
        let show_all = all || self.protected;
        ServiceView {
            service: self.service.clone(),
            index: self.index,
            epoch: epoch.to_string(),
            instances: self
                .instances
                .iter()
                .filter(|i| show_all || i.status.is_healthy())
                .map(|i| (**i).clone())
                .collect(),
            protected: self.protected && !all,
        }
    }
}

#[derive(Serialize)]
struct ViewOut<'a> {
    service: &'a ServiceName,
    index: u64,
    epoch: &'a str,
    instances: InstancesOut<'a>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    protected: bool,
}

struct InstancesOut<'a> {
    list: &'a [Arc<Instance>],
    all: bool,
}

impl Serialize for InstancesOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.list.iter().filter(|i| self.all || i.status.is_healthy()).map(|i| &**i))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use trellis_shared::{Address, HealthStatus, InstanceId};

    use super::*;

    /// An instance at 10.0.0.1:80, as the store tests build them.
    pub(crate) fn inst(id: &str, status: HealthStatus) -> Arc<Instance> {
        Arc::new(Instance {
            id: InstanceId::new(id).unwrap(),
            address: Address::new("10.0.0.1").unwrap(),
            port: 80,
            zone: None,
            weight: 100,
            metadata: BTreeMap::new(),
            status,
            output: String::new(),
            tags: Vec::new(),
            mesh_tls: false,
        })
    }

    #[test]
    fn json_matches_the_wire_type() {
        let snap = ServiceSnapshot::new(
            ServiceName::new("users").unwrap(),
            7,
            vec![
                inst("a", HealthStatus::Passing),
                inst("b", HealthStatus::Critical),
                inst("c", HealthStatus::Warning),
            ],
            false,
        );
        let healthy: ServiceView = serde_json::from_slice(&snap.json("e1", false)).unwrap();
        assert_eq!(healthy, snap.view("e1", false));
        assert_eq!(healthy.instances.len(), 2);
        assert_eq!(healthy.index, 7);
        assert_eq!(healthy.epoch, "e1");
        let all: ServiceView = serde_json::from_slice(&snap.json("e1", true)).unwrap();
        assert_eq!(all.instances.len(), 3);
        assert_eq!(snap.summary().healthy, 2);
    }

    #[test]
    fn protected_snapshots_show_everything_flagged() {
        let snap = ServiceSnapshot::new(
            ServiceName::new("users").unwrap(),
            1,
            vec![inst("a", HealthStatus::Critical), inst("b", HealthStatus::Passing)],
            true,
        );
        let v: ServiceView = serde_json::from_slice(&snap.json("e", false)).unwrap();
        assert!(v.protected);
        assert_eq!(v.instances.len(), 2);
        assert_eq!(v, snap.view("e", false));
    }
}
