//! BENCHMARKS.md: the machine, every peer's version and full configuration,
//! the sidecar's settings, and each case's tables and charts.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use crate::cases::{RunArgs, Sizes};
use crate::peers::{self, Backends, Env};
use crate::procs::command_line_output;

pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
    pub memory: String,
}

impl Machine {
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("unknown")
            .trim()
            .to_string();
        let kernel =
            std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        let memory = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<u64>().ok()))
            .map(|k| format!("{:.1} GiB", k as f64 / 1024.0 / 1024.0))
            .unwrap_or_default();
        Machine {
            // Not available_parallelism: the harness has pinned itself to one core by now.
            // SAFETY: sysconf has no memory effects.
            cores: unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize,
            cpu,
            kernel,
            memory,
        }
    }
}

/// One case's part of the report.
pub struct Section {
    pub title: String,
    pub body: String,
}

impl Section {
    pub fn error(title: &str, e: &str) -> Section {
        Section { title: title.into(), body: format!("**Not completed:** {e}\n") }
    }
}

pub struct Report {
    header: String,
    pub sections: Vec<Section>,
    pub elapsed: Duration,
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl Report {
    pub fn new(args: &RunArgs, m: Machine, sizes: &Sizes, env: &Env) -> Report {
        let mut h = String::new();
        let _ = writeln!(h, "# Benchmarks\n");
        let _ = writeln!(
            h,
            "Trellis's sidecar against HAProxy and nginx, its registry against etcd, and failover against all, \
             measured on loopback in one run by the harness in `bench/`. \
             How the harness works and how to read the figures: [docs/bench.md](docs/bench.md).\n"
        );
        let _ = writeln!(h, "Produced by:\n\n```sh\n{}\n```\n", args.command);
        if sizes.quick {
            let _ = writeln!(h, "> **Quick mode**: every case ran briefly with small sizes; the figures only show that the harness works.\n");
        }
        let _ = writeln!(h, "## Machine\n");
        let _ = writeln!(h, "| | |\n|---|---|");
        let _ = writeln!(h, "| CPU | {} |", m.cpu);
        let _ = writeln!(h, "| cores | {} |", m.cores);
        let _ = writeln!(h, "| memory | {} |", m.memory);
        let _ = writeln!(h, "| kernel | {} |", m.kernel);
        let pin = match (env.proxy_core, env.load_core) {
            (Some(p), Some(l)) => format!(
                "proxy / registry / etcd under test on core {p}; load generator, backends, their sidecars and the registry serving the proxy case on core {l} (`taskset`)"
            ),
            _ => "not pinned (fewer than two cores, or --no-pin)".into(),
        };
        let _ = writeln!(h, "| pinning | {pin} |");
        let before = crate::procstat::cpu_jiffies();
        std::thread::sleep(Duration::from_secs(1));
        let busy = crate::procstat::busy_percent(&before, &crate::procstat::cpu_jiffies());
        let busy: Vec<String> = busy.iter().map(|b| format!("{b:.0}%")).collect();
        let _ = writeln!(h, "| other load before the run (busy per core, 1 s) | {} |", busy.join(" / "));
        let _ = writeln!(h, "| Trellis build profile | `{}` |", args.profile);
        let _ = writeln!(
            h,
            "| Trellis commit | `{}` |\n",
            command_line_output("git", &["rev-parse", "--short", "HEAD"])
        );

        let _ = writeln!(h, "## Versions\n");
        let _ = writeln!(h, "| peer | version |\n|---|---|");
        let sidecar = env.bin("sidecar").display().to_string();
        let registry = env.bin("registry").display().to_string();
        for (name, prog, a) in [
            ("Trellis sidecar", sidecar.as_str(), "--version"),
            ("Trellis registry", registry.as_str(), "--version"),
            ("HAProxy", "haproxy", "-v"),
            ("nginx", "nginx", "-v"),
            ("etcd", "etcd", "--version"),
            ("h2load", "h2load", "--version"),
        ] {
            let _ = writeln!(h, "| {name} | {} |", command_line_output(prog, &[a]).replace('|', "/"));
        }

        let fake = Backends {
            procs: Vec::new(),
            traffic: vec![addr(20001), addr(20002), addr(20003)],
            health: vec![addr(20101), addr(20102), addr(20103)],
        };
        let _ = writeln!(h, "\n## Configurations\n");
        let _ = writeln!(
            h,
            "Ports are picked per run; these are the files the harness writes, with example ports. \
             Backends 1-3 serve requests on 2000x and health checks on 2010x (the same process), \
             so the failover case can tell requests from checks by port.\n"
        );
        let _ = writeln!(
            h,
            "### HAProxy (`haproxy -db -f haproxy.cfg`, pinned to the proxy core)\n\n```haproxy\n{}```\n",
            peers::haproxy_config(addr(10000), &fake, peers::Front::Http1, peers::Tuning::default())
        );
        let nginx_dir = env.work.join("nginx");
        let _ = writeln!(
            h,
            "### nginx (`nginx -p DIR -c nginx.conf`, pinned to the proxy core)\n\n```nginx\n{}```\n",
            peers::nginx_config(
                addr(10000),
                &fake,
                &nginx_dir,
                peers::Front::Http1,
                peers::Tuning::default()
            )
        );
        let client =
            peers::sidecar_client_args(addr(7600), addr(10000), addr(15000), peers::Tuning::default())
                .join(" ");
        let backend = peers::sidecar_backend_args(addr(7600), addr(20001), addr(20101)).join(" ");
        let _ = writeln!(
            h,
            "### Trellis\n\nRegistry: `registry --listen 127.0.0.1:7600` (defaults otherwise).\n\n\
             Client sidecar under test (pinned to the proxy core; every other setting at its default, no feature switched off):\n\n\
             ```sh\nsidecar {client}\n```\n\nEach backend's own sidecar (load core), registering the backend and checking its health port:\n\n\
             ```sh\nsidecar {backend}\n```\n"
        );
        let help = std::process::Command::new(env.bin("sidecar")).arg("--help").output();
        if let Ok(o) = help {
            let _ = writeln!(
                h,
                "The sidecar's settings and defaults (`sidecar --help`):\n\n```text\n{}```\n",
                String::from_utf8_lossy(&o.stdout)
            );
        }
        let _ = writeln!(h, "### etcd\n\n```sh\n{}\n```\n", crate::cases::etcd_command_example());
        Report { header: h, sections: Vec::new(), elapsed: Duration::ZERO }
    }

    pub fn render(&self) -> String {
        let mut s = self.header.clone();
        for sec in &self.sections {
            let _ = writeln!(s, "## {}\n\n{}", sec.title, sec.body);
        }
        let _ = writeln!(s, "---\n\nWhole run: {:.0} s.", self.elapsed.as_secs_f64());
        s
    }
}
