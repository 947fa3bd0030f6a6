//! `registry show SERVICE`: every instance of a service, critical ones
//! included, as the registry holds them.

use std::io::Write;

use clap::Args;
use trellis_shared::types::{Instance, ServiceView};
use trellis_shared::{RegistryClient, ServiceName};

use super::args::{Format, Target};
use super::error::CliError;
use super::table::{truncate, Align, Table};

/// Longest health output shown in a table cell; `--json` has all of it.
const OUTPUT_WIDTH: usize = 48;
/// Longest metadata shown in a table cell.
const METADATA_WIDTH: usize = 40;

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The service.
    #[arg(value_name = "SERVICE")]
    pub service: ServiceName,
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub format: Format,
}

pub async fn run(args: &ShowArgs, client: &RegistryClient, out: &mut dyn Write) -> Result<(), CliError> {
    let view = client.get(&args.service, true).await?;
    // A service is known while it has instances, as in `registry services`;
    // the registry answers an empty view for any valid name.
    if view.instances.is_empty() {
        return Err(CliError::UnknownService(args.service.clone()));
    }
    if args.format.json {
        serde_json::to_writer_pretty(&mut *out, &view).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    render(&view, out)?;
    Ok(())
}

pub fn render(view: &ServiceView, out: &mut dyn Write) -> std::io::Result<()> {
    let mut table = Table::new(&[
        ("ID", Align::Left),
        ("ADDRESS", Align::Left),
        ("PORT", Align::Right),
        ("ZONE", Align::Left),
        ("WEIGHT", Align::Right),
        ("STATUS", Align::Left),
        ("TAGS", Align::Left),
        ("METADATA", Align::Left),
        ("OUTPUT", Align::Left),
    ]);
    for i in &view.instances {
        table.push(row(i));
    }
    table.write(out)
}

fn row(i: &Instance) -> Vec<String> {
    let metadata: Vec<String> = i.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
    vec![
        i.id.to_string(),
        i.address.to_string(),
        i.port.to_string(),
        i.zone.as_ref().map(ToString::to_string).unwrap_or_default(),
        i.weight.to_string(),
        i.status.as_str().to_string(),
        i.tags.join(","),
        truncate(&metadata.join(","), METADATA_WIDTH),
        truncate(&i.output, OUTPUT_WIDTH),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use trellis_shared::types::HealthStatus;
    use trellis_shared::{Address, InstanceId, Zone};

    pub(crate) fn instance(id: &str, port: u16, status: HealthStatus) -> Instance {
        Instance {
            id: InstanceId::new(id).unwrap(),
            address: Address::new("10.0.0.5").unwrap(),
            port,
            zone: None,
            weight: 100,
            metadata: BTreeMap::new(),
            status,
            output: String::new(),
            tags: Vec::new(),
            mesh_tls: false,
        }
    }

    #[test]
    fn every_field_has_its_column() {
        let mut a = instance("users-1", 8080, HealthStatus::Passing);
        a.zone = Some(Zone::new("eu-1a").unwrap());
        a.tags = vec!["v2".into(), "canary".into()];
        a.metadata.insert("admin".into(), "10.0.0.5:15000".into());
        let mut b = instance("users-2", 80, HealthStatus::Critical);
        b.output = format!("connection refused {}", "x".repeat(60));
        b.weight = 5;
        let view = ServiceView {
            service: ServiceName::new("users").unwrap(),
            index: 7,
            epoch: "e".into(),
            instances: vec![a, b],
            protected: false,
        };
        let mut out = Vec::new();
        render(&view, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "ID       ADDRESS   PORT  ZONE   WEIGHT  STATUS    TAGS       METADATA              OUTPUT"
        );
        assert_eq!(
            lines[1],
            "users-1  10.0.0.5  8080  eu-1a     100  passing   v2,canary  admin=10.0.0.5:15000"
        );
        assert!(lines[2].starts_with("users-2  10.0.0.5    80  -           5  critical  -          -                     connection refused xxx"), "{}", lines[2]);
        let output: String = lines[2].chars().skip(lines[0].find("OUTPUT").unwrap()).collect();
        assert!(output.ends_with('…') && output.chars().count() == OUTPUT_WIDTH, "{output}");
    }
}
