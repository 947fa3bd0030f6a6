//! Child processes of the harness: pinned to a core with `taskset`, logged to
//! a file, killed when dropped, and waited on for readiness.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::http1::{get_request, parse_response, Parse};

/// A loopback address that was free a moment ago.
pub fn free_addr() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// A running child, killed (SIGKILL) and reaped on drop.
pub struct Proc {
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program args`, on `core` when given, output to `<log_dir>/<name>.log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        core: Option<usize>,
        log_dir: &Path,
    ) -> std::io::Result<Proc> {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let mut cmd = match core {
            Some(c) => {
                let mut cmd = Command::new("taskset");
                cmd.arg("-c").arg(c.to_string()).arg(program);
                cmd
            }
            None => Command::new(program),
        };
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err).env_remove("RUST_LOG");
        let child =
            cmd.spawn().map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", program.display())))?;
        Ok(Proc { child, log })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// `kill -9` of the process and every descendant (nginx's workers would
    /// otherwise outlive their master).
    pub fn kill9(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            for pid in crate::procstat::tree(self.pid()) {
                // SAFETY: kill(2) with a pid from our own process tree; no memory is touched.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        let _ = self.child.wait();
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One blocking GET; the status and body.
pub fn http_get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(&get_request(host, path))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        match parse_response(&buf) {
            Ok(Parse::Complete { status, len, .. }) => {
                let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |p| p + 4);
                return Ok((status, buf[head_end..len].to_vec()));
            }
            Ok(Parse::Incomplete) => {}
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Polls `ready` every 20 ms until it holds or `within` passes.
pub fn wait_until(what: &str, within: Duration, mut ready: impl FnMut() -> bool) -> std::io::Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} not ready within {within:?}")))
}

/// Waits until GET `path` on `addr` answers 2xx.
pub fn wait_http_ok(
    what: &str,
    addr: SocketAddr,
    host: &str,
    path: &str,
    within: Duration,
) -> std::io::Result<()> {
    wait_until(what, within, || {
        http_get(addr, host, path, Duration::from_millis(500)).is_ok_and(|(s, _)| (200..300).contains(&s))
    })
}

/// Waits until something accepts connections on `addr`.
pub fn wait_listening(what: &str, addr: SocketAddr, within: Duration) -> std::io::Result<()> {
    wait_until(what, within, || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
}

/// First line of a command's output (stdout or stderr), for version strings.
pub fn command_line_output(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(o) => {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().to_string()
        }
        Err(e) => format!("unavailable ({e})"),
    }
}
