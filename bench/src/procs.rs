//! Child processes of the harness, on the test library's process handle
//! (`trellis_tests::Proc`: logged, killed with its descendants on drop):
//! pinned to a core, logged to the work directory, and waited on over HTTP.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

pub use trellis_tests::ports::{foreign_binary_addr, ATTEMPTS};
use trellis_tests::Launch;
pub use trellis_tests::{wait_until, Ready};

use crate::http1::{get_request, parse_response, Parse};

/// How long a child may take to write its ready file.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A child of the harness: the test library's handle, started the harness's
/// way (on `core` when given, output to `<log_dir>/<name>.log`, with the
/// program's own default log level).
pub struct Proc(trellis_tests::Proc);

impl Proc {
    fn launch(name: &str, program: &Path, args: &[String], core: Option<usize>, log_dir: &Path) -> Launch {
        Launch::new(name, program)
            .args(args)
            .core(core)
            .log_to(log_dir.join(format!("{name}.log")))
            .env_remove("RUST_LOG")
    }

    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        core: Option<usize>,
        log_dir: &Path,
    ) -> std::io::Result<Proc> {
        Proc::launch(name, program, args, core, log_dir).spawn().map(Proc)
    }

    /// Starts one of our binaries (its listeners on port 0) and returns once
    /// its ready file says where it listens.
    pub fn spawn_ready(
        name: &str,
        program: &Path,
        args: &[String],
        core: Option<usize>,
        log_dir: &Path,
    ) -> std::io::Result<(Proc, Ready)> {
        let (proc, ready) = Proc::launch(name, program, args, core, log_dir).spawn_ready(READY_WITHIN)?;
        Ok((Proc(proc), ready))
    }
}

impl std::ops::Deref for Proc {
    type Target = trellis_tests::Proc;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
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
