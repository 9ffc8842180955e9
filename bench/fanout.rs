//! The fan-out benchmark: `clients` WebSocket clients subscribed to one
//! timestamped feed, either straight to the source (`direct`: the source
//! sends every client its own copy) or through an upgate fan-out route (one
//! upstream connection). Each message carries its send time in its first 8
//! bytes, so every delivery gives a latency sample.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
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
    connected: AtomicUsize,
    failed: AtomicUsize,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A subscribed socket and what was read past its handshake.
type Subscribed = (std::net::TcpStream, Vec<u8>);

/// One subscriber: connect and handshake, then hand the socket to the reader.
async fn subscriber(
    addr: SocketAddr,
    path: Arc<str>,
    sh: Arc<Shared>,
    to_reader: std::sync::mpsc::Sender<Subscribed>,
) {
    let mut buf = Vec::with_capacity(4096);
    let s = async {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        proto::client_handshake(&mut s, "localhost", &path, &mut buf).await?;
        s.into_std()
    };
    let handed = match tokio::time::timeout(Duration::from_secs(30), s).await {
        Ok(Ok(s)) => to_reader.send((s, buf)).is_ok(),
        _ => false,
    };
    let n = if handed { &sh.connected } else { &sh.failed };
    n.fetch_add(1, Ordering::Relaxed);
}

/// Reads every subscriber from one thread over one epoll set (mio, edge
/// triggered): a read per readiness, no task or waker per client. The load
/// generator then spends little more than the read(2) itself per delivery,
/// so at the table's rates it stays well below its core and its own
/// queueing is not what the latency column measures. Returns the latency
/// histogram of what was read while `recording`.
fn reader(
    from: std::sync::mpsc::Receiver<Subscribed>,
    sh: Arc<Shared>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<Histogram<u64>> {
    use mio::{Events, Interest, Poll, Token};
    use std::io::Read;
    let mut hist = Histogram::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut conns: Vec<(mio::net::TcpStream, Vec<u8>)> = Vec::new();
    let mut tmp = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        while let Ok((s, buf)) = from.try_recv() {
            let mut s = mio::net::TcpStream::from_std(s);
            // Data already queued is reported at registration (edge-triggered
            // epoll checks the socket when it is added).
            poll.registry()
                .register(&mut s, Token(conns.len()), Interest::READABLE)?;
            conns.push((s, buf));
        }
        poll.poll(&mut events, Some(Duration::from_millis(20)))?;
        let recording = sh.recording.load(Ordering::Relaxed);
        for ev in events.iter() {
            let Some((s, buf)) = conns.get_mut(ev.token().0) else {
                continue;
            };
            loop {
                let n = match s.read(&mut tmp) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // WouldBlock: the next edge brings more; an error: the client is done.
                    Err(_) => break,
                };
                buf.extend_from_slice(&tmp[..n]);
                let now = now_ns();
                let mut at = 0;
                let mut count = 0u64;
                while let Some(f) = proto::parse(&buf[at..]) {
                    if f.opcode == proto::OP_BINARY && f.len >= 8 && recording {
                        let mut ts = [0u8; 8];
                        ts.copy_from_slice(&buf[at + f.start..at + f.start + 8]);
                        let _ =
                            hist.record((now.saturating_sub(u64::from_le_bytes(ts)) / 1000).max(1));
                        count += 1;
                    }
                    at += f.end();
                }
                buf.drain(..at);
                if count > 0 {
                    sh.deliveries.fetch_add(count, Ordering::Relaxed);
                }
            }
        }
    }
    Ok(hist)
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
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let (to_reader, from) = std::sync::mpsc::channel();
    let reading = {
        let (sh, stop) = (sh.clone(), stop.clone());
        std::thread::spawn(move || reader(from, sh, stop))
    };
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
            tasks.spawn(subscriber(
                addr,
                path.clone(),
                sh.clone(),
                to_reader.clone(),
            ));
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
    // The reader sees `stop` within one poll timeout and closes every socket.
    let h = tokio::task::spawn_blocking(move || reading.join())
        .await
        .ok()
        .and_then(|r| r.ok())
        .and_then(|r| r.map_err(|e| eprintln!("fan-out reader: {e}")).ok())
        .unwrap_or_else(|| Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"));
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
