//! Case 4's measured answer to "why not renew each instance's lease over a
//! gRPC stream": etcd renewing one lease per instance once a second, the
//! keep-alives sent over one `LeaseKeepAlive` bidirectional stream (what
//! etcd's own Go client uses) instead of one JSON-gateway request each. The
//! generator speaks HTTP/2 to etcd's client port (h2c) with hyper and frames
//! the two tiny protobuf messages itself, so no protoc or gRPC stack joins
//! the build. Measured: etcd's CPU per 1,000 keep-alives over the window, and
//! the keep-alives etcd answered with a live lease (a TTL above zero).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::registry::{register_all_etcd, start_etcd};
use super::Sizes;
use crate::peers::Env;
use crate::procstat;

/// The path of etcd's `Lease.LeaseKeepAlive` RPC.
const KEEP_ALIVE: &str = "/etcdserverpb.Lease/LeaseKeepAlive";

pub struct GrpcKeepAlive {
    pub leases: usize,
    pub window: Duration,
    /// Keep-alives sent during the window.
    pub sent: u64,
    /// Answers with a TTL above zero during the window.
    pub renewed: u64,
    /// Answers saying the lease was gone (TTL 0 or less) over the whole run.
    pub lost: u64,
    pub etcd_cpu_per_1k_ms: f64,
}

/// A `LeaseKeepAliveRequest { ID = id }` as one gRPC message: the 5-byte
/// prefix (not compressed, length) and field 1, a varint.
fn keep_alive_message(id: i64) -> Bytes {
    let mut msg = vec![0x08];
    let mut v = id as u64;
    while v >= 0x80 {
        msg.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    msg.push(v as u8);
    let mut framed = Vec::with_capacity(5 + msg.len());
    framed.push(0);
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    Bytes::from(framed)
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The `TTL` (field 3) of a `LeaseKeepAliveResponse`; 0 when absent (a
/// lease etcd no longer has answers without one).
fn ttl_of(mut msg: &[u8]) -> Option<i64> {
    let mut ttl = 0;
    while !msg.is_empty() {
        let tag = varint(&mut msg)?;
        match (tag >> 3, tag & 7) {
            (field, 0) => {
                let v = varint(&mut msg)?;
                if field == 3 {
                    ttl = v as i64;
                }
            }
            (_, 2) => {
                let len = usize::try_from(varint(&mut msg)?).ok()?;
                msg = msg.get(len..)?;
            }
            _ => return None,
        }
    }
    Some(ttl)
}

/// Keeps every lease in `leases` alive once a second over one stream, each
/// on its own slot of the second, from now until `stop`; counts the answers
/// that renewed a lease (`renewed`) and those that found it gone (`lost`).
async fn keep_alive_stream(
    addr: SocketAddr,
    leases: Arc<Vec<i64>>,
    stop: Instant,
    renewed: Arc<AtomicU64>,
    lost: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
) -> Result<(), String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP/2 to etcd: {e}"))?;
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4096);
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let req = hyper::Request::post(format!("http://{addr}{KEEP_ALIVE}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(Box::pin(frames)))
        .map_err(|e| e.to_string())?;
    let writer = tokio::spawn(async move {
        let n = leases.len().max(1);
        let slot = Duration::from_secs(1) / n as u32;
        let start = tokio::time::Instant::now();
        let mut k: u64 = 0;
        loop {
            let at = start + slot * u32::try_from(k).unwrap_or(u32::MAX);
            if at.into_std() >= stop {
                return;
            }
            tokio::time::sleep_until(at).await;
            let id = leases[(k as usize) % n];
            if tx.send(keep_alive_message(id)).await.is_err() {
                return;
            }
            sent.fetch_add(1, Ordering::Relaxed);
            k += 1;
        }
    });
    let resp = send.send_request(req).await.map_err(|e| format!("LeaseKeepAlive: {e}"))?;
    if resp.status() != 200 {
        return Err(format!("LeaseKeepAlive answered {}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    // The answers to the last keep-alives come within a moment of `stop`.
    let until = tokio::time::Instant::from_std(stop + Duration::from_secs(1));
    while let Ok(Some(frame)) = tokio::time::timeout_at(until, body.frame()).await {
        let frame = frame.map_err(|e| format!("reading the stream: {e}"))?;
        let Ok(data) = frame.into_data() else { break };
        buf.extend_from_slice(&data);
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 5 + len {
                break;
            }
            buf.advance(5);
            let msg = buf.split_to(len);
            match ttl_of(&msg) {
                Some(ttl) if ttl > 0 => renewed.fetch_add(1, Ordering::Relaxed),
                _ => lost.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
    writer.abort();
    Ok(())
}

pub fn measure(env: &Env, sizes: &Sizes) -> Result<GrpcKeepAlive, String> {
    let n = sizes.etcd_instances;
    let (etcd, _data, addr) = start_etcd(env, "grpc-keepalive")?;
    let pid = etcd.pid();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let window = sizes.registry_duration;
    rt.block_on(async move {
        let leases =
            register_all_etcd(addr, n, (n / 100).max(1)).await.map_err(|e| format!("granting: {e}"))?;
        let leases: Vec<i64> = leases.iter().filter_map(|l| l.parse().ok()).collect();
        if leases.len() != n {
            return Err(format!("{} of {n} lease ids read", leases.len()));
        }
        let (renewed, lost, sent) = (Arc::default(), Arc::default(), Arc::default());
        let from = Instant::now() + Duration::from_secs(2);
        let to = from + window;
        let stream = tokio::spawn(keep_alive_stream(
            addr,
            Arc::new(leases),
            to,
            Arc::clone(&renewed),
            Arc::clone(&lost),
            Arc::clone(&sent),
        ));
        tokio::time::sleep_until(from.into()).await;
        let (cpu0, renewed0, sent0) =
            (procstat::cpu_time(pid), renewed.load(Ordering::Relaxed), sent.load(Ordering::Relaxed));
        tokio::time::sleep_until(to.into()).await;
        let (cpu1, renewed1, sent1) =
            (procstat::cpu_time(pid), renewed.load(Ordering::Relaxed), sent.load(Ordering::Relaxed));
        match tokio::time::timeout(Duration::from_secs(5), stream).await {
            Ok(Ok(r)) => r?,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("the stream did not end after the run".into()),
        }
        let renewed = renewed1 - renewed0;
        let cpu = cpu1.saturating_sub(cpu0);
        Ok(GrpcKeepAlive {
            leases: n,
            window,
            sent: sent1 - sent0,
            renewed,
            lost: lost.load(Ordering::Relaxed),
            etcd_cpu_per_1k_ms: cpu.as_secs_f64() * 1000.0 / (renewed.max(1) as f64 / 1000.0),
        })
    })
}

/// The section's paragraph, beside etcd's CPU per 1,000 gateway keep-alives
/// of the same run (`gateway_ms`, the "etcd (direct)" row) when it ran.
pub fn report(b: &mut String, g: &GrpcKeepAlive, gateway_ms: Option<f64>) {
    let _ = writeln!(
        b,
        "\n**Per-instance leases over a gRPC stream.** The same fresh one-member etcd on core 0, {} leases \
         (one per instance) kept alive once a second, each keep-alive a message on one `LeaseKeepAlive` \
         bidirectional stream over HTTP/2, as etcd's own client sends them, instead of a JSON-gateway request. \
         {:.0} s window.\n",
        g.leases,
        g.window.as_secs_f64()
    );
    let _ = writeln!(b, "| leases | keep-alives sent | renewed (TTL > 0) | answered gone | etcd CPU per 1k keep-alives | the JSON gateway's, same run |");
    let _ = writeln!(b, "|---:|---:|---:|---:|---:|---:|");
    let _ = writeln!(
        b,
        "| {} | {} | {} | {} | {:.1} ms | {} |",
        g.leases,
        g.sent,
        g.renewed,
        g.lost,
        g.etcd_cpu_per_1k_ms,
        gateway_ms.map_or("did not run".to_string(), |m| format!("{m:.1} ms"))
    );
    // One keep-alive per instance per second: a core's 1,000 ms a second over
    // the cost of one.
    let per_core = 1_000_000.0 / g.etcd_cpu_per_1k_ms.max(f64::MIN_POSITIVE);
    let _ = writeln!(
        b,
        "\nAt that cost etcd alone could renew about {per_core:.0} instances per core, before any registry CPU: \
         the stream saves the gateway's HTTP and JSON work, not etcd's per-lease work, which is why the etcd \
         store keeps heartbeats in the replicas instead (docs/ha.md).\n"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_a_keep_alive_request() {
        // ID 300: varint 0xac 0x02.
        assert_eq!(&keep_alive_message(300)[..], &[0, 0, 0, 0, 3, 0x08, 0xac, 0x02]);
    }

    #[test]
    fn reads_the_ttl_of_a_keep_alive_response() {
        // header { cluster_id: 1 } (field 1, bytes), ID 300 (field 2), TTL 5 (field 3).
        let msg = [0x0a, 0x02, 0x08, 0x01, 0x10, 0xac, 0x02, 0x18, 0x05];
        assert_eq!(ttl_of(&msg), Some(5));
        // A lease etcd no longer has: no TTL field.
        assert_eq!(ttl_of(&[0x10, 0x01]), Some(0));
        assert_eq!(ttl_of(&[0x18]), None, "truncated");
    }
}
