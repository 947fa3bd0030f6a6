//! The benchmark cases and the run that strings them together.
//!
//! - `saturation`: case 1, HTTP/1.1 at saturation with 64 connections.
//! - `fixed_rate`: case 2, constant rates: added latency and CPU per request.
//! - `http2`: case 3, h2c with 100 concurrent streams (h2load).
//! - `registry`: case 4, the registry at scale against etcd.
//! - `failover`: case 5, one backend killed, killed while another is slow, or
//!   paused (SIGSTOP), under steady load.
//! - `security`: case 6, the registry's heartbeat CPU with tokens, with TLS
//!   and with both, beside the plain figure.
//! - `mtls`: case 7, two hops (client-side proxy, server-side proxy, app) in
//!   plain text and with mutual TLS, for Trellis, HAProxy and nginx.
//! - `heartbeat_load`: the heartbeat workload cases 4 and 6 share.

mod etcd_grpc;
mod failover;
mod fixed_rate;
mod heartbeat_load;
mod http2;
mod mtls;
mod registry;
mod rehome;
mod saturation;
mod security;

pub use registry::etcd_command_example;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::peers::Env;
use crate::report::{Machine, Report, Section};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Every case briefly with small sizes (CI: keeps the harness from rotting).
    #[arg(long, env = "TRELLIS_QUICK")]
    pub quick: bool,
    /// Where to write the report.
    #[arg(long, env = "TRELLIS_OUT", default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// Where to write the SVG charts (linked from the report, relative to it).
    #[arg(long, env = "TRELLIS_CHARTS", default_value = "bench/charts")]
    pub charts: PathBuf,
    /// Directory holding the `registry` and `sidecar` binaries [default: next to this binary].
    #[arg(long, env = "TRELLIS_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Scratch directory for configurations, logs and data [default: a fresh one under /tmp].
    #[arg(long, env = "TRELLIS_WORK")]
    pub work: Option<PathBuf>,
    /// Do not pin processes to cores with taskset.
    #[arg(long, env = "TRELLIS_NO_PIN")]
    pub no_pin: bool,
    /// Cases to run (1-7).
    #[arg(long, env = "TRELLIS_CASES", value_delimiter = ',', default_values_t = [1, 2, 3, 4, 5, 6, 7])]
    pub cases: Vec<u8>,
    /// The command line to print in the report.
    #[arg(long, env = "TRELLIS_COMMAND", default_value = "scripts/bench.sh")]
    pub command: String,
    /// Profile the binaries were built with, for the report.
    #[arg(long, env = "TRELLIS_PROFILE", default_value = "bench-release")]
    pub profile: String,
}

/// How long and how big each case runs.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub quick: bool,
    pub warmup: Duration,
    pub saturation: Duration,
    pub connections: usize,
    pub rates: Vec<f64>,
    pub rate_duration: Duration,
    pub rate_connections: usize,
    /// Case 7's fixed rates.
    pub mtls_rates: Vec<f64>,
    /// Case 7 measures every setup this many times, interleaved; the windows
    /// together last `rate_duration` per setup and rate.
    pub mtls_rounds: usize,
    pub failover_rate: f64,
    pub failover_before_kill: Duration,
    pub failover_after_kill: Duration,
    pub registry_instances: usize,
    pub registry_services: usize,
    pub registry_duration: Duration,
    pub etcd_instances: usize,
    /// The registry on its etcd store at scale: two replicas, one etcd.
    pub etcd_store_instances: usize,
    /// Instances owned by the replica killed in case 4's failover at scale.
    pub rehome_instances: usize,
    pub watchers: usize,
    pub security_instances: usize,
    pub security_services: usize,
    pub security_duration: Duration,
}

impl Sizes {
    pub fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                quick,
                warmup: Duration::from_millis(300),
                saturation: Duration::from_secs(1),
                connections: 64,
                rates: vec![2_000.0, 10_000.0],
                rate_duration: Duration::from_secs(1),
                rate_connections: 16,
                mtls_rates: vec![2_000.0],
                mtls_rounds: 1,
                failover_rate: 500.0,
                failover_before_kill: Duration::from_secs(1),
                failover_after_kill: Duration::from_secs(3),
                registry_instances: 2_000,
                registry_services: 20,
                registry_duration: Duration::from_secs(3),
                etcd_instances: 1_000,
                etcd_store_instances: 4_000,
                rehome_instances: 1_000,
                watchers: 100,
                security_instances: 2_000,
                security_services: 20,
                security_duration: Duration::from_secs(3),
            }
        } else {
            Sizes {
                quick,
                warmup: Duration::from_secs(2),
                saturation: Duration::from_secs(10),
                connections: 64,
                rates: vec![2_000.0, 10_000.0],
                rate_duration: Duration::from_secs(10),
                rate_connections: 16,
                mtls_rates: vec![2_000.0, 5_000.0],
                mtls_rounds: 3,
                failover_rate: 1_000.0,
                failover_before_kill: Duration::from_secs(3),
                failover_after_kill: Duration::from_secs(15),
                registry_instances: 100_000,
                registry_services: 1_000,
                registry_duration: Duration::from_secs(20),
                etcd_instances: 2_000,
                etcd_store_instances: 50_000,
                rehome_instances: 10_000,
                watchers: 1_000,
                security_instances: 20_000,
                security_services: 200,
                security_duration: Duration::from_secs(20),
            }
        }
    }

    /// One of case 7's measured windows.
    pub fn mtls_window(&self) -> Duration {
        self.rate_duration / u32::try_from(self.mtls_rounds).unwrap_or(u32::MAX).max(1)
    }
}

fn machine_cores() -> usize {
    // SAFETY: sysconf has no memory effects.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize
}

pub fn run(args: RunArgs) -> Result<(), String> {
    let started = Instant::now();
    let sizes = Sizes::new(args.quick);
    let work = match &args.work {
        Some(w) => w.clone(),
        None => std::env::temp_dir().join(format!("trellis-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    std::fs::create_dir_all(&args.charts).map_err(|e| format!("{}: {e}", args.charts.display()))?;
    let cores = machine_cores();
    let pin = !args.no_pin && cores >= 2;
    let env = Env {
        work: work.clone(),
        bin_dir: args.bin_dir.clone().unwrap_or_else(crate::default_bin_dir),
        self_exe: std::env::current_exe().map_err(|e| e.to_string())?,
        proxy_core: pin.then_some(0),
        load_core: pin.then_some(1),
    };
    if pin {
        // The harness itself (the load generator) lives on the load core.
        // SAFETY: sched_setaffinity on this process with a stack cpu_set_t.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(1, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
    let mut report = Report::new(&args, Machine::read(), &sizes, &env);
    let charts_rel = relative_to(&args.charts, &args.out);
    for case in &args.cases {
        let t = Instant::now();
        eprintln!("trellis-bench: case {case}...");
        let section: Section = match case {
            1 => saturation::run(&env, &sizes, &args.charts, &charts_rel),
            2 => fixed_rate::run(&env, &sizes, &args.charts, &charts_rel),
            3 => http2::run(&env, &sizes),
            4 => registry::run(&env, &sizes, &args.charts, &charts_rel),
            5 => failover::run(&env, &sizes),
            6 => security::run(&env, &sizes),
            7 => mtls::run(&env, &sizes),
            other => Section::error(&format!("Case {other}"), "no such case"),
        };
        eprintln!("trellis-bench: case {case} done in {:.1}s", t.elapsed().as_secs_f64());
        report.sections.push(section);
        // Written after every case, so an interrupted run still leaves its figures.
        report.elapsed = started.elapsed();
        std::fs::write(&args.out, report.render()).map_err(|e| format!("{}: {e}", args.out.display()))?;
    }
    report.elapsed = started.elapsed();
    std::fs::write(&args.out, report.render()).map_err(|e| format!("{}: {e}", args.out.display()))?;
    eprintln!("trellis-bench: wrote {} in {:.0}s", args.out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

/// `charts` as a path relative to the directory of `out`, for links.
fn relative_to(charts: &std::path::Path, out: &std::path::Path) -> String {
    let abs = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let (c, o) = (abs(charts), abs(out));
    let base = o.parent().map(PathBuf::from).unwrap_or_default();
    match c.strip_prefix(&base) {
        Ok(rel) => rel.display().to_string(),
        Err(_) => c.display().to_string(),
    }
}

/// Runs `measure` for each target in turn: the rows of those that ran, and a
/// Markdown line for each that did not, so one broken peer does not cost the
/// case its other figures.
fn measure_each<R>(
    case: u8,
    kinds: &[crate::peers::Kind],
    mut measure: impl FnMut(crate::peers::Kind) -> Result<R, String>,
) -> (Vec<R>, String) {
    let mut rows = Vec::new();
    let mut errors = String::new();
    for &kind in kinds {
        eprintln!("  case {case}: {}", kind.name());
        match measure(kind) {
            Ok(r) => rows.push(r),
            Err(e) => errors.push_str(&format!("- **{}** did not run: {e}\n", kind.name())),
        }
    }
    (rows, errors)
}

/// Formats microseconds for tables.
pub fn us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0} µs")
    } else {
        format!("{v:.1} µs")
    }
}

/// `a / b` as a ratio for tables.
pub fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{:.2}×", a / b)
    } else {
        "n/a".into()
    }
}
