//! `registry watch SERVICE`: the service's instances, then each change as it
//! happens, one line per instance, until interrupted.
//!
//! It follows the service with the shared client's [`Watch`] (blocking
//! queries with every instance, critical ones included), so a change shows
//! within the registry's answer to the held query, not on a poll. Each new
//! view is compared with the last one shown: an instance is `added`,
//! `removed` or `changed` (which fields, from what to what). After a failed
//! round the watch resumes from the last index and epoch it printed; a
//! registry that restarted (a new epoch) is reported, then its view is
//! compared like any other, so nothing is missed or printed twice.
//!
//! Failures the next round may not have (the registry unreachable, a 5xx, a
//! 429) are reported once on stderr and retried with backoff; a refusal (401,
//! 403, any other 4xx) or a certificate that does not verify ends the command.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::SystemTime;

use clap::Args;
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::json;
use trellis_shared::types::{Instance, ServiceView};
use trellis_shared::{ClientError, RegistryClient, ServiceName, Watch};

use super::args::{Format, Target};
use super::error::{describe, CliError};
use super::table::{clean, write_row, Align};

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The service; it need not have instances yet.
    #[arg(value_name = "SERVICE")]
    pub service: ServiceName,
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub format: Format,
}

/// What happened to one instance between two views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<'a> {
    /// In the first view printed.
    Present(&'a Instance),
    Added(&'a Instance),
    Removed(&'a Instance),
    Changed {
        before: &'a Instance,
        after: &'a Instance,
    },
}

impl<'a> Change<'a> {
    pub fn event(&self) -> &'static str {
        match self {
            Change::Present(_) => "present",
            Change::Added(_) => "added",
            Change::Removed(_) => "removed",
            Change::Changed { .. } => "changed",
        }
    }

    /// The instance as it is now (as it was, for a removal).
    pub fn instance(&self) -> &'a Instance {
        match self {
            Change::Present(i) | Change::Added(i) | Change::Removed(i) => i,
            Change::Changed { after, .. } => after,
        }
    }
}

/// The changes from `before` (none: the first view) to `after`, by instance id.
pub fn diff<'a>(before: Option<&'a [Instance]>, after: &'a [Instance]) -> Vec<Change<'a>> {
    let Some(before) = before else { return after.iter().map(Change::Present).collect() };
    let old: BTreeMap<_, _> = before.iter().map(|i| (&i.id, i)).collect();
    let new: BTreeMap<_, _> = after.iter().map(|i| (&i.id, i)).collect();
    let mut ids: Vec<_> = old.keys().chain(new.keys()).copied().collect();
    ids.sort();
    ids.dedup();
    ids.into_iter()
        .filter_map(|id| match (old.get(id), new.get(id)) {
            (None, Some(a)) => Some(Change::Added(a)),
            (Some(b), None) => Some(Change::Removed(b)),
            (Some(b), Some(a)) if !b.same_membership(a) => Some(Change::Changed { before: b, after: a }),
            _ => None,
        })
        .collect()
}

/// The fields that differ, each with its old and new value.
pub fn changed_fields(before: &Instance, after: &Instance) -> Vec<(&'static str, String, String)> {
    let zone = |i: &Instance| i.zone.as_ref().map(ToString::to_string).unwrap_or_else(|| "-".into());
    let tags = |i: &Instance| if i.tags.is_empty() { "-".into() } else { i.tags.join(",") };
    let metadata = |i: &Instance| {
        let pairs: Vec<String> = i.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if pairs.is_empty() {
            "-".into()
        } else {
            pairs.join(",")
        }
    };
    let mut out = Vec::new();
    let mut field = |name, b: String, a: String| {
        if b != a {
            out.push((name, b, a));
        }
    };
    field("status", before.status.as_str().into(), after.status.as_str().into());
    field("address", before.address.to_string(), after.address.to_string());
    field("port", before.port.to_string(), after.port.to_string());
    field("zone", zone(before), zone(after));
    field("weight", before.weight.to_string(), after.weight.to_string());
    field("tags", tags(before), tags(after));
    field("metadata", metadata(before), metadata(after));
    field("mesh_tls", before.mesh_tls.to_string(), after.mesh_tls.to_string());
    out
}

/// The columns of the human output, with the widths they start at (a longer
/// value widens its own line only: the lines are printed as they come).
const COLUMNS: [(&str, usize, Align); 10] = [
    ("TIME", 20, Align::Left),
    ("INDEX", 5, Align::Right),
    ("EVENT", 7, Align::Left),
    ("ID", 12, Align::Left),
    ("ADDRESS", 15, Align::Left),
    ("PORT", 5, Align::Right),
    ("ZONE", 6, Align::Left),
    ("WEIGHT", 6, Align::Right),
    ("STATUS", 8, Align::Left),
    ("DETAIL", 0, Align::Left),
];

/// Prints views as they come: a header, then lines of changes.
pub struct Printer {
    json: bool,
    last: Option<ServiceView>,
}

impl Printer {
    pub fn new(json: bool) -> Printer {
        Printer { json, last: None }
    }

    /// Prints what changed since the last view (everything, for the first).
    pub fn view(&mut self, view: ServiceView, now: SystemTime, out: &mut dyn Write) -> std::io::Result<()> {
        let time = humantime::format_rfc3339_seconds(now).to_string();
        let restarted =
            self.last.as_ref().filter(|last| last.epoch != view.epoch).map(|last| last.epoch.clone());
        let changes = diff(self.last.as_ref().map(|l| l.instances.as_slice()), &view.instances);
        if self.json {
            json_line(&time, &view, restarted.is_some(), &changes, out)?;
        } else {
            if self.last.is_none() {
                self.row(out, COLUMNS.iter().map(|(h, _, _)| h.to_string()).collect())?;
            }
            let mut note = |event: &str, detail: String| {
                let mut cells = vec![time.clone(), view.index.to_string(), event.into()];
                cells.extend(std::iter::repeat_n("-".to_string(), 6));
                cells.push(detail);
                self.row(out, cells)
            };
            if let Some(old) = &restarted {
                note("restart", format!("the registry restarted (epoch {old} -> {})", view.epoch))?;
            }
            if changes.is_empty() && view.instances.is_empty() && self.last.is_none() {
                note("empty", "no instance registered yet".into())?;
            }
            for change in &changes {
                let i = change.instance();
                let detail = match change {
                    Change::Changed { before, after } => changed_fields(before, after)
                        .iter()
                        .map(|(name, b, a)| format!("{name} {b} -> {a}"))
                        .collect::<Vec<_>>()
                        .join("; "),
                    _ => String::new(),
                };
                self.row(
                    out,
                    vec![
                        time.clone(),
                        view.index.to_string(),
                        change.event().into(),
                        i.id.to_string(),
                        i.address.to_string(),
                        i.port.to_string(),
                        i.zone.as_ref().map(ToString::to_string).unwrap_or_else(|| "-".into()),
                        i.weight.to_string(),
                        i.status.as_str().into(),
                        detail,
                    ],
                )?;
            }
        }
        self.last = Some(view);
        out.flush()
    }

    fn row(&self, out: &mut dyn Write, cells: Vec<String>) -> std::io::Result<()> {
        let cells: Vec<String> = cells.iter().map(|c| clean(c)).collect();
        let widths: Vec<usize> = COLUMNS.iter().map(|(_, w, _)| *w).collect();
        let aligns: Vec<Align> = COLUMNS.iter().map(|(_, _, a)| *a).collect();
        write_row(out, &cells, &widths, &aligns)
    }
}

/// One JSON object per view: the registry's view (`show --json`'s document)
/// plus when it arrived, whether the registry restarted, and what changed.
fn json_line(
    time: &str,
    view: &ServiceView,
    restarted: bool,
    changes: &[Change<'_>],
    out: &mut dyn Write,
) -> std::io::Result<()> {
    #[derive(Serialize)]
    struct Line<'a> {
        time: &'a str,
        restarted: bool,
        changes: Vec<serde_json::Value>,
        #[serde(flatten)]
        view: &'a ServiceView,
    }
    let changes = changes
        .iter()
        .map(|c| match c {
            Change::Changed { before, after } => {
                let fields: Vec<&str> = changed_fields(before, after).iter().map(|(n, _, _)| *n).collect();
                json!({"event": c.event(), "id": c.instance().id, "fields": fields})
            }
            _ => json!({"event": c.event(), "id": c.instance().id}),
        })
        .collect();
    serde_json::to_writer(&mut *out, &Line { time, restarted, changes, view })?;
    writeln!(out)
}

/// A failure the next round may not have: keep watching.
fn is_transient(e: &ClientError) -> bool {
    match e {
        ClientError::Transport { .. } | ClientError::Protocol { .. } => true,
        ClientError::Api { status, .. } => {
            status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
        }
        _ => false,
    }
}

pub async fn run(
    args: &WatchArgs,
    client: RegistryClient,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), CliError> {
    let context = args.target.context();
    let mut watch = Watch::new(client, args.service.clone(), true);
    let mut printer = Printer::new(args.format.json);
    // The first view must come: a registry that cannot be asked is an error, not a wait.
    let first = watch.next().await?;
    printer.view(first, SystemTime::now(), out)?;
    let mut failing = false;
    loop {
        match watch.next().await {
            Ok(view) => {
                if std::mem::take(&mut failing) {
                    writeln!(err, "registry watch: the registry answers again; resuming")?;
                }
                printer.view(view, SystemTime::now(), out)?;
            }
            Err(e) if is_transient(&e) => {
                if !std::mem::replace(&mut failing, true) {
                    writeln!(err, "registry watch: {}; retrying", clean(&describe(&e, &context)))?;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Duration;
    use trellis_shared::types::HealthStatus;
    use trellis_shared::{Address, InstanceId};

    fn instance(id: &str, status: HealthStatus) -> Instance {
        Instance {
            id: InstanceId::new(id).unwrap(),
            address: Address::new("10.0.0.5").unwrap(),
            port: 8080,
            zone: None,
            weight: 100,
            metadata: BTreeMap::new(),
            status,
            output: String::new(),
            tags: Vec::new(),
            mesh_tls: false,
        }
    }

    fn view(index: u64, epoch: &str, instances: Vec<Instance>) -> ServiceView {
        ServiceView {
            service: ServiceName::new("users").unwrap(),
            index,
            epoch: epoch.into(),
            instances,
            protected: false,
        }
    }

    #[test]
    fn diff_names_each_instance_once_and_ignores_the_output_text() {
        let a = instance("a", HealthStatus::Passing);
        let b = instance("b", HealthStatus::Passing);
        let mut b2 = instance("b", HealthStatus::Critical);
        b2.output = "refused".into();
        let mut a_quiet = a.clone();
        a_quiet.output = "only the text changed".into();
        let c = instance("c", HealthStatus::Warning);
        let first = [a.clone(), b.clone()];
        assert_eq!(diff(None, &first), vec![Change::Present(&a), Change::Present(&b)]);
        let next = [a_quiet, b2.clone(), c.clone()];
        assert_eq!(
            diff(Some(&first), &next),
            vec![Change::Changed { before: &b, after: &b2 }, Change::Added(&c)]
        );
        assert_eq!(diff(Some(&next), std::slice::from_ref(&c))[0].event(), "removed");
        assert_eq!(changed_fields(&b, &b2), vec![("status", "passing".to_string(), "critical".to_string())]);
    }

    #[test]
    fn lines_for_people_and_for_scripts() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut out = Vec::new();
        let mut p = Printer::new(false);
        p.view(view(0, "e1", vec![]), at, &mut out).unwrap();
        p.view(view(3, "e1", vec![instance("users-1", HealthStatus::Passing)]), at, &mut out).unwrap();
        let mut weak = instance("users-1", HealthStatus::Warning);
        weak.weight = 5;
        p.view(view(4, "e1", vec![weak]), at, &mut out).unwrap();
        p.view(view(1, "e2", vec![]), at, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "TIME                  INDEX  EVENT    ID            ADDRESS           PORT  ZONE    WEIGHT  STATUS    DETAIL",
                "2027-01-15T08:00:00Z      0  empty    -             -                    -  -            -  -         no instance registered yet",
                "2027-01-15T08:00:00Z      3  added    users-1       10.0.0.5          8080  -          100  passing",
                "2027-01-15T08:00:00Z      4  changed  users-1       10.0.0.5          8080  -            5  warning   status passing -> warning; weight 100 -> 5",
                "2027-01-15T08:00:00Z      1  restart  -             -                    -  -            -  -         the registry restarted (epoch e1 -> e2)",
                "2027-01-15T08:00:00Z      1  removed  users-1       10.0.0.5          8080  -            5  warning",
            ]
        );

        let mut out = Vec::new();
        let mut p = Printer::new(true);
        p.view(view(3, "e1", vec![instance("users-1", HealthStatus::Passing)]), at, &mut out).unwrap();
        p.view(view(5, "e1", vec![]), at, &mut out).unwrap();
        let lines: Vec<serde_json::Value> =
            String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["changes"], json!([{"event": "present", "id": "users-1"}]));
        assert_eq!(lines[0]["instances"][0]["port"], 8080);
        assert_eq!(lines[1]["changes"], json!([{"event": "removed", "id": "users-1"}]));
        assert_eq!((lines[1]["index"].as_u64(), lines[1]["restarted"].as_bool()), (Some(5), Some(false)));
        assert_eq!(lines[1]["time"], "2027-01-15T08:00:00Z");
    }
}
