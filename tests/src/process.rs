//! A child process of a test or of the benchmark harness: its output goes to a
//! log file, it is killed with its descendants when dropped, and the log's
//! tail is printed when the dropping thread is panicking.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Lines of the log shown by [`Proc::log_tail`] and on a failing test.
const TAIL_LINES: usize = 40;

/// How to start a child; [`Launch::spawn`] starts it.
pub struct Launch {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, Option<String>)>,
    core: Option<usize>,
    log: Option<PathBuf>,
    /// The variable that names the ready file, for children that take no
    /// `--ready-file` flag; see [`Launch::ready_file_env`].
    pub(crate) ready_env: Option<String>,
}

impl Launch {
    /// `program` under `name` (used for the log file and messages). By default
    /// the log goes to `<bin_dir>/test-logs/` under a name no other child of
    /// this process uses, and `RUST_LOG` is `TEST_RUST_LOG` or `info`.
    pub fn new(name: &str, program: &Path) -> Launch {
        let rust_log = std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".into());
        Launch {
            name: name.to_string(),
            program: program.to_path_buf(),
            args: Vec::new(),
            env: vec![("RUST_LOG".into(), Some(rust_log))],
            core: None,
            log: None,
            ready_env: None,
        }
    }

    pub fn args(mut self, args: &[String]) -> Launch {
        self.args.extend_from_slice(args);
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Launch {
        self.args.push(arg.into());
        self
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> Launch {
        self.env.push((key.to_string(), Some(value.into())));
        self
    }

    pub fn env_remove(mut self, key: &str) -> Launch {
        self.env.push((key.to_string(), None));
        self
    }

    /// Pins the child to one core with `taskset`.
    pub fn core(mut self, core: Option<usize>) -> Launch {
        self.core = core;
        self
    }

    /// Names the ready file in the environment variable `key` instead of
    /// `--ready-file` (a test executable re-run as a child takes no flags of ours).
    pub fn ready_file_env(mut self, key: &str) -> Launch {
        self.ready_env = Some(key.to_string());
        self
    }

    /// Writes the child's output to `path` instead of the test log directory.
    pub fn log_to(mut self, path: PathBuf) -> Launch {
        self.log = Some(path);
        self
    }

    /// Where the output will go.
    pub fn log_path(&self) -> PathBuf {
        self.log.clone().unwrap_or_else(|| unique_path(&log_dir(), &self.name, "log"))
    }

    pub fn spawn(self) -> std::io::Result<Proc> {
        let log = self.log_path();
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let mut cmd = match self.core {
            Some(c) => {
                let mut cmd = Command::new("taskset");
                cmd.arg("-c").arg(c.to_string()).arg(&self.program);
                cmd
            }
            None => Command::new(&self.program),
        };
        cmd.args(&self.args).stdin(Stdio::null()).stdout(out).stderr(err);
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let child = cmd
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", self.program.display())))?;
        Ok(Proc { name: self.name, child, log, exited: None })
    }
}

/// The directory test children log to (kept after the run for reading).
pub fn log_dir() -> PathBuf {
    let d = crate::bin_dir().join("test-logs");
    let _ = std::fs::create_dir_all(&d);
    d
}

/// `<dir>/<name>-<pid>-<n>.<ext>`, with `n` counting up in this process, so
/// concurrent tests and restarted children never share a file.
pub fn unique_path(dir: &Path, name: &str, ext: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{name}-{}-{n}.{ext}", std::process::id()))
}

/// A running child, killed (SIGKILL, with its descendants) and reaped on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Starts workspace binary `bin_name`; panics with the reason when it cannot.
    pub fn spawn(name: &str, bin_name: &str, args: &[String], env: &[(&str, String)]) -> Proc {
        Proc::spawn_path(name, &crate::bin(bin_name), args, env)
    }

    /// Like [`Proc::spawn`], for a binary outside the workspace (etcd).
    pub fn spawn_path(name: &str, path: &Path, args: &[String], env: &[(&str, String)]) -> Proc {
        let launch = env.iter().fold(Launch::new(name, path).args(args), |l, (k, v)| l.env(k, v.clone()));
        launch.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"))
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// SIGKILL of the process and every descendant (nginx's workers would
    /// otherwise outlive their master), then reap.
    pub fn kill9(&mut self) {
        if self.exited.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            for pid in tree(self.pid()) {
                // SAFETY: kill(2) with a pid from our own process tree; no memory is touched.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        if self.exited.is_none() {
            self.exited = self.child.wait().ok();
        }
    }

    /// The exit status if the process has exited, without waiting.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let _ = crate::wait::wait_until("exit", timeout, || self.exit_status().is_some());
        self.exit_status()
    }

    /// Whether the process exited because a port it was given was taken: the
    /// race a port chosen before the process exists can lose.
    pub fn lost_port_race(&mut self) -> bool {
        self.exit_status().is_some()
            && self.log_text().to_ascii_lowercase().contains("address already in use")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "----- last lines of {} ({}) -----\n{}",
                self.name,
                self.log.display(),
                self.log_tail()
            );
        }
    }
}

/// `pid` and all its descendants, parents first.
pub fn tree(pid: i32) -> Vec<i32> {
    let mut all = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) {
                if let Some(ppid) = parent(p) {
                    all.push((p, ppid));
                }
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let of = out[i];
        out.extend(all.iter().filter(|(_, pp)| *pp == of).map(|(p, _)| *p));
        i += 1;
    }
    out
}

/// The parent pid from `/proc/<pid>/stat` (the field after the parenthesised name).
fn parent(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}
