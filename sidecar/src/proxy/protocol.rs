//! Whether an endpoint speaks HTTP/2 with prior knowledge, for requests that
//! arrived over HTTP/2 and go to an endpoint registered without
//! `protocol=h2c`: HTTP/2 goes upstream as HTTP/2 when the endpoint speaks it,
//! else as HTTP/1.1 (an HTTP/1.1-only app keeps working behind HTTP/2 callers).
//!
//! The answer is learnt once per endpoint address with a probe connection:
//! the client preface and an empty SETTINGS frame; an HTTP/2 server answers
//! with its own SETTINGS frame, an HTTP/1.1 server with an error status or by
//! closing. An endpoint that cannot be reached or does not answer in time is
//! not remembered and gets HTTP/1.1 this time; connecting fails the same way
//! for the request itself, which the retry rules then handle.
//!
//! Every such request reads the map, and a write happens once per endpoint:
//! readers load an `ArcSwap` without a lock, and a writer swaps in a copy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

/// Endpoint addresses remembered; past this the memory starts over (endpoints
/// churn, the set of live ones is far smaller).
const MAX_REMEMBERED: usize = 4096;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
/// Frame type of SETTINGS, the 4th byte of a frame header.
const SETTINGS: u8 = 0x4;

#[derive(Debug, Default)]
pub struct Protocols {
    known: ArcSwap<HashMap<String, bool>>,
}

impl Protocols {
    /// Whether the endpoint at `authority` speaks HTTP/2 with prior knowledge.
    pub async fn speaks_h2(&self, authority: &str, timeout: Duration) -> bool {
        if let Some(&h2) = self.known.load().get(authority) {
            return h2;
        }
        let Ok(Some(h2)) = tokio::time::timeout(timeout, probe(authority)).await else {
            return false;
        };
        debug!(%authority, h2, "endpoint protocol probed");
        self.known.rcu(|known| {
            let mut known =
                if known.len() >= MAX_REMEMBERED { HashMap::new() } else { HashMap::clone(known) };
            known.insert(authority.to_string(), h2);
            Arc::new(known)
        });
        h2
    }
}

/// `None`: the endpoint could not be reached.
async fn probe(authority: &str) -> Option<bool> {
    let mut s = TcpStream::connect(authority).await.ok()?;
    s.write_all(PREFACE).await.ok()?;
    let mut head = [0u8; 9];
    Some(match s.read_exact(&mut head).await {
        Ok(_) => head[3] == SETTINGS,
        // Closed without a frame: not an HTTP/2 server.
        Err(_) => false,
    })
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    async fn server(answer: &'static [u8]) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn tells_http2_from_http1_and_remembers() {
        let p = Protocols::default();
        let h2 = server(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00").await;
        let h1 = server(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
        let closes = server(b"").await;
        let t = Duration::from_secs(5);
        assert!(p.speaks_h2(&h2, t).await);
        assert!(!p.speaks_h2(&h1, t).await);
        assert!(!p.speaks_h2(&closes, t).await);
        assert_eq!(p.known.load().len(), 3);
        // Unreachable: HTTP/1.1 this time, not remembered.
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().to_string();
        assert!(!p.speaks_h2(&gone, t).await);
        assert_eq!(p.known.load().len(), 3);
    }
}
