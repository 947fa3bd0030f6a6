//! Registry wire types: what providers send and what consumers read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::duration::WireDuration;
use crate::names::{Address, InstanceId, ServiceName, Zone};

/// Smallest and largest instance weight; the default is [`DEFAULT_WEIGHT`].
pub const WEIGHT_RANGE: std::ops::RangeInclusive<u32> = 1..=10_000;
/// Weight of an instance that does not say.
pub const DEFAULT_WEIGHT: u32 = 100;
/// Most metadata entries one instance may carry.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Longest metadata key, in bytes.
pub const MAX_METADATA_KEY_LEN: usize = 128;
/// Most bytes of metadata keys and values together.
pub const MAX_METADATA_BYTES: usize = 4096;
/// Longest health output text, in bytes.
pub const MAX_OUTPUT_LEN: usize = 4096;
/// Most tags one instance may carry.
pub const MAX_TAGS: usize = 32;
/// Longest tag, in bytes.
pub const MAX_TAG_LEN: usize = 64;

/// Health of an instance as its sidecar reports it (Consul's three states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Healthy.
    #[default]
    Passing,
    /// Degraded but still served to consumers.
    Warning,
    /// Unhealthy: hidden from discovery until it reports passing or warning again.
    Critical,
}

impl HealthStatus {
    /// Whether discovery shows an instance in this state.
    pub fn is_healthy(self) -> bool {
        !matches!(self, HealthStatus::Critical)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Passing => "passing",
            HealthStatus::Warning => "warning",
            HealthStatus::Critical => "critical",
        }
    }
}

/// Body of `PUT /v1/services/{service}/instances/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub address: Address,
    pub port: u16,
    /// Lease length; the registry's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<WireDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<Zone>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Initial health; `passing` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<HealthStatus>,
    /// Short labels (Consul's tags), checked by [`validate_tags`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The advertised port is a sidecar's inbound side, which speaks only
    /// mutual TLS with the mesh's certificates.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mesh_tls: bool,
}

impl RegisterRequest {
    pub fn new(address: Address, port: u16) -> Self {
        RegisterRequest {
            address,
            port,
            ttl: None,
            zone: None,
            weight: None,
            metadata: BTreeMap::new(),
            status: None,
            tags: Vec::new(),
            mesh_tls: false,
        }
    }

    /// Checks the bounds serde cannot express. TTL bounds are the registry's
    /// configuration and are checked there.
    pub fn validate(&self) -> Result<(), String> {
        if self.port == 0 {
            return Err("port must be between 1 and 65535".into());
        }
        if let Some(w) = self.weight {
            if !WEIGHT_RANGE.contains(&w) {
                return Err(format!(
                    "weight must be between {} and {}, got {w}",
                    WEIGHT_RANGE.start(),
                    WEIGHT_RANGE.end()
                ));
            }
        }
        validate_metadata(&self.metadata)?;
        validate_tags(&self.tags)
    }
}

/// Checks tags: at most [`MAX_TAGS`], each 1 to [`MAX_TAG_LEN`] bytes of
/// printable ASCII without spaces or commas (so a tag list can be written
/// comma-separated on a command line), and no duplicates.
pub fn validate_tags(tags: &[String]) -> Result<(), String> {
    if tags.len() > MAX_TAGS {
        return Err(format!("{} tags, at most {MAX_TAGS} are allowed", tags.len()));
    }
    for (i, tag) in tags.iter().enumerate() {
        if tag.is_empty() || tag.len() > MAX_TAG_LEN {
            return Err(format!("tags must be 1 to {MAX_TAG_LEN} bytes"));
        }
        if !tag.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
            return Err(format!("tag {tag:?} may hold only printable ASCII without spaces or commas"));
        }
        if tags[..i].contains(tag) {
            return Err(format!("tag {tag:?} appears twice"));
        }
    }
    Ok(())
}

/// Checks metadata against the documented bounds.
pub fn validate_metadata(metadata: &BTreeMap<String, String>) -> Result<(), String> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(format!(
            "metadata has {} entries, at most {MAX_METADATA_ENTRIES} are allowed",
            metadata.len()
        ));
    }
    let mut total = 0;
    for (k, v) in metadata {
        if k.is_empty() || k.len() > MAX_METADATA_KEY_LEN {
            return Err(format!("metadata keys must be 1 to {MAX_METADATA_KEY_LEN} bytes"));
        }
        total += k.len() + v.len();
    }
    if total > MAX_METADATA_BYTES {
        return Err(format!("metadata is {total} bytes, at most {MAX_METADATA_BYTES} are allowed"));
    }
    Ok(())
}

/// Body of `PUT /v1/services/{service}/instances/{id}/heartbeat` (optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<HealthStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

impl HeartbeatRequest {
    pub fn validate(&self) -> Result<(), String> {
        match &self.output {
            Some(o) if o.len() > MAX_OUTPUT_LEN => {
                Err(format!("output is {} bytes, at most {MAX_OUTPUT_LEN} are allowed", o.len()))
            }
            _ => Ok(()),
        }
    }
}

/// One instance as discovery shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: InstanceId,
    pub address: Address,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<Zone>,
    pub weight: u32,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub status: HealthStatus,
    #[serde(default)]
    pub output: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Reached only over mutual TLS, as the service's identity (see `RegisterRequest::mesh_tls`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mesh_tls: bool,
}

impl Instance {
    /// Whether two versions of an instance differ in anything that moves the
    /// service's index (everything but the output text).
    pub fn same_membership(&self, other: &Instance) -> bool {
        self.id == other.id
            && self.address == other.address
            && self.port == other.port
            && self.zone == other.zone
            && self.weight == other.weight
            && self.metadata == other.metadata
            && self.status == other.status
            && self.tags == other.tags
            && self.mesh_tls == other.mesh_tls
    }
}

/// Answer to a registration: the stored record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub service: ServiceName,
    #[serde(flatten)]
    pub instance: Instance,
    pub ttl: WireDuration,
}

/// `GET /v1/services/{service}`: the state of one service at an index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    pub service: ServiceName,
    /// Moves whenever membership or health of this service changes; 0 for a
    /// service never registered.
    pub index: u64,
    /// Identity of the store's history; a new epoch means the registry restarted.
    pub epoch: String,
    pub instances: Vec<Instance>,
    /// Set when a protection threshold made discovery return every instance.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub protected: bool,
}

/// One row of `GET /v1/services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSummary {
    pub name: ServiceName,
    pub instances: usize,
    pub healthy: usize,
}

/// `GET /v1/services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceList {
    pub services: Vec<ServiceSummary>,
    pub epoch: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_request_parses_the_documented_example() {
        let r: RegisterRequest = serde_json::from_str(
            r#"{"address":"10.0.0.5","port":8080,"ttl":"5s","zone":"a","weight":100,"metadata":{"k":"v"},"status":"passing"}"#,
        )
        .unwrap();
        assert_eq!(r.port, 8080);
        assert_eq!(r.ttl.unwrap().0, std::time::Duration::from_secs(5));
        assert!(r.validate().is_ok());
    }

    #[test]
    fn register_request_bounds() {
        let base = RegisterRequest::new(Address::new("a").unwrap(), 1);
        let mut r = base.clone();
        r.port = 0;
        assert!(r.validate().is_err());
        let mut r = base.clone();
        r.weight = Some(0);
        assert!(r.validate().is_err());
        let mut r = base.clone();
        r.metadata.insert("k".into(), "v".repeat(5000));
        assert!(r.validate().is_err());
        assert!(serde_json::from_str::<RegisterRequest>(r#"{"address":"a","port":70000}"#).is_err());
        assert!(serde_json::from_str::<RegisterRequest>(r#"{"address":"a","port":1,"bogus":1}"#).is_err());
        assert!(serde_json::from_str::<RegisterRequest>(r#"{"port":1}"#).is_err());
        let mut r = base.clone();
        r.tags = vec!["v1".into(), "primary".into()];
        assert!(r.validate().is_ok());
        for bad in
            [vec!["".to_string()], vec!["a b".into()], vec!["a,b".into()], vec!["x".into(), "x".into()]]
        {
            r.tags = bad;
            assert!(r.validate().is_err(), "{:?}", r.tags);
        }
        r.tags = (0..=MAX_TAGS).map(|i| format!("t{i}")).collect();
        assert!(r.validate().is_err());
    }

    #[test]
    fn membership_ignores_output() {
        let a = Instance {
            id: InstanceId::new("a").unwrap(),
            address: Address::new("1.2.3.4").unwrap(),
            port: 1,
            zone: None,
            weight: DEFAULT_WEIGHT,
            metadata: BTreeMap::new(),
            status: HealthStatus::Passing,
            output: String::new(),
            tags: Vec::new(),
            mesh_tls: false,
        };
        let mut b = a.clone();
        b.output = "ok".into();
        assert!(a.same_membership(&b));
        b.status = HealthStatus::Warning;
        assert!(!a.same_membership(&b));
    }
}
