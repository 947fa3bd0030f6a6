//! `registry services`: every service with instances, how many, how many healthy.

use std::io::Write;

use clap::Args;
use trellis_shared::types::ServiceList;
use trellis_shared::RegistryClient;

use super::args::{Format, Target};
use super::error::CliError;
use super::table::{Align, Table};

#[derive(Debug, Args)]
pub struct ServicesArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub format: Format,
}

pub async fn run(args: &ServicesArgs, client: &RegistryClient, out: &mut dyn Write) -> Result<(), CliError> {
    let list = client.list_services().await?;
    if args.format.json {
        serde_json::to_writer_pretty(&mut *out, &list).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    render(&list, out)?;
    Ok(())
}

/// The table: services sorted by name (as the registry sends them), with
/// those that have no healthy instance marked, since their callers get nothing.
pub fn render(list: &ServiceList, out: &mut dyn Write) -> std::io::Result<()> {
    let mut table = Table::new(&[
        ("SERVICE", Align::Left),
        ("INSTANCES", Align::Right),
        ("HEALTHY", Align::Right),
        ("CRITICAL", Align::Right),
        ("NOTE", Align::Left),
    ]);
    for s in &list.services {
        let note = if s.healthy == 0 { "no healthy instance" } else { "" };
        table.push(vec![
            s.name.to_string(),
            s.instances.to_string(),
            s.healthy.to_string(),
            s.instances.saturating_sub(s.healthy).to_string(),
            note.to_string(),
        ]);
    }
    table.write(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_shared::types::ServiceSummary;
    use trellis_shared::ServiceName;

    #[test]
    fn a_service_without_a_healthy_instance_is_marked() {
        let row = |name: &str, instances, healthy| ServiceSummary {
            name: ServiceName::new(name).unwrap(),
            instances,
            healthy,
        };
        let list =
            ServiceList { services: vec![row("billing", 2, 0), row("users", 12, 11)], epoch: "e".into() };
        let mut out = Vec::new();
        render(&list, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "SERVICE  INSTANCES  HEALTHY  CRITICAL  NOTE\n\
             billing          2        0         2  no healthy instance\n\
             users           12       11         1\n"
        );
    }
}
