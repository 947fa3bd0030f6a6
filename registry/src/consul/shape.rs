//! Trellis's instances in the shapes Consul's clients decode.
//!
//! Trellis has no nodes: an instance's address stands for its node (`Node`
//! and `Address` both carry it), as a Consul agent's host would. Each instance
//! has one check, the TTL check its sidecar's heartbeats keep (`service:<id>`),
//! whose status is the instance's. `CreateIndex` and `ModifyIndex` are the
//! service's index, the only one Trellis keeps.

use std::collections::BTreeMap;

use serde::Serialize;
use trellis_shared::{Instance, ServiceName};

/// `Service.Weights` / `ServiceWeights`. Trellis balances warning instances
/// at their full weight, so both carry it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Weights {
    pub passing: u32,
    pub warning: u32,
}

/// A node's metadata: the instance's zone, when it has one.
fn node_meta(i: &Instance) -> BTreeMap<&'static str, &str> {
    i.zone.iter().map(|z| ("zone", z.as_str())).collect()
}

fn weights(i: &Instance) -> Weights {
    Weights { passing: i.weight, warning: i.weight }
}

/// One row of `/v1/catalog/service/<name>`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CatalogEntry<'a> {
    #[serde(rename = "ID")]
    pub id: &'static str,
    pub node: &'a str,
    pub address: &'a str,
    pub datacenter: &'a str,
    pub tagged_addresses: BTreeMap<&'static str, &'a str>,
    pub node_meta: BTreeMap<&'static str, &'a str>,
    #[serde(rename = "ServiceID")]
    pub service_id: &'a str,
    pub service_name: &'a str,
    pub service_tags: &'a [String],
    pub service_address: &'a str,
    pub service_port: u16,
    pub service_meta: &'a BTreeMap<String, String>,
    pub service_weights: Weights,
    pub service_enable_tag_override: bool,
    pub create_index: u64,
    pub modify_index: u64,
}

impl<'a> CatalogEntry<'a> {
    pub fn new(service: &'a ServiceName, i: &'a Instance, index: u64, dc: &'a str) -> Self {
        let addr = i.address.as_str();
        CatalogEntry {
            id: "",
            node: addr,
            address: addr,
            datacenter: dc,
            tagged_addresses: BTreeMap::from([("lan", addr), ("wan", addr)]),
            node_meta: node_meta(i),
            service_id: i.id.as_str(),
            service_name: service.as_str(),
            service_tags: &i.tags,
            service_address: addr,
            service_port: i.port,
            service_meta: &i.metadata,
            service_weights: weights(i),
            service_enable_tag_override: false,
            create_index: index,
            modify_index: index,
        }
    }
}

/// One row of `/v1/health/service/<name>`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthEntry<'a> {
    pub node: Node<'a>,
    pub service: Service<'a>,
    pub checks: [Check<'a>; 1],
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Node<'a> {
    #[serde(rename = "ID")]
    pub id: &'static str,
    pub node: &'a str,
    pub address: &'a str,
    pub datacenter: &'a str,
    pub tagged_addresses: BTreeMap<&'static str, &'a str>,
    pub meta: BTreeMap<&'static str, &'a str>,
    pub create_index: u64,
    pub modify_index: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Service<'a> {
    #[serde(rename = "ID")]
    pub id: &'a str,
    pub service: &'a str,
    pub tags: &'a [String],
    pub address: &'a str,
    pub port: u16,
    pub meta: &'a BTreeMap<String, String>,
    pub weights: Weights,
    pub enable_tag_override: bool,
    pub create_index: u64,
    pub modify_index: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Check<'a> {
    pub node: &'a str,
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub name: String,
    pub status: &'static str,
    pub notes: &'static str,
    pub output: &'a str,
    #[serde(rename = "ServiceID")]
    pub service_id: &'a str,
    pub service_name: &'a str,
    pub service_tags: &'a [String],
    pub r#type: &'static str,
    pub create_index: u64,
    pub modify_index: u64,
}

impl<'a> HealthEntry<'a> {
    pub fn new(service: &'a ServiceName, i: &'a Instance, index: u64, dc: &'a str) -> Self {
        let addr = i.address.as_str();
        HealthEntry {
            node: Node {
                id: "",
                node: addr,
                address: addr,
                datacenter: dc,
                tagged_addresses: BTreeMap::from([("lan", addr), ("wan", addr)]),
                meta: node_meta(i),
                create_index: index,
                modify_index: index,
            },
            service: Service {
                id: i.id.as_str(),
                service: service.as_str(),
                tags: &i.tags,
                address: addr,
                port: i.port,
                meta: &i.metadata,
                weights: weights(i),
                enable_tag_override: false,
                create_index: index,
                modify_index: index,
            },
            checks: [Check::new(service, i, index)],
        }
    }
}

impl<'a> Check<'a> {
    /// The instance's one check: the TTL its sidecar's heartbeats keep.
    pub fn new(service: &'a ServiceName, i: &'a Instance, index: u64) -> Self {
        Check {
            node: i.address.as_str(),
            check_id: format!("service:{}", i.id),
            name: format!("Service '{service}' check"),
            status: i.status.as_str(),
            notes: "",
            output: &i.output,
            service_id: i.id.as_str(),
            service_name: service.as_str(),
            service_tags: &i.tags,
            r#type: "ttl",
            create_index: index,
            modify_index: index,
        }
    }
}

/// `/v1/agent/self`: the part Consul's clients read.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AgentSelf<'a> {
    pub config: AgentConfig<'a>,
    pub member: Member<'a>,
    pub meta: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AgentConfig<'a> {
    pub datacenter: &'a str,
    pub primary_datacenter: &'a str,
    pub node_name: &'a str,
    #[serde(rename = "NodeID")]
    pub node_id: &'static str,
    pub server: bool,
    pub revision: &'static str,
    /// The Trellis version, so nobody mistakes this for a Consul agent.
    pub version: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Member<'a> {
    pub name: &'a str,
    pub status: u8,
}

#[cfg(test)]
mod tests {
    use trellis_shared::{Address, HealthStatus, InstanceId, Zone};

    use super::*;

    #[test]
    fn fields_are_consuls() {
        let users = ServiceName::new("users").unwrap();
        let i = Instance {
            id: InstanceId::new("u1").unwrap(),
            address: Address::new("10.0.0.1").unwrap(),
            port: 8080,
            zone: Some(Zone::new("a").unwrap()),
            weight: 50,
            metadata: BTreeMap::from([("metrics_port".to_string(), "15000".to_string())]),
            status: HealthStatus::Warning,
            output: "slow".into(),
            tags: vec!["v2".into()],
            mesh_tls: false,
        };
        let h = serde_json::to_value(HealthEntry::new(&users, &i, 9, "dc1")).unwrap();
        assert_eq!(h["Node"]["Node"], "10.0.0.1");
        assert_eq!(h["Node"]["Datacenter"], "dc1");
        assert_eq!(h["Node"]["Meta"]["zone"], "a");
        assert_eq!(h["Service"]["ID"], "u1");
        assert_eq!(h["Service"]["Service"], "users");
        assert_eq!(h["Service"]["Port"], 8080);
        assert_eq!(h["Service"]["Tags"][0], "v2");
        assert_eq!(h["Service"]["Meta"]["metrics_port"], "15000");
        assert_eq!(h["Service"]["Weights"]["Passing"], 50);
        assert_eq!(h["Checks"][0]["CheckID"], "service:u1");
        assert_eq!(h["Checks"][0]["Status"], "warning");
        assert_eq!(h["Checks"][0]["Output"], "slow");
        assert_eq!(h["Checks"][0]["Type"], "ttl");
        let c = serde_json::to_value(CatalogEntry::new(&users, &i, 9, "dc1")).unwrap();
        for (k, v) in [
            ("Node", "10.0.0.1"),
            ("Address", "10.0.0.1"),
            ("ServiceID", "u1"),
            ("ServiceName", "users"),
            ("ServiceAddress", "10.0.0.1"),
        ] {
            assert_eq!(c[k], v, "{k}");
        }
        assert_eq!(c["ServicePort"], 8080);
        assert_eq!(c["ServiceTags"][0], "v2");
        assert_eq!(c["ServiceMeta"]["metrics_port"], "15000");
        assert_eq!(c["ServiceWeights"]["Warning"], 50);
        assert_eq!(c["ModifyIndex"], 9);
    }
}
