//! The load generator: throughput, handshake-rate and idle scenarios against
//! one target, with the target's CPU and RSS read from /proc over the window.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::proc_stat;
use crate::proto;

/// Where the load goes.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
    /// TLS client config and SNI, when the target terminates TLS.
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// The process whose CPU and memory are measured (its children included).
    pub pid: Option<u32>,
    /// When set, handshake `i` uses `paths[i % len]` instead of `path`.
    pub paths: Arc<Vec<String>>,
}

pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    pub(crate) async fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(b).await,
            Stream::Tls(s) => s.read(b).await,
        }
    }
    pub(crate) async fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(b).await,
            Stream::Tls(s) => {
                s.write_all(b).await?;
                s.flush().await
            }
        }
    }
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }
}

/// Source addresses for many connections: 127.0.1.1, 127.0.1.2, …
pub fn source_ip(i: usize, sources: usize) -> Option<IpAddr> {
    (sources > 1).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1 + (i % sources) as u8)))
}

async fn tcp_connect(addr: SocketAddr, src: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let s = match src {
        None => {
            return TcpStream::connect(addr)
                .await
                .inspect(|s| drop(s.set_nodelay(true)))
        }
        Some(ip) => {
            let sock = TcpSocket::new_v4()?;
            sock.bind(SocketAddr::new(ip, 0))?;
            sock.connect(addr).await?
        }
    };
    s.set_nodelay(true)?;
    Ok(s)
}

/// TCP (+TLS) connect and WebSocket upgrade. Leftover bytes are in `buf`.
pub async fn open(t: &Target, src: Option<IpAddr>, buf: &mut Vec<u8>) -> std::io::Result<Stream> {
    let tcp = tcp_connect(t.addr, src).await?;
    let mut s = match &t.tls {
        None => Stream::Plain(tcp),
        Some((cfg, name)) => {
            let c = tokio_rustls::TlsConnector::from(cfg.clone());
            Stream::Tls(Box::new(c.connect(name.clone(), tcp).await?))
        }
    };
    match &mut s {
        Stream::Plain(x) => proto::client_handshake(x, &t.host, &t.path, buf).await?,
        Stream::Tls(x) => proto::client_handshake(x.as_mut(), &t.host, &t.path, buf).await?,
    }
    Ok(s)
}

const WARMING: u8 = 0;
const MEASURING: u8 = 1;
const STOPPING: u8 = 2;

struct Shared {
    phase: AtomicU8,
    msgs: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    base: Instant,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            phase: AtomicU8::new(WARMING),
            msgs: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            base: Instant::now(),
        }
    }

    /// Merges the tasks' histograms into the run's result.
    async fn finish(&self, mut tasks: tokio::task::JoinSet<Histogram<u64>>, w: Window) -> Measured {
        let mut hist = new_hist();
        while let Some(r) = tasks.join_next().await {
            if let Ok(h) = r {
                let _ = hist.add(h);
            }
        }
        Measured {
            secs: w.secs,
            count: self.msgs.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            p50_us: hist.value_at_quantile(0.5) as f64,
            p99_us: hist.value_at_quantile(0.99) as f64,
            p999_us: hist.value_at_quantile(0.999) as f64,
            cpu_secs: w.cpu,
            cores_secs: w.cores,
        }
    }
}

/// What one scenario run measured.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    pub secs: f64,
    /// Echoed messages (throughput) or completed handshakes.
    pub count: u64,
    pub bytes: u64,
    pub errors: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// CPU seconds the target used in the window (None without a pid).
    pub cpu_secs: Option<f64>,
    /// Busy seconds of each core in the window (the proxy's, then the load
    /// generator's and backend's).
    pub cores_secs: Vec<f64>,
}

impl Measured {
    pub fn rate(&self) -> f64 {
        self.count as f64 / self.secs
    }
    pub fn mib_s(&self) -> f64 {
        self.bytes as f64 / self.secs / (1024.0 * 1024.0)
    }
    /// Each core's busy microseconds per counted unit.
    pub fn cores_us_per(&self) -> Vec<f64> {
        let n = self.count.max(1) as f64;
        self.cores_secs.iter().map(|c| c * 1e6 / n).collect()
    }
    /// Target CPU microseconds per counted unit.
    pub fn cpu_us_per(&self) -> Option<f64> {
        self.cpu_secs
            .filter(|_| self.count > 0)
            .map(|c| c * 1e6 / self.count as f64)
    }
}

async fn window(shared: &Shared, t: &Target, warmup: Duration, dur: Duration) -> Window {
    tokio::time::sleep(warmup).await;
    let cpu0 = t.pid.and_then(proc_stat::cpu_secs);
    let cores0 = proc_stat::core_busy_secs();
    let t0 = Instant::now();
    shared.phase.store(MEASURING, Ordering::SeqCst);
    tokio::time::sleep(dur).await;
    shared.phase.store(STOPPING, Ordering::SeqCst);
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = t.pid.and_then(proc_stat::cpu_secs);
    let cores = cores0
        .zip(proc_stat::core_busy_secs())
        .map(|(a, b)| b.iter().zip(a).map(|(b, a)| b - a).collect())
        .unwrap_or_default();
    Window {
        secs,
        cpu: cpu0.zip(cpu1).map(|(a, b)| b - a),
        cores,
    }
}

/// The measured window: its length, the target's CPU seconds, and each
/// core's busy seconds.
struct Window {
    secs: f64,
    cpu: Option<f64>,
    cores: Vec<f64>,
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// `conns` connections, each keeping `window` messages of `size` bytes in flight.
pub async fn throughput(
    t: &Target,
    conns: usize,
    size: usize,
    win: usize,
    warmup: Duration,
    dur: Duration,
) -> Measured {
    let shared = Arc::new(Shared::new());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let (t, sh) = (t.clone(), shared.clone());
        tasks.spawn(async move {
            match pump(&t, &sh, size.max(8), win.max(1)).await {
                Ok(h) => h,
                Err(_) => {
                    sh.errors.fetch_add(1, Ordering::Relaxed);
                    new_hist()
                }
            }
        });
    }
    let w = window(&shared, t, warmup, dur).await;
    shared.finish(tasks, w).await
}

async fn pump(t: &Target, sh: &Shared, size: usize, win: usize) -> std::io::Result<Histogram<u64>> {
    let mut hist = new_hist();
    let mut buf = Vec::with_capacity(size * 2 + 64);
    let mut s = open(t, None, &mut buf).await?;
    let mut payload = vec![b'x'; size];
    let mut out = Vec::with_capacity((size + 14) * win);
    let stamp = |p: &mut [u8]| {
        let ns = sh.base.elapsed().as_nanos() as u64;
        p[..8].copy_from_slice(&ns.to_le_bytes());
    };
    for _ in 0..win {
        stamp(&mut payload);
        proto::put_frame(&mut out, proto::OP_BINARY, &payload, true);
    }
    s.write_all(&out).await?;
    out.clear();
    let mut in_flight = win;
    let mut tmp = vec![0u8; (size + 14).clamp(16 * 1024, 256 * 1024)];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut tmp))
            .await
            .map_err(|_| std::io::Error::other("no echo for 10 s"))??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
        let phase = sh.phase.load(Ordering::Relaxed);
        let mut at = 0;
        let now = sh.base.elapsed().as_nanos() as u64;
        while let Some(f) = proto::parse(&buf[at..]) {
            let p = &buf[at + f.start..at + f.end()];
            if phase == MEASURING && p.len() >= 8 {
                let sent = u64::from_le_bytes(p[..8].try_into().unwrap_or_default());
                let _ = hist.record(now.saturating_sub(sent).max(1000) / 1000);
                sh.msgs.fetch_add(1, Ordering::Relaxed);
                sh.bytes.fetch_add(p.len() as u64, Ordering::Relaxed);
            }
            in_flight -= 1;
            if phase != STOPPING {
                stamp(&mut payload);
                proto::put_frame(&mut out, proto::OP_BINARY, &payload, true);
                in_flight += 1;
            }
            at += f.end();
        }
        buf.drain(..at);
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
        if phase == STOPPING && in_flight == 0 {
            return Ok(hist);
        }
    }
}

/// Handshakes per second: connect, upgrade, one echo, close; `workers` at a time.
pub async fn handshakes(t: &Target, workers: usize, warmup: Duration, dur: Duration) -> Measured {
    let shared = Arc::new(Shared::new());
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (t, sh) = (t.clone(), shared.clone());
        tasks.spawn(async move {
            let mut hist = new_hist();
            let mut i = w;
            while sh.phase.load(Ordering::Relaxed) != STOPPING {
                let started = Instant::now();
                let ok = tokio::time::timeout(
                    Duration::from_secs(10),
                    one_handshake(&t, source_ip(i, 8), i),
                )
                .await
                .is_ok_and(|r| r.is_ok());
                i += workers;
                if sh.phase.load(Ordering::Relaxed) == MEASURING {
                    if ok {
                        sh.msgs.fetch_add(1, Ordering::Relaxed);
                        let _ = hist.record(started.elapsed().as_micros().max(1) as u64);
                    } else {
                        sh.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            hist
        });
    }
    let w = window(&shared, t, warmup, dur).await;
    shared.finish(tasks, w).await
}

async fn echo_once(s: &mut Stream, buf: &mut Vec<u8>, payload: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(64);
    proto::put_frame(&mut out, proto::OP_TEXT, payload, true);
    s.write_all(&out).await?;
    let mut tmp = [0u8; 512];
    loop {
        if let Some(f) = proto::parse(buf) {
            let ok = f.opcode == proto::OP_TEXT && &buf[f.start..f.end()] == payload;
            buf.drain(..f.end());
            return if ok {
                Ok(())
            } else {
                Err(std::io::Error::other("wrong echo"))
            };
        }
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

async fn one_handshake(t: &Target, src: Option<IpAddr>, i: usize) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut s = if t.paths.is_empty() {
        open(t, src, &mut buf).await?
    } else {
        let mut t = t.clone();
        t.path = t.paths[i % t.paths.len()].clone();
        open(&t, src, &mut buf).await?
    };
    echo_once(&mut s, &mut buf, b"hello").await?;
    let mut out = Vec::with_capacity(16);
    proto::put_frame(&mut out, proto::OP_CLOSE, &1000u16.to_be_bytes(), true);
    s.write_all(&out).await?;
    // Wait for the close reply or EOF, then reset: no TIME_WAIT on the client side.
    let mut tmp = [0u8; 256];
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut tmp)).await;
    let _ = s.tcp().set_zero_linger();
    Ok(())
}

/// Result of holding idle connections.
#[derive(Debug, Clone, Default)]
pub struct Idle {
    pub opened: usize,
    pub failed_open: usize,
    pub echoed: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// RSS once every connection was closed (after `settle`).
    pub rss_closed_kib: u64,
    /// RSS `linger` after that, when asked for.
    pub rss_later_kib: Option<u64>,
    /// The kernel's TCP socket memory (system-wide) before opening and
    /// while every connection was held.
    pub kernel: Option<(proc_stat::KernelSockets, proc_stat::KernelSockets)>,
}

impl Idle {
    pub fn kib_per_conn(&self) -> f64 {
        (self.rss_after_kib.saturating_sub(self.rss_before_kib)) as f64 / self.opened.max(1) as f64
    }

    /// The share of the growth given back to the system at `rss` (1.0: all).
    pub fn returned(&self, rss: u64) -> f64 {
        let grew = self
            .rss_after_kib
            .saturating_sub(self.rss_before_kib)
            .max(1) as f64;
        (self.rss_after_kib.saturating_sub(rss) as f64 / grew).min(1.0)
    }
}

/// Opens `n` connections (from `sources` loopback source addresses), lets them
/// sit idle, measures the target's RSS growth, then checks every one still echoes.
/// After every connection was closed, RSS is read after `settle` and, with
/// `linger`, once more that much later (does the allocator give memory back?).
pub async fn idle(
    t: &Target,
    n: usize,
    sources: usize,
    settle: Duration,
    linger: Option<Duration>,
) -> Idle {
    let rss_before_kib = t.pid.and_then(proc_stat::rss_kib).unwrap_or(0);
    let kernel_before = proc_stat::KernelSockets::read();
    let mut conns: Vec<(Stream, Vec<u8>)> = Vec::with_capacity(n);
    let mut failed_open = 0;
    let mut pending = tokio::task::JoinSet::new();
    let mut next = 0;
    // Open at most 256 at a time so the accept queues never overflow.
    while next < n || !pending.is_empty() {
        while next < n && pending.len() < 256 {
            let t = t.clone();
            let src = source_ip(next, sources);
            pending.spawn(async move {
                let mut buf = Vec::new();
                let r =
                    tokio::time::timeout(Duration::from_secs(20), open(&t, src, &mut buf)).await;
                match r {
                    Ok(Ok(s)) => Some((s, buf)),
                    _ => None,
                }
            });
            next += 1;
        }
        match pending.join_next().await {
            Some(Ok(Some(c))) => conns.push(c),
            Some(_) => failed_open += 1,
            None => {}
        }
    }
    tokio::time::sleep(settle).await;
    let rss_after_kib = t.pid.and_then(proc_stat::rss_kib).unwrap_or(0);
    let kernel = kernel_before.zip(proc_stat::KernelSockets::read());
    let opened = conns.len();
    // Every held connection must still echo.
    let mut echoed = 0;
    let mut checks = tokio::task::JoinSet::new();
    let mut it = conns.into_iter();
    loop {
        while checks.len() < 512 {
            let Some((mut s, mut buf)) = it.next() else {
                break;
            };
            checks.spawn(async move {
                tokio::time::timeout(
                    Duration::from_secs(20),
                    echo_once(&mut s, &mut buf, b"still there?"),
                )
                .await
                .is_ok_and(|r| r.is_ok())
            });
        }
        match checks.join_next().await {
            Some(Ok(true)) => echoed += 1,
            Some(_) => {}
            None => break,
        }
    }
    // Every connection is closed now (each check task owned one).
    tokio::time::sleep(settle).await;
    let rss_closed_kib = t.pid.and_then(proc_stat::rss_kib).unwrap_or(0);
    let mut rss_later_kib = None;
    if let Some(l) = linger {
        tokio::time::sleep(l).await;
        rss_later_kib = t.pid.and_then(proc_stat::rss_kib);
    }
    Idle {
        opened,
        failed_open,
        echoed,
        rss_before_kib,
        rss_after_kib,
        rss_closed_kib,
        rss_later_kib,
        kernel,
    }
}

/// Opens `n` connections and keeps them open for `hold`, reading and
/// discarding what arrives (fan-out subscribers, sessions held through a
/// rolling restart). Returns (opened, ended before `hold` was over, bytes
/// received).
pub async fn hold(t: &Target, n: usize, hold: Duration) -> (usize, usize, u64) {
    let until = tokio::time::Instant::now() + hold;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let t = t.clone();
        tasks.spawn(async move {
            let mut buf = Vec::new();
            let Ok(Ok(mut s)) =
                tokio::time::timeout(Duration::from_secs(10), open(&t, None, &mut buf)).await
            else {
                return None;
            };
            let mut got = buf.len() as u64;
            let mut b = vec![0u8; 4096];
            let mut ended = false;
            loop {
                match tokio::time::timeout_at(until, s.read(&mut b)).await {
                    Ok(Ok(k)) if k > 0 => got += k as u64,
                    Ok(_) => {
                        ended = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            Some((got, ended))
        });
    }
    let (mut opened, mut ended, mut bytes) = (0, 0, 0);
    while let Some(r) = tasks.join_next().await {
        if let Ok(Some((b, e))) = r {
            opened += 1;
            ended += usize::from(e);
            bytes += b;
        }
    }
    (opened, ended, bytes)
}
