//! The load generators, the same for every target.
//!
//! - [`closed_loop`]: N connections, each sending its next request as soon as
//!   the previous answer arrived: requests/s at saturation.
//! - [`open_loop`]: a constant rate on a fixed schedule; each request's latency
//!   runs from the time it was *due*, not from when it could be sent, so a
//!   stalled target is charged for the requests it delayed (no coordinated
//!   omission). Threads with blocking sockets and a 1 µs timer slack keep the
//!   schedule to within tens of microseconds, which a 1 ms async timer could not.
//!
//! Both count every non-2xx answer, reset, refused connection and timeout as a
//! failed request and never retry.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::http1::{get_request, parse_response, Parse};

/// A request not answered within this is a failure.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A latency histogram in nanoseconds, 1 ns to 60 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("constant bounds are valid")
}

/// Where and what to send.
#[derive(Debug, Clone)]
pub struct Target {
    /// Connections are spread over these round-robin.
    pub addrs: Vec<SocketAddr>,
    /// Host header: the service name for the sidecar, ignored by the others.
    pub host: String,
    pub path: String,
}

/// What one run measured, counting only requests due after the warm-up.
#[derive(Debug, Clone)]
pub struct LoadResult {
    pub ok: u64,
    pub failed: u64,
    /// Measured window.
    pub elapsed: Duration,
    /// Latency of the successful requests, ns.
    pub hist: Histogram<u64>,
    /// When each failure happened, from the start of the measured window.
    pub failures_at: Vec<Duration>,
}

impl LoadResult {
    /// Nothing measured yet: the start of a sum over several windows.
    pub fn empty() -> LoadResult {
        LoadResult {
            ok: 0,
            failed: 0,
            elapsed: Duration::ZERO,
            hist: new_histogram(),
            failures_at: Vec::new(),
        }
    }

    /// Appends a later window: its failure times count from the end of this
    /// one's measured time, so they stay in order.
    pub fn append(&mut self, later: LoadResult) {
        let offset = self.elapsed;
        self.ok += later.ok;
        self.failed += later.failed;
        self.elapsed += later.elapsed;
        let _ = self.hist.add(&later.hist);
        self.failures_at.extend(later.failures_at.into_iter().map(|f| offset + f));
    }

    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency at a percentile (0-100), in microseconds.
    pub fn pct_us(&self, p: f64) -> f64 {
        self.hist.value_at_percentile(p) as f64 / 1000.0
    }
}

fn merge(parts: Vec<(u64, u64, Histogram<u64>, Vec<Duration>)>, elapsed: Duration) -> LoadResult {
    let mut out = LoadResult { elapsed, ..LoadResult::empty() };
    for (ok, failed, h, f) in parts {
        out.ok += ok;
        out.failed += failed;
        let _ = out.hist.add(&h);
        out.failures_at.extend(f);
    }
    out.failures_at.sort();
    out
}

/// Closed loop at saturation: `connections` connections for `warmup + duration`.
pub fn closed_loop(
    target: &Target,
    connections: usize,
    warmup: Duration,
    duration: Duration,
) -> std::io::Result<LoadResult> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let req: Arc<[u8]> = get_request(&target.host, &target.path).into();
    let t0 = Instant::now();
    let start = t0 + warmup;
    let end = start + duration;
    let parts = rt.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..connections {
            let addr = target.addrs[c % target.addrs.len()];
            let req = req.clone();
            tasks.push(tokio::spawn(closed_conn(addr, req, start, end)));
        }
        let mut parts = Vec::new();
        for t in tasks {
            if let Ok(p) = t.await {
                parts.push(p);
            }
        }
        parts
    });
    Ok(merge(parts, duration))
}

async fn exchange(
    s: &mut tokio::net::TcpStream,
    req: &[u8],
    buf: &mut Vec<u8>,
) -> std::io::Result<(u16, bool)> {
    s.write_all(req).await?;
    buf.clear();
    let mut chunk = [0u8; 8192];
    loop {
        match parse_response(buf) {
            Ok(Parse::Complete { status, close, .. }) => return Ok((status, close)),
            Ok(Parse::Incomplete) => {}
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn closed_conn(
    addr: SocketAddr,
    req: Arc<[u8]>,
    start: Instant,
    end: Instant,
) -> (u64, u64, Histogram<u64>, Vec<Duration>) {
    let mut hist = new_histogram();
    let (mut ok, mut failed, mut failures) = (0u64, 0u64, Vec::new());
    let mut conn: Option<tokio::net::TcpStream> = None;
    let mut buf = Vec::with_capacity(16 * 1024);
    loop {
        let t = Instant::now();
        if t >= end {
            break;
        }
        let counted = t >= start;
        let mut fail = |failed: &mut u64| {
            if counted {
                *failed += 1;
                failures.push(t - start);
            }
        };
        let s = match conn.as_mut() {
            Some(s) => s,
            None => match tokio::time::timeout(REQUEST_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    conn.insert(s)
                }
                _ => {
                    fail(&mut failed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
            },
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange(s, &req, &mut buf)).await {
            Ok(Ok((status, close))) => {
                if (200..300).contains(&status) {
                    if counted {
                        ok += 1;
                        let _ = hist.record(t.elapsed().as_nanos() as u64);
                    }
                } else {
                    fail(&mut failed);
                }
                if close {
                    conn = None;
                }
            }
            _ => {
                fail(&mut failed);
                conn = None;
            }
        }
    }
    (ok, failed, hist, failures)
}

/// Open loop: `rate` requests/s on a fixed schedule over `connections`
/// blocking connections, for `warmup + duration`.
pub fn open_loop(
    target: &Target,
    rate: f64,
    connections: usize,
    warmup: Duration,
    duration: Duration,
) -> LoadResult {
    let req: Arc<[u8]> = get_request(&target.host, &target.path).into();
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now() + Duration::from_millis(20);
    let start = t0 + warmup;
    let end = start + duration;
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    for c in 0..connections {
        let addr = target.addrs[c % target.addrs.len()];
        let (req, next, results) = (req.clone(), next.clone(), results.clone());
        threads.push(std::thread::spawn(move || {
            let part = open_conn(addr, &req, &next, rate, t0, start, end);
            if let Ok(mut r) = results.lock() {
                r.push(part);
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    let parts = results.lock().map(|mut r| std::mem::take(&mut *r)).unwrap_or_default();
    merge(parts, duration)
}

pub fn blocking_exchange(s: &mut TcpStream, req: &[u8], buf: &mut Vec<u8>) -> std::io::Result<(u16, bool)> {
    s.write_all(req)?;
    buf.clear();
    let mut chunk = [0u8; 8192];
    loop {
        match parse_response(buf) {
            Ok(Parse::Complete { status, close, .. }) => return Ok((status, close)),
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

fn open_conn(
    addr: SocketAddr,
    req: &[u8],
    next: &AtomicU64,
    rate: f64,
    t0: Instant,
    start: Instant,
    end: Instant,
) -> (u64, u64, Histogram<u64>, Vec<Duration>) {
    // SAFETY: prctl on the calling thread with integer arguments only.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong);
    }
    let mut hist = new_histogram();
    let (mut ok, mut failed, mut failures) = (0u64, 0u64, Vec::new());
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(16 * 1024);
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let due = t0 + Duration::from_secs_f64(i as f64 / rate);
        if due >= end {
            break;
        }
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let counted = due >= start;
        let mut fail = |failed: &mut u64| {
            if counted {
                *failed += 1;
                failures.push(due - start);
            }
        };
        let s = match conn.as_mut() {
            Some(s) => s,
            None => match TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(REQUEST_TIMEOUT));
                    conn.insert(s)
                }
                Err(_) => {
                    fail(&mut failed);
                    continue;
                }
            },
        };
        match blocking_exchange(s, req, &mut buf) {
            Ok((status, close)) => {
                if (200..300).contains(&status) {
                    if counted {
                        ok += 1;
                        let _ = hist.record(due.elapsed().as_nanos() as u64);
                    }
                } else {
                    fail(&mut failed);
                }
                if close {
                    conn = None;
                }
            }
            Err(_) => {
                fail(&mut failed);
                conn = None;
            }
        }
    }
    (ok, failed, hist, failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(ok: u64, latencies_ns: &[u64], elapsed_s: u64, failures_s: &[f64]) -> LoadResult {
        let mut r = LoadResult::empty();
        for l in latencies_ns {
            r.hist.record(*l).expect("within the bounds");
        }
        r.ok = ok;
        r.failed = failures_s.len() as u64;
        r.elapsed = Duration::from_secs(elapsed_s);
        r.failures_at = failures_s.iter().map(|s| Duration::from_secs_f64(*s)).collect();
        r
    }

    #[test]
    fn appending_windows_sums_them_and_keeps_failure_times_in_order() {
        let mut all = LoadResult::empty();
        all.append(window(2, &[1_000, 3_000], 3, &[1.0]));
        all.append(window(1, &[2_000], 3, &[0.5, 2.0]));
        assert_eq!((all.ok, all.failed), (3, 3));
        assert_eq!(all.elapsed, Duration::from_secs(6));
        assert_eq!(all.hist.len(), 3);
        assert!(all.hist.equivalent(all.hist.max(), 3_000), "max {}", all.hist.max());
        let at: Vec<f64> = all.failures_at.iter().map(Duration::as_secs_f64).collect();
        assert_eq!(at, vec![1.0, 3.5, 5.0]);
        assert!((all.rps() - 0.5).abs() < 1e-9);
    }
}
