//! The flags of the Consul-compatible API: the names it answers under.

use clap::Args;

/// Names the Consul-compatible API (`/v1/agent/self`, `/v1/catalog/*`,
/// `/v1/health/*`) gives the registry.
#[derive(Debug, Clone, Args)]
pub struct ConsulArgs {
    /// The datacenter this registry answers for: `/v1/agent/self` reports it,
    /// `Datacenter` fields carry it, and a query whose `dc` names another gets
    /// `404 not_found`. Lowercase letters, digits, `-` and `_`.
    #[arg(long, env = "TRELLIS_DATACENTER", default_value = "dc1", value_parser = parse_datacenter)]
    pub datacenter: String,
    /// The node name `/v1/agent/self` reports (`Config.NodeName`). Default:
    /// the host's name.
    #[arg(long, env = "TRELLIS_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
}

impl ConsulArgs {
    /// `--node-name`, or the host's name.
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            let host = gethostname::gethostname().to_string_lossy().into_owned();
            if host.is_empty() {
                "trellis".into()
            } else {
                host
            }
        })
    }
}

/// Consul's datacenter names: 1 to 64 of `[a-z0-9_-]`.
fn parse_datacenter(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a datacenter name: 1 to 64 of lowercase letters, digits, '-' and '_'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datacenter_names_are_checked() {
        assert_eq!(parse_datacenter("eu-west_1").unwrap(), "eu-west_1");
        for bad in ["", "DC1", "dc 1", "dc/1", &"a".repeat(65)] {
            assert!(parse_datacenter(bad).is_err(), "{bad}");
        }
    }
}
