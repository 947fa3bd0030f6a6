//! CPU time and memory of a process tree, read from /proc.
//!
//! A tree because nginx does its work in a child of the process the harness
//! starts; for the others the tree is the one process.

use std::time::Duration;

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// (utime, stime) in ticks, from /proc/<pid>/stat.
fn cpu_ticks(pid: i32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime, stime))
}

use trellis_tests::process::tree;

/// CPU time used so far by a process tree, split by mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    pub user: Duration,
    /// The kernel's share: system calls, and on loopback much of the network
    /// stack, which runs in the sender's system time.
    pub system: Duration,
}

impl CpuTimes {
    pub fn total(self) -> Duration {
        self.user + self.system
    }

    pub fn since(self, earlier: CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

/// CPU time used so far by the tree of `pid`, by mode.
pub fn cpu_times(pid: i32) -> CpuTimes {
    let (u, s) =
        tree(pid).iter().filter_map(|p| cpu_ticks(*p)).fold((0, 0), |(u, s), (pu, ps)| (u + pu, s + ps));
    let secs = |t: u64| Duration::from_secs_f64(t as f64 / clock_ticks());
    CpuTimes { user: secs(u), system: secs(s) }
}

/// CPU time (user + system) used so far by the tree of `pid`.
pub fn cpu_time(pid: i32) -> Duration {
    cpu_times(pid).total()
}

fn status_kib(pid: i32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

/// Resident memory now, KiB, summed over the tree.
pub fn rss_kib(pid: i32) -> u64 {
    tree(pid).iter().filter_map(|p| status_kib(*p, "VmRSS:")).sum()
}

/// Peak resident memory (VmHWM), KiB, summed over the tree.
pub fn peak_rss_kib(pid: i32) -> u64 {
    tree(pid).iter().filter_map(|p| status_kib(*p, "VmHWM:")).sum()
}

/// Busy and total jiffies per CPU, from /proc/stat.
pub fn cpu_jiffies() -> Vec<(u64, u64)> {
    cpu_jiffies_and_steal().0
}

/// [`cpu_jiffies`] and, from the same reading, the jiffies each CPU had
/// stolen by the hypervisor so far: time this virtual machine's CPU wanted to
/// run and the host ran something else. Steal counts as busy in the first;
/// nothing in the machine can see it otherwise, and a process under test
/// stands still while it lasts.
pub fn cpu_jiffies_and_steal() -> (Vec<(u64, u64)>, Vec<u64>) {
    let cpus = per_cpu(&read_stat());
    (
        cpus.iter().map(|c| (c.total.saturating_sub(c.idle), c.total)).collect(),
        cpus.iter().map(|c| c.steal).collect(),
    )
}

fn read_stat() -> String {
    std::fs::read_to_string("/proc/stat").unwrap_or_default()
}

/// One `cpuN` line of `/proc/stat`, in jiffies.
struct CpuLine {
    /// user, nice, system, idle, iowait, irq, softirq and steal together.
    total: u64,
    /// idle and iowait.
    idle: u64,
    steal: u64,
}

fn per_cpu(stat: &str) -> Vec<CpuLine> {
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(|b| b.is_ascii_digit()))
        .map(|l| {
            let v: Vec<u64> = l.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
            let at = |i: usize| v.get(i).copied().unwrap_or(0);
            CpuLine { total: v.iter().take(8).sum(), idle: at(3) + at(4), steal: at(7) }
        })
        .collect()
}

/// Busy share of each CPU between two [`cpu_jiffies`] readings, in percent.
pub fn busy_percent(before: &[(u64, u64)], after: &[(u64, u64)]) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|((b0, t0), (b1, t1))| {
            let dt = t1.saturating_sub(*t0).max(1) as f64;
            100.0 * b1.saturating_sub(*b0) as f64 / dt
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id() as i32;
        assert!(rss_kib(me) > 0);
        assert!(peak_rss_kib(me) > 0);
        // CPU time moves in clock ticks and the machine may be busy: spin
        // until it moves, within a generous bound.
        let spin = std::time::Instant::now();
        while cpu_time(me) == Duration::ZERO && spin.elapsed() < Duration::from_secs(10) {}
        assert!(cpu_time(me) > Duration::ZERO);
        assert!(!cpu_jiffies().is_empty());
        let (jiffies, steal) = cpu_jiffies_and_steal();
        assert_eq!(steal.len(), jiffies.len());
    }

    #[test]
    fn reads_each_cpu_line_with_its_steal() {
        let stat = "cpu  30 0 20 400 5 1 2 12 0 0\n\
                    cpu0 10 0 5 200 1 0 1 7 0 0\n\
                    cpu1 20 0 15 200 4 1 1 5 0 0\n\
                    intr 12345\n";
        let cpus = per_cpu(stat);
        assert_eq!(cpus.len(), 2, "the summary line is not a CPU");
        assert_eq!((cpus[0].total, cpus[0].idle, cpus[0].steal), (224, 201, 7));
        assert_eq!((cpus[1].total, cpus[1].idle, cpus[1].steal), (246, 204, 5));
    }

    #[test]
    fn times_since_an_earlier_reading_split_by_mode() {
        let s = |ms| Duration::from_millis(ms);
        let before = CpuTimes { user: s(100), system: s(300) };
        let after = CpuTimes { user: s(150), system: s(420) };
        assert_eq!(after.since(before), CpuTimes { user: s(50), system: s(120) });
        assert_eq!(after.since(before).total(), s(170));
        // A process tree that lost a child reads lower: no underflow.
        assert_eq!(before.since(after), CpuTimes::default());
    }
}
