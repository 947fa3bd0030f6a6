//! The benchmark backend: a small, fast HTTP/1.1 server on a single-threaded
//! runtime. Every request gets the same short `200` answer naming the
//! instance, so the proxy under test, not the backend, dominates the cost.
//!
//! With a delay it plays a slow instance: answers on the first (traffic)
//! address wait that long, while the other addresses (health checks) still
//! answer at once, as an app slowed by its work but not dead would.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Serves on every address until the process is killed; answers on the
/// first address wait `delay`. Once all are bound, writes them to `ready_file`.
pub fn run(
    listen: &[SocketAddr],
    name: &str,
    delay: Duration,
    ready_file: Option<&Path>,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let body = format!("hello from {name}\n");
    let response: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-backend: {name}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    rt.block_on(async move {
        let mut listeners = Vec::new();
        for addr in listen {
            listeners.push(TcpListener::bind(addr).await?);
        }
        if let Some(path) = ready_file {
            let bound = listeners.iter().map(TcpListener::local_addr).collect::<std::io::Result<Vec<_>>>()?;
            trellis_shared::ready_file::write(path, &BTreeMap::from([("listen", bound)]))?;
        }
        let mut tasks = Vec::new();
        for (i, l) in listeners.into_iter().enumerate() {
            let delay = if i == 0 { delay } else { Duration::ZERO };
            tasks.push(tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, _)) => {
                            tokio::spawn(serve(s, response, delay));
                        }
                        Err(e) => tracing::debug!(error = %e, "accept failed"),
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    })
}

/// Where the request at the front of `buf` ends, and whether the client asked to close.
fn request_end(buf: &[u8]) -> Option<Result<(usize, bool), ()>> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let mut len = 0usize;
    let mut close = false;
    for line in buf[..head_end].split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            match std::str::from_utf8(value).ok().and_then(|v| v.trim().parse().ok()) {
                Some(n) => len = n,
                None => return Some(Err(())),
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            close = value.windows(5).any(|w| w.eq_ignore_ascii_case(b"close"));
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Chunked request bodies never occur in the benchmark.
            return Some(Err(()));
        }
    }
    let total = head_end + 4 + len;
    (buf.len() >= total).then_some(Ok((total, close)))
}

async fn serve(mut s: TcpStream, response: &'static [u8], delay: Duration) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    let mut out = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    loop {
        let n = match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut close = false;
        // Answer every complete request in the buffer at once (pipelining).
        while let Some(r) = request_end(&buf) {
            let Ok((len, c)) = r else {
                let _ = s
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                return;
            };
            buf.drain(..len);
            out.extend_from_slice(response);
            if c {
                close = true;
                break;
            }
        }
        if !out.is_empty() {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if s.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if close || buf.len() > 1 << 20 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_request_ends() {
        assert_eq!(request_end(b"GET / HTTP/1.1\r\nhost: a\r\n\r\nGET"), Some(Ok((27, false))));
        assert_eq!(request_end(b"GET / HTTP/1.1\r\nhost: a\r\n"), None);
        let post = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc";
        assert_eq!(request_end(post), Some(Ok((post.len(), true))));
        assert_eq!(request_end(&post[..post.len() - 1]), None);
    }
}
