//! The fan-out benchmark: `clients` WebSocket clients subscribed to one
//! timestamped feed, either straight to the source (`direct`: the source
//! sends every client its own copy) or through an upgate fan-out route (one
//! upstream connection). Each message carries its send time in its first 8
//! bytes, so every delivery gives a latency sample.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::proc_stat;
use crate::proto;

/// One measured run.
pub struct Run {
    pub clients: usize,
    pub failed: usize,
    pub secs: f64,
    pub deliveries: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU seconds over the window: the process serving the clients, and the source.
    pub server_cpu: Option<f64>,
    pub source_cpu: Option<f64>,
    /// This load generator's own CPU seconds over the window.
    pub loadgen_cpu: Option<f64>,
    /// RSS growth of the serving process per connected client (KiB).
    pub kib_per_client: Option<f64>,
    /// Connections the source holds.
    pub source_conns: usize,
}

impl Run {
    pub fn rate(&self) -> f64 {
        self.deliveries as f64 / self.secs
    }
}

struct Shared {
    recording: AtomicBool,
    deliveries: AtomicU64,
    hist: Mutex<Histogram<u64>>,
    connected: AtomicUsize,
    failed: AtomicUsize,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One subscriber: handshake, then read frames and record their latency.
async fn subscriber(addr: SocketAddr, path: Arc<str>, sh: Arc<Shared>, stop: Arc<AtomicBool>) {
    let mut buf = Vec::with_capacity(4096);
    let s = async {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        proto::client_handshake(&mut s, "localhost", &path, &mut buf).await?;
        Ok::<_, std::io::Error>(s)
    };
    let mut s = match tokio::time::timeout(Duration::from_secs(30), s).await {
        Ok(Ok(s)) => s,
        _ => {
            sh.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    sh.connected.fetch_add(1, Ordering::Relaxed);
    let mut tmp = vec![0u8; 16 * 1024];
    let mut lat = Vec::with_capacity(64);
    while !stop.load(Ordering::Relaxed) {
        let n = match s.read(&mut tmp).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&tmp[..n]);
        let recording = sh.recording.load(Ordering::Relaxed);
        let now = now_ns();
        let mut at = 0;
        let mut count = 0u64;
        while let Some(f) = proto::parse(&buf[at..]) {
            if f.opcode == proto::OP_BINARY && f.len >= 8 && recording {
                let p = &buf[at + f.start..at + f.start + 8];
                let mut ts = [0u8; 8];
                ts.copy_from_slice(p);
                lat.push(now.saturating_sub(u64::from_le_bytes(ts)) / 1000);
                count += 1;
            }
            at += f.end();
        }
        buf.drain(..at);
        if count > 0 {
            sh.deliveries.fetch_add(count, Ordering::Relaxed);
            if let Ok(mut h) = sh.hist.lock() {
                for l in lat.drain(..) {
                    let _ = h.record(l.max(1));
                }
            }
        }
    }
}

/// Connects `n` subscribers to `addr` + `path`, lets them settle for
/// `warm`, then measures for `dur`. `server` serves the clients (upgate,
/// or the source itself for direct); `source` is the feed process.
/// The processes a run watches.
pub struct Watch {
    /// Serve the clients: upgate (a core and its edges for tiers), or the
    /// source itself for direct; their CPU and RSS are summed.
    pub server: Vec<u32>,
    /// The feed.
    pub source: Option<u32>,
    pub source_port: u16,
}

pub async fn run(
    addrs: &[SocketAddr],
    path: &str,
    n: usize,
    (warm, dur): (Duration, Duration),
    w: Watch,
) -> Run {
    let Watch {
        server,
        source,
        source_port,
    } = w;
    let sh = Arc::new(Shared {
        recording: AtomicBool::new(false),
        deliveries: AtomicU64::new(0),
        hist: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")),
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let path: Arc<str> = path.into();
    let sum_rss =
        |pids: &[u32]| -> Option<u64> { pids.iter().map(|p| proc_stat::rss_kib(*p)).sum() };
    let sum_cpu =
        |pids: &[u32]| -> Option<f64> { pids.iter().map(|p| proc_stat::cpu_secs(*p)).sum() };
    let rss_before = sum_rss(&server);
    let mut tasks = tokio::task::JoinSet::new();
    // Connect in waves so the accept backlog never overflows.
    for chunk in 0..n.div_ceil(500) {
        let k = 500.min(n - chunk * 500);
        for i in 0..k {
            let addr = addrs[(chunk * 500 + i) % addrs.len()];
            tasks.spawn(subscriber(addr, path.clone(), sh.clone(), stop.clone()));
        }
        let target = (chunk * 500 + k).saturating_sub(50);
        let t0 = Instant::now();
        while sh.connected.load(Ordering::Relaxed) + sh.failed.load(Ordering::Relaxed) < target
            && t0.elapsed() < Duration::from_secs(30)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let t0 = Instant::now();
    while sh.connected.load(Ordering::Relaxed) + sh.failed.load(Ordering::Relaxed) < n
        && t0.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(warm).await;
    let rss_after = sum_rss(&server);
    let me = std::process::id();
    let cpu0 = (sum_cpu(&server), source.and_then(proc_stat::cpu_secs));
    let me0 = proc_stat::cpu_secs(me);
    sh.recording.store(true, Ordering::Relaxed);
    let t = Instant::now();
    tokio::time::sleep(dur).await;
    sh.recording.store(false, Ordering::Relaxed);
    let secs = t.elapsed().as_secs_f64();
    let cpu1 = (sum_cpu(&server), source.and_then(proc_stat::cpu_secs));
    let me1 = proc_stat::cpu_secs(me);
    let deliveries = sh.deliveries.load(Ordering::Relaxed);
    let source_conns = established_on(source_port);
    stop.store(true, Ordering::Relaxed);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let h = sh
        .hist
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|e| e.into_inner().clone());
    let connected = sh.connected.load(Ordering::Relaxed);
    Run {
        clients: connected,
        failed: sh.failed.load(Ordering::Relaxed),
        secs,
        deliveries,
        p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
        server_cpu: cpu1.0.zip(cpu0.0).map(|(b, a)| b - a),
        source_cpu: cpu1.1.zip(cpu0.1).map(|(b, a)| b - a),
        // The tree includes the processes this one started.
        loadgen_cpu: me1.zip(me0).map(|(b, a)| {
            let children = cpu1.0.zip(cpu0.0).map_or(0.0, |(b, a)| b - a)
                + if source.is_some_and(|s| server.contains(&s)) {
                    0.0
                } else {
                    cpu1.1.zip(cpu0.1).map_or(0.0, |(b, a)| b - a)
                };
            b - a - children
        }),
        kib_per_client: rss_before
            .zip(rss_after)
            .map(|(b, a)| (a.saturating_sub(b)) as f64 / connected.max(1) as f64),
        source_conns,
    }
}

/// Established TCP connections whose local port is `port` (the source's
/// side of each connection), from /proc/net/tcp.
fn established_on(port: u16) -> usize {
    std::fs::read_to_string("/proc/net/tcp").map_or(0, |t| {
        t.lines()
            .skip(1)
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3
                    && f[3] == "01"
                    && f[1]
                        .rsplit_once(':')
                        .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                        == Some(port)
            })
            .count()
    })
}
