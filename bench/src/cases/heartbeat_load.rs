//! The heartbeat workload of cases 4 and 6: a fleet of instances registered
//! through the registry's HTTP API, then one heartbeat per instance per
//! interval on a fixed schedule over keep-alive connections, plain or TLS,
//! each request carrying its service's token when the fleet has tokens.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::http1::{request_with_token, Dial};
use crate::load::new_histogram;

/// The sidecar's default heartbeat interval.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Bulk instances get a long TTL so the registration burst itself cannot
/// expire the first instances before their first heartbeat.
pub const BULK_TTL_SECS: u64 = 120;
/// Connections carrying the heartbeats (100,000 sidecars would hold one each;
/// the file-descriptor limit here does not allow that).
pub const HEARTBEAT_CONNS: usize = 256;
/// Connections carrying the registrations.
const REGISTER_CONNS: usize = 64;

/// The name of the service instance `k` belongs to.
pub fn service(k: usize, services: usize) -> String {
    format!("svc-{:04}", k % services)
}

/// A bearer token's secret. Never printed: `Debug` is redacted.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: String) -> Secret {
        Secret(secret)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The instances: `i-{k}` in service `service(k, services)`, and the token
/// each service's instances present (none when `tokens` is empty).
#[derive(Debug)]
pub struct Fleet {
    pub instances: usize,
    pub services: usize,
    /// One per service, in service order.
    tokens: Vec<Secret>,
}

impl Fleet {
    pub fn new(instances: usize, services: usize) -> Fleet {
        Fleet { instances, services: services.max(1), tokens: Vec::new() }
    }

    /// The same fleet, instance `k` presenting `tokens[k % services]`.
    pub fn with_tokens(self, tokens: Vec<Secret>) -> Fleet {
        Fleet { tokens, ..self }
    }

    fn token(&self, k: usize) -> Option<&str> {
        self.tokens.get(k % self.services).map(Secret::expose)
    }

    /// The heartbeat of every instance, built once so the generator spends
    /// its core on sending, not formatting.
    pub fn heartbeat_requests(&self) -> Vec<Vec<u8>> {
        (0..self.instances)
            .map(|k| {
                request_with_token(
                    "PUT",
                    &format!("/v1/services/{}/instances/i-{k}/heartbeat", service(k, self.services)),
                    self.token(k),
                    r#"{"status":"passing"}"#,
                )
            })
            .collect()
    }
}

/// A registration of instance `id` of `svc` with a TTL of `ttl` seconds.
pub fn register_request(svc: &str, id: &str, ttl: u64, token: Option<&str>) -> Vec<u8> {
    let body = format!(r#"{{"address":"127.0.0.1","port":{},"ttl":"{ttl}s"}}"#, 10_000 + id.len());
    request_with_token("PUT", &format!("/v1/services/{svc}/instances/{id}"), token, &body)
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Registers every instance of the fleet with a `BULK_TTL_SECS` TTL.
pub async fn register_all(dial: &Dial, addr: SocketAddr, fleet: Arc<Fleet>) -> std::io::Result<()> {
    register_part(dial, addr, fleet, (0, 1)).await
}

/// Registers the instances `k` of the fleet with `k % parts == part`.
pub async fn register_part(
    dial: &Dial,
    addr: SocketAddr,
    fleet: Arc<Fleet>,
    part: (usize, usize),
) -> std::io::Result<()> {
    register_with_ttl(dial, addr, fleet, part, BULK_TTL_SECS).await
}

/// Registers the instances `k` of the fleet with `k % parts == part`, with a
/// TTL of `ttl` seconds (again, for instances already registered).
pub async fn register_with_ttl(
    dial: &Dial,
    addr: SocketAddr,
    fleet: Arc<Fleet>,
    (part, parts): (usize, usize),
    ttl: u64,
) -> std::io::Result<()> {
    let conns = REGISTER_CONNS.min(fleet.instances.max(1));
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (dial, fleet) = (dial.clone(), fleet.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = dial.connect(addr).await?;
            for k in (c..fleet.instances).step_by(conns).filter(|k| k % parts == part) {
                let (svc, id) = (service(k, fleet.services), format!("i-{k}"));
                let st = conn.roundtrip(&register_request(&svc, &id, ttl, fleet.token(k))).await?;
                if !(200..300).contains(&st) {
                    return Err(io_err(format!("register answered {st}")));
                }
            }
            Ok::<_, std::io::Error>(())
        }));
    }
    for t in tasks {
        t.await.map_err(io_err)??;
    }
    Ok(())
}

/// What the heartbeat generator saw in its window.
pub struct HbStats {
    pub ok: u64,
    pub failed: u64,
    /// Heartbeats answered 404 (`unknown_instance`) over the whole run, in
    /// the window or not: instances the registry lost, which a sidecar would
    /// register again.
    pub unknown: u64,
    pub hist: Histogram<u64>,
    /// Connections opened over the whole run (TLS: one handshake each):
    /// one per generator connection, plus one per reconnect after an error.
    pub connects: u64,
}

/// Heartbeats on a fixed schedule: instance k's are due at
/// t0 + k/rate + m × interval; latency runs from the due time. Those due in
/// `[from, to)` are counted; sending stops at `stop`.
pub async fn heartbeats(
    dial: Dial,
    addrs: Vec<SocketAddr>,
    reqs: Arc<Vec<Vec<u8>>>,
    (from, to, stop): (Instant, Instant, Instant),
) -> HbStats {
    let n = reqs.len();
    let rate = n as f64 / HEARTBEAT_INTERVAL.as_secs_f64();
    let conns = HEARTBEAT_CONNS.min(n);
    let t0 = Instant::now();
    let addrs: Arc<[SocketAddr]> = addrs.into();
    // A set, so that aborting this generator stops its connections too.
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..conns {
        let (dial, reqs, addrs) = (dial.clone(), reqs.clone(), addrs.clone());
        tasks.spawn(async move {
            let mut st = HbStats { ok: 0, failed: 0, unknown: 0, hist: new_histogram(), connects: 1 };
            // Like a sidecar given several registry URLs: the first, and the
            // next one whenever the current one fails.
            let mut at = 0;
            let mut conn = dial.connect(addrs[at]).await.ok();
            let mut j = c as u64;
            loop {
                let due = t0 + Duration::from_secs_f64(j as f64 / rate);
                let now = Instant::now();
                // A generator behind schedule stops on time too.
                if due >= stop || now >= stop {
                    break;
                }
                if due > now {
                    tokio::time::sleep_until(due.into()).await;
                }
                let req = &reqs[(j % n as u64) as usize];
                let counted = due >= from && due < to;
                let res = match conn.as_mut() {
                    Some(cn) => Some(cn.roundtrip(req).await),
                    None => None,
                };
                match res {
                    Some(Ok(s)) if (200..300).contains(&s) => {
                        if counted {
                            st.ok += 1;
                            let _ = st.hist.record(due.elapsed().as_nanos() as u64);
                        }
                    }
                    Some(Ok(s)) => {
                        st.failed += counted as u64;
                        st.unknown += u64::from(s == 404);
                    }
                    _ => {
                        st.failed += counted as u64;
                        st.connects += 1;
                        if conn.is_some() || addrs.len() > 1 {
                            at = (at + 1) % addrs.len();
                        }
                        conn = dial.connect(addrs[at]).await.ok();
                    }
                }
                j += conns as u64;
            }
            st
        });
    }
    let mut out = HbStats { ok: 0, failed: 0, unknown: 0, hist: new_histogram(), connects: 0 };
    while let Some(done) = tasks.join_next().await {
        if let Ok(s) = done {
            out.ok += s.ok;
            out.failed += s.failed;
            out.unknown += s.unknown;
            out.connects += s.connects;
            let _ = out.hist.add(&s.hist);
        }
    }
    out
}
