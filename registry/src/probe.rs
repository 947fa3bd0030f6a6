//! `registry probe`: a healthcheck for images without a shell or curl.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// True when `GET /health` on `addr` answers 200 within `timeout`.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        let req = format!("GET /health HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::with_capacity(256);
        // The status line is all we need; cap what we read from a confused peer.
        let mut chunk = [0u8; 256];
        while buf.len() < 4096 && !buf.windows(2).any(|w| w == b"\r\n") {
            let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&buf);
        let status = line.lines().next().unwrap_or("").to_string();
        if status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200") {
            Ok(())
        } else {
            Err(format!("unexpected answer {status:?}"))
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("no answer from {addr} within {timeout:?}"))?
}

/// The address to probe for a listen address: loopback for a wildcard.
pub fn local_addr_for(listen: SocketAddr) -> SocketAddr {
    let mut a = listen;
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    a
}
