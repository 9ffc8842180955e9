//! CPU time and resident memory of a process and its descendants, from /proc.

use std::collections::HashMap;
use std::sync::OnceLock;

/// A `getconf` value, read once per name by the caller's `OnceLock`.
fn getconf(name: &str, default: f64) -> f64 {
    std::process::Command::new("getconf")
        .arg(name)
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(default)
}

fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| getconf("CLK_TCK", 100.0))
}

fn page_kib() -> u64 {
    static PAGE: OnceLock<f64> = OnceLock::new();
    (*PAGE.get_or_init(|| getconf("PAGESIZE", 4096.0)) / 1024.0) as u64
}

/// Fields of /proc/PID/stat after the command name.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// `root` and every process descending from it.
pub fn tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(ppid) =
                stat_fields(pid).and_then(|f| f.get(1).and_then(|p| p.parse::<u32>().ok()))
            {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c);
        }
        i += 1;
    }
    out
}

/// User + system CPU seconds of the tree.
pub fn cpu_secs(root: u32) -> Option<f64> {
    let mut total = 0.0;
    for pid in tree(root) {
        let f = stat_fields(pid)?;
        // utime and stime are fields 14 and 15 of stat; 11 and 12 after the name.
        let ut: f64 = f.get(11)?.parse().ok()?;
        let st: f64 = f.get(12)?.parse().ok()?;
        total += (ut + st) / clock_ticks();
    }
    Some(total)
}

/// Busy seconds of each core (user, nice, system, irq and softirq time from
/// /proc/stat; idle, I/O wait and steal left out): what every process on the
/// core, and the kernel's network processing there, spent.
pub fn core_busy_secs() -> Option<Vec<f64>> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks = core_busy_ticks(&s)?;
    Some(ticks.into_iter().map(|t| t / clock_ticks()).collect())
}

/// Each core's busy clock ticks in the text of /proc/stat.
fn core_busy_ticks(stat: &str) -> Option<Vec<f64>> {
    let mut out = Vec::new();
    for l in stat.lines() {
        let Some(rest) = l.strip_prefix("cpu") else {
            continue;
        };
        // The first line, `cpu `, is the sum.
        if rest.starts_with(' ') {
            continue;
        }
        let f: Vec<f64> = rest
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...
        out.push(f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?);
    }
    Some(out)
}

/// Resident memory of the tree in KiB.
pub fn rss_kib(root: u32) -> Option<u64> {
    let mut total = 0;
    for pid in tree(root) {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
        total += line.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// The kernel's memory for TCP sockets, system-wide, in KiB: socket
/// buffers (`/proc/net/sockstat`'s TCP `mem`, in pages) and the socket
/// structures themselves (slab caches `TCP`, `TCPv6` and
/// `sock_inode_cache`, active objects × object size, `/proc/slabinfo`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KernelSockets {
    pub tcp_sockets: u64,
    pub buffers_kib: u64,
    pub slab_kib: u64,
}

impl KernelSockets {
    pub fn read() -> Option<Self> {
        let sockstat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
        let slabinfo = std::fs::read_to_string("/proc/slabinfo").unwrap_or_default();
        Self::parse(&sockstat, &slabinfo, page_kib())
    }

    fn parse(sockstat: &str, slabinfo: &str, page_kib: u64) -> Option<Self> {
        let tcp = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
        let field = |name: &str| -> Option<u64> {
            let mut it = tcp.split_whitespace();
            it.find(|w| *w == name)?;
            it.next()?.parse().ok()
        };
        let mut slab_bytes = 0u64;
        for l in slabinfo.lines() {
            let mut it = l.split_whitespace();
            let Some(name) = it.next() else { continue };
            if !matches!(name, "TCP" | "TCPv6" | "sock_inode_cache") {
                continue;
            }
            let active: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            let size: u64 = it.nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            slab_bytes = slab_bytes.saturating_add(active.saturating_mul(size));
        }
        Some(KernelSockets {
            tcp_sockets: field("inuse")?,
            buffers_kib: field("mem")?.saturating_mul(page_kib),
            slab_kib: slab_bytes / 1024,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_socket_memory_is_read_from_sockstat_and_slabinfo() {
        let sockstat = "sockets: used 18861\n\
                        TCP: inuse 18850 orphan 0 tw 74525 alloc 18850 mem 109\n\
                        UDP: inuse 0 mem 0\n";
        let slabinfo = "slabinfo - version: 2.1\n\
                        # name <active_objs> <num_objs> <objsize> ...\n\
                        request_sock_TCP 120 180 320 12 1 : tunables 0 0 0\n\
                        TCP 1000 1300 2368 13 8 : tunables 0 0 0\n\
                        TCPv6 2 13 2560 12 8 : tunables 0 0 0\n\
                        sock_inode_cache 1024 1900 832 19 4 : tunables 0 0 0\n";
        let k = KernelSockets::parse(sockstat, slabinfo, 4).expect("parsed");
        assert_eq!(k.tcp_sockets, 18850);
        assert_eq!(k.buffers_kib, 436);
        assert_eq!(k.slab_kib, (1000 * 2368 + 2 * 2560 + 1024 * 832) / 1024);
        assert_eq!(KernelSockets::parse("UDP: inuse 0\n", slabinfo, 4), None);
        assert!(KernelSockets::read().is_some());
    }

    #[test]
    fn busy_ticks_leave_idle_iowait_and_steal_out() {
        let stat = "cpu  10 20 30 4000 50 6 7 800 0 0\n\
                    cpu0 1 2 3 1000 5 6 7 80 0 0\n\
                    cpu1 9 18 27 3000 45 0 0 720 0 0\n\
                    intr 12345\n\
                    ctxt 678\n";
        assert_eq!(core_busy_ticks(stat), Some(vec![19.0, 54.0]));
        assert_eq!(core_busy_ticks("cpu0 1 2\n"), None);
        let now = core_busy_secs().expect("/proc/stat");
        assert!(!now.is_empty());
    }
}
