//! `upgate-bench`: the benchmark suite and load generator.
//!
//! `suite` starts the echo backend and every proxy (each pinned to core 0
//! with one worker), then runs every scenario against every target, rounds
//! interleaved, and reports raw figures and ratios to a direct connection.
//! Run it through `bench/run.sh`, which installs the peers and pins this
//! process to core 1. `load` runs one scenario against any URL.

mod auth;
mod fanout;
mod load;
mod proc_stat;
mod proto;
mod resume;
mod targets;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rustls_pki_types::ServerName;

use load::{Measured, Target};
use targets::Proc;

#[derive(Parser)]
#[command(about = "upgate benchmark: load generator and side-by-side suite")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every scenario against direct, upgate, nginx, HAProxy and Caddy, interleaved.
    Suite(SuiteArgs),
    /// One scenario against one WebSocket echo URL.
    Load(LoadArgs),
    /// The fan-out scenario: clients subscribed to one feed, direct vs through upgate.
    Fanout(FanoutArgs),
    /// JWT verification's cost per handshake (ES256, RS256 against no auth).
    Auth(auth::AuthArgs),
    /// `mode: frames` with resume: time from a backend's SIGKILL to each moved session's next echo.
    Resume(resume::ResumeArgs),
}

#[derive(clap::Args)]
struct FanoutArgs {
    /// Subscribed clients.
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Feed rates to measure, messages per second (each client receives every one).
    #[arg(long, value_delimiter = ',', default_value = "20,50")]
    rates: Vec<u32>,
    /// Message size in bytes (the first 8 are the send timestamp).
    #[arg(long, default_value_t = 100)]
    size: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Measured seconds per run (after a 2 s warm-up).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// `floor` (one plain write loop: the kernel's limit), `direct` (the
    /// source serves every client), `upgate`, `upgate-2t`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "floor,direct,upgate,upgate-2t"
    )]
    targets: Vec<String>,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    #[command(flatten)]
    bins: Bins,
}

#[derive(clap::Args)]
struct SuiteArgs {
    /// Rounds; medians and min–max are over rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Measured seconds per scenario run (after a 1 s warm-up).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Targets to include: direct, upgate, floor (the least a proxy does), epoll
    /// (the same with no runtime, fewest system calls), floor-ka and epoll-ka
    /// (both with upgate's default TCP keepalive), nginx, haproxy, caddy;
    /// upgate-frames; upgate-base and upgate-frames-base with --base-bin-dir.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,upgate,floor,epoll,nginx,haproxy,caddy"
    )]
    targets: Vec<String>,
    /// Scenarios to run (a–g, see the README).
    #[arg(long, value_delimiter = ',', default_value = "a,b,c,d,e,f,g")]
    scenarios: Vec<String>,
    /// Idle connections for (f); capped by the open-file limit (a proxy holds two descriptors per connection).
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// For (f) on upgate builds: seconds to wait after the connections closed
    /// before reading RSS once more (0: only right after closing).
    #[arg(long, default_value_t = 30)]
    rss_linger: u64,
    /// Idle connections held through upgate for (g).
    #[arg(long, default_value_t = 100_000)]
    huge: usize,
    /// Directory for the results file.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    #[command(flatten)]
    bins: Bins,
}

/// Where the binaries under test are.
#[derive(clap::Args)]
pub(crate) struct Bins {
    /// Directory holding upgate and upgate-bench-backend (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Directory holding an upgate build of another commit, measured as targets `upgate-base`
    /// (as `upgate`) and `upgate-frames-base` (as `upgate-frames`) for before/after
    /// comparisons in the same run.
    #[arg(long)]
    base_bin_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct LoadArgs {
    /// ws://HOST:PORT/PATH or wss://…
    #[arg(long)]
    url: String,
    /// throughput | handshakes | idle | hold (open --conns and read for --duration)
    #[arg(long, default_value = "throughput")]
    mode: String,
    #[arg(long, default_value_t = 100)]
    conns: usize,
    #[arg(long, default_value_t = 64)]
    size: usize,
    #[arg(long, default_value_t = 16)]
    window: usize,
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of load before the measured window.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// PEM CA file for wss:// (the target's certificate).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Process whose CPU and RSS to report.
    #[arg(long)]
    pid: Option<u32>,
    /// Loopback source addresses to spread connections over (idle mode).
    #[arg(long, default_value_t = 1)]
    sources: usize,
}

/// A cipher suite's place in Chrome's ClientHello (lower first).
fn browser_rank(s: rustls::CipherSuite) -> usize {
    use rustls::CipherSuite as C;
    [
        C::TLS13_AES_128_GCM_SHA256,
        C::TLS13_AES_256_GCM_SHA384,
        C::TLS13_CHACHA20_POLY1305_SHA256,
        C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
    .iter()
    .position(|x| *x == s)
    .unwrap_or(usize::MAX)
}

fn tls_client(
    roots: &[rustls_pki_types::CertificateDer<'static>],
    resume: bool,
) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        let _ = store.add(r.clone());
    }
    // Offered in a browser's order (Chrome's: AES-128-GCM first), not
    // rustls's (AES-256-GCM-SHA384 first), so the servers measured hash
    // the handshake with SHA-256 as they do for browsers.
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| browser_rank(s.suite()));
    let provider = Arc::new(provider);
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("default TLS versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(cfg)
}

fn main() -> Result<(), String> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    match cli.cmd {
        Cmd::Load(a) => rt.block_on(load_cmd(a)),
        Cmd::Auth(a) => rt.block_on(async {
            tokio::select! {
                r = auth::auth_suite(a) => r,
                _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
            }
        }),
        Cmd::Resume(a) => rt.block_on(async {
            tokio::select! {
                r = resume::resume_suite(a) => r,
                _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
            }
        }),
        Cmd::Fanout(a) => rt.block_on(async {
            tokio::select! {
                r = fanout_suite(a) => r,
                _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
            }
        }),
        // On Ctrl-C or SIGTERM the suite future is dropped, so every started process is stopped.
        Cmd::Suite(a) => rt.block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .map_err(|e| e.to_string())?;
            tokio::select! {
                r = suite(a) => r,
                _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
                _ = term.recv() => Err("terminated".into()),
            }
        }),
    }
}

async fn load_cmd(a: LoadArgs) -> Result<(), String> {
    let (tls, rest) = if let Some(r) = a.url.strip_prefix("wss://") {
        (true, r)
    } else if let Some(r) = a.url.strip_prefix("ws://") {
        (false, r)
    } else {
        return Err("--url must start with ws:// or wss://".into());
    };
    let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let addr = tokio::net::lookup_host(hostport)
        .await
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let host = hostport
        .rsplit_once(':')
        .map_or(hostport, |(h, _)| h)
        .to_string();
    let tls = if tls {
        use rustls_pki_types::pem::PemObject;
        let ca = a.ca.as_ref().ok_or("--ca is required for wss://")?;
        let roots: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(ca)
            .map_err(|e| e.to_string())?
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        Some((tls_client(&roots, a.mode != "handshakes"), name))
    } else {
        None
    };
    let t = Target {
        addr,
        host,
        path: path.into(),
        tls,
        pid: a.pid,
        paths: Default::default(),
    };
    let dur = Duration::from_secs_f64(a.duration);
    let warm = Duration::from_secs_f64(a.warmup);
    match a.mode.as_str() {
        "throughput" => {
            print_measured(&load::throughput(&t, a.conns, a.size, a.window, warm, dur).await)
        }
        "handshakes" => print_measured(&load::handshakes(&t, a.conns, warm, dur).await),
        "hold" => {
            let (opened, ended, bytes) = load::hold(&t, a.conns, dur).await;
            println!("held {opened} connections, {ended} ended early, received {bytes} bytes");
        }
        "idle" => {
            let linger = Duration::from_secs(30);
            let r = load::idle(&t, a.conns, a.sources, Duration::from_secs(1), Some(linger)).await;
            println!(
                "opened {} (failed {}), echoed {}, target RSS {} -> {} KiB = {:.2} KiB/conn; closed: {} KiB, {linger:?} later: {} KiB",
                r.opened,
                r.failed_open,
                r.echoed,
                r.rss_before_kib,
                r.rss_after_kib,
                r.kib_per_conn(),
                r.rss_closed_kib,
                r.rss_later_kib.unwrap_or(0),
            );
        }
        m => return Err(format!("unknown mode {m}")),
    }
    Ok(())
}

fn print_measured(m: &Measured) {
    println!(
        "{:.0}/s  {:.1} MiB/s  p50 {:.0} µs  p99 {:.0} µs  p99.9 {:.0} µs  errors {}  target CPU {}  count {}",
        m.rate(),
        m.mib_s(),
        m.p50_us,
        m.p99_us,
        m.p999_us,
        m.errors,
        m.cpu_us_per().map_or("n/a".into(), |c| format!("{c:.2} µs/unit")),
        m.count
    );
}

#[derive(Clone, Copy)]
enum Kind {
    Throughput {
        conns: usize,
        size: usize,
        window: usize,
    },
    Handshakes {
        workers: usize,
    },
}

struct Scenario {
    id: &'static str,
    label: &'static str,
    kind: Kind,
    tls: bool,
}

const SCENARIOS: [Scenario; 6] = [
    Scenario {
        id: "a",
        label: "(a) 64 B msgs/s, 100 conns, window 16",
        kind: Kind::Throughput {
            conns: 100,
            size: 64,
            window: 16,
        },
        tls: false,
    },
    Scenario {
        id: "b",
        label: "(b) 64 KiB MiB/s, 10 conns, window 4",
        kind: Kind::Throughput {
            conns: 10,
            size: 65536,
            window: 4,
        },
        tls: false,
    },
    Scenario {
        id: "c",
        label: "(c) 64 B RTT, 10 conns, window 1",
        kind: Kind::Throughput {
            conns: 10,
            size: 64,
            window: 1,
        },
        tls: false,
    },
    Scenario {
        id: "d",
        label: "(d) ws handshakes/s",
        kind: Kind::Handshakes { workers: 32 },
        tls: false,
    },
    Scenario {
        id: "e",
        label: "(e) TLS 64 B msgs/s",
        kind: Kind::Throughput {
            conns: 100,
            size: 64,
            window: 16,
        },
        tls: true,
    },
    Scenario {
        id: "e",
        label: "(e) TLS full handshakes/s",
        kind: Kind::Handshakes { workers: 32 },
        tls: true,
    },
];

/// (scenario label, target) → one Measured per round.
type Results = BTreeMap<(usize, String), Vec<Measured>>;

/// A markdown table's first two lines: `lead` (its leading cells, as
/// `| a | b |`) and a column per proxy.
fn table_head(o: &mut String, lead: &str, proxies: &[&String]) {
    use std::fmt::Write;
    let _ = write!(o, "{lead}");
    for p in proxies {
        let _ = write!(o, " {p} |");
    }
    let cols = lead.matches('|').count().saturating_sub(1) + proxies.len();
    let _ = writeln!(o, "\n|{}", "---|".repeat(cols));
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub(crate) fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        })
}

async fn suite(a: SuiteArgs) -> Result<(), String> {
    let bin_dir = a.bins.dir()?;
    let work = std::env::temp_dir().join(format!("upgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let certs = targets::certs(&work)?;
    // Each proxied connection costs the proxy two descriptors; stay under the limit.
    let fd_limit = open_file_limit();
    let fit = fd_limit.saturating_sub(200) / 2;
    let mut a = a;
    for (what, n) in [("--idle", &mut a.idle), ("--huge", &mut a.huge)] {
        if *n > fit {
            eprintln!(
                "{what} {} does not fit the open-file limit {fd_limit}: using {fit}",
                *n
            );
            *n = fit;
        }
    }
    let a = a;
    let wants = |t: &str| a.targets.iter().any(|x| x == t);
    let scen = |s: &str| a.scenarios.iter().any(|x| x == s);
    let huge = scen("g") && wants("upgate") && a.huge > 0;
    let backend_ips = if huge { 8 } else { 1 };

    let backend = targets::backend(&bin_dir, &work, backend_ips - 1)?;
    let start = |name: &str, ips: usize| -> Result<Proc, String> {
        match name {
            "upgate" => targets::upgate("upgate", &bin_dir, 18080, &work, &certs, ips),
            "upgate-frames" => {
                targets::upgate("upgate-frames", &bin_dir, 18100, &work, &certs, ips)
            }
            "upgate-base" => match &a.bins.base_bin_dir {
                Some(d) => targets::upgate("upgate-base", d, 18090, &work, &certs, ips),
                None => Err("upgate-base needs --base-bin-dir".into()),
            },
            "upgate-frames-base" => match &a.bins.base_bin_dir {
                Some(d) => targets::upgate("upgate-frames-base", d, 18110, &work, &certs, ips),
                None => Err("upgate-frames-base needs --base-bin-dir".into()),
            },
            "nginx" => targets::nginx(&work, &certs, fit),
            "haproxy" => targets::haproxy(&work, &certs, fit),
            "caddy" => targets::caddy(&work, &certs),
            "floor" => targets::relay(&bin_dir, &work, &certs, false),
            "floor-ka" => targets::relay(&bin_dir, &work, &certs, true),
            "epoll" => targets::epoll_relay(&bin_dir, &work, false),
            "epoll-ka" => targets::epoll_relay(&bin_dir, &work, true),
            other => Err(format!("unknown target {other}")),
        }
    };
    let mut procs: Vec<Proc> = Vec::new();
    for name in a.targets.iter().filter(|n| *n != "direct") {
        match start(name, 1) {
            Ok(p) => procs.push(p),
            Err(e) => eprintln!("skipping {name}: {e}"),
        }
    }
    let started = now_utc();
    let host_info = machine_info();
    eprintln!(
        "upgate-bench: {} rounds × {} s; targets: direct{}",
        a.rounds,
        a.duration,
        procs
            .iter()
            .map(|p| format!(", {}", p.name))
            .collect::<String>()
    );

    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let tls_resume = tls_client(std::slice::from_ref(&certs.der), true);
    let tls_full = tls_client(std::slice::from_ref(&certs.der), false);
    let target_for = |p: &Proc, s: &Scenario| -> Option<Target> {
        let (addr, tls) = if s.tls {
            let cfg = match s.kind {
                Kind::Handshakes { .. } => tls_full.clone(),
                Kind::Throughput { .. } => tls_resume.clone(),
            };
            (p.tls?, Some((cfg, name.clone())))
        } else {
            (p.plain, None)
        };
        // Direct: the backend's own CPU is not what we measure.
        let pid = if p.name == "direct" { None } else { p.pid() };
        Some(Target {
            addr,
            host: "localhost".into(),
            path: "/".into(),
            tls,
            pid,
            paths: Default::default(),
        })
    };

    let dur = Duration::from_secs_f64(a.duration);
    let warm = Duration::from_secs(1);
    let mut results: Results = BTreeMap::new();
    let all: Vec<&Proc> = std::iter::once(&backend)
        .filter(|_| wants("direct"))
        .chain(procs.iter())
        .collect();
    for round in 0..a.rounds {
        for (si, s) in SCENARIOS.iter().enumerate() {
            if !scen(s.id) {
                continue;
            }
            // Rotate the order each round so no target always runs first.
            for k in 0..all.len() {
                let p = all[(k + round + si) % all.len()];
                let Some(t) = target_for(p, s) else { continue };
                let m = match s.kind {
                    Kind::Throughput {
                        conns,
                        size,
                        window,
                    } => load::throughput(&t, conns, size, window, warm, dur).await,
                    Kind::Handshakes { workers } => load::handshakes(&t, workers, warm, dur).await,
                };
                eprintln!(
                    "round {} {:<40} {:<8} {:>10.0}/s {:>8.1} MiB/s p50 {:>6.0} µs p99 {:>6.0} µs err {} cpu {} cores {}",
                    round + 1,
                    s.label,
                    p.name,
                    m.rate(),
                    m.mib_s(),
                    m.p50_us,
                    m.p99_us,
                    m.errors,
                    m.cpu_us_per().map_or("-".into(), |c| format!("{c:.2} µs")),
                    m.cores_us_per()
                        .iter()
                        .map(|c| format!("{c:.2}"))
                        .collect::<Vec<_>>()
                        .join("/")
                );
                results.entry((si, p.name.clone())).or_default().push(m);
                // Let TIME_WAIT sockets and queues settle between runs.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }

    let mut idle_rows = Vec::new();
    // Memory is measured on fresh processes: an allocator keeps freed memory,
    // so RSS growth after other scenarios would hide what a connection costs.
    let names: Vec<String> = all.iter().map(|p| p.name.clone()).collect();
    drop(all);
    drop(procs);
    if scen("f") {
        // The plain floor relay's buffers (tokio's copy, 8 KiB each way) make
        // it no floor for memory; its TLS port holds none while idle.
        for pname in names.iter().filter(|n| *n != "direct") {
            for tls in [false, true] {
                if (pname == "floor" || pname == "floor-ka") && !tls {
                    continue;
                }
                let p = match start(pname, 1) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("(f) {pname}: {e}");
                        continue;
                    }
                };
                let Some(addr) = (if tls { p.tls } else { Some(p.plain) }) else {
                    continue;
                };
                let t = Target {
                    addr,
                    host: "localhost".into(),
                    path: "/".into(),
                    tls: tls.then(|| (tls_resume.clone(), name.clone())),
                    pid: p.pid(),
                    paths: Default::default(),
                };
                // upgate's own builds are also watched for memory given back.
                let linger = (pname.starts_with("upgate") && a.rss_linger > 0)
                    .then(|| Duration::from_secs(a.rss_linger));
                let r = load::idle(&t, a.idle, 1, Duration::from_secs(2), linger).await;
                eprintln!(
                    "(f) {} tls={tls}: {} open, {} echoed, {:.2} KiB/conn, {:.0} % returned after close",
                    p.name,
                    r.opened,
                    r.echoed,
                    r.kib_per_conn(),
                    100.0 * r.returned(r.rss_later_kib.unwrap_or(r.rss_closed_kib))
                );
                idle_rows.push((p.name.clone(), tls, r));
                drop(p);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    let mut huge_row = None;
    if huge {
        match start("upgate", backend_ips) {
            Ok(p) => {
                let t = Target {
                    addr: p.plain,
                    host: "localhost".into(),
                    path: "/".into(),
                    tls: None,
                    pid: p.pid(),
                    paths: Default::default(),
                };
                let r = load::idle(&t, a.huge, 8, Duration::from_secs(3), None).await;
                eprintln!(
                    "(g) upgate: {} open ({} failed), {} echoed, {:.2} KiB/conn",
                    r.opened,
                    r.failed_open,
                    r.echoed,
                    r.kib_per_conn()
                );
                huge_row = Some(r);
            }
            Err(e) => eprintln!("(g) upgate: {e}"),
        }
    }

    let report = render(
        &a,
        &started,
        &host_info,
        &names,
        &results,
        &idle_rows,
        huge_row.as_ref(),
    );
    save_report(&a.out, "", &started, &report)?;
    drop(backend);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

impl Bins {
    /// `--bin-dir`, or the directory of this binary.
    pub(crate) fn dir(&self) -> Result<PathBuf, String> {
        match &self.bin_dir {
            Some(d) => Ok(d.clone()),
            None => Ok(std::env::current_exe()
                .map_err(|e| e.to_string())?
                .parent()
                .ok_or("no binary dir")?
                .to_path_buf()),
        }
    }
}

/// Fan-out: for each rate, every target, rounds interleaved; fresh processes per run.
async fn fanout_suite(a: FanoutArgs) -> Result<(), String> {
    let bin_dir = a.bins.dir()?;
    let work = std::env::temp_dir().join(format!("upgate-bench-fanout-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let fd_limit = open_file_limit();
    let clients = a.clients.min(fd_limit.saturating_sub(200));
    if clients < a.clients {
        eprintln!(
            "--clients {} does not fit the open-file limit {fd_limit}: using {clients}",
            a.clients
        );
    }
    let started = now_utc();
    let warm = Duration::from_secs(2);
    let dur = Duration::from_secs_f64(a.duration);
    let mut runs: BTreeMap<(u32, String), Vec<fanout::Run>> = BTreeMap::new();
    for round in 0..a.rounds {
        for (ri, &rate) in a.rates.iter().enumerate() {
            for k in 0..a.targets.len() {
                let t = &a.targets[(k + round + ri) % a.targets.len()];
                let r = match t.as_str() {
                    // The source serves every client itself: it gets core 0, as upgate
                    // would. `floor`: the same from one plain write loop.
                    "direct" | "floor" => {
                        let feed =
                            targets::feed(&bin_dir, &work, "0", (rate, a.size), t == "floor")?;
                        let w = fanout::Watch {
                            server: feed.pid().into_iter().collect(),
                            source: feed.pid(),
                            source_port: targets::FEED_PORT,
                        };
                        fanout::run(&[feed.plain], "/", clients, (warm, dur), w).await
                    }
                    // One runtime thread on core 0 (as in the suite), or one per core.
                    "upgate" | "upgate-2t" | "upgate-base" => {
                        let feed = targets::feed(&bin_dir, &work, "1", (rate, a.size), false)?;
                        let gw = match t.as_str() {
                            "upgate" => targets::upgate_fanout(&bin_dir, &work, "0", 1)?,
                            "upgate-2t" => targets::upgate_fanout(&bin_dir, &work, "0,1", 2)?,
                            _ => {
                                let base = a
                                    .bins
                                    .base_bin_dir
                                    .as_deref()
                                    .ok_or("upgate-base needs --base-bin-dir")?;
                                targets::upgate_fanout(base, &work, "0", 1)?
                            }
                        };
                        let w = fanout::Watch {
                            server: gw.pid().into_iter().collect(),
                            source: feed.pid(),
                            source_port: targets::FEED_PORT,
                        };
                        fanout::run(&[gw.plain], "/feed", clients, (warm, dur), w).await
                    }
                    // Three edge upgates over a core upgate over the source
                    // (docs/deployment.md, "Tiered fan-out"); clients spread
                    // over the edges. Core on core 1 with the source, edges on core 0.
                    "upgate-tiers" => {
                        let feed = targets::feed(&bin_dir, &work, "1", (rate, a.size), false)?;
                        let (core, edges) = targets::upgate_tiers(&bin_dir, &work, 3)?;
                        let mut server: Vec<u32> = core.pid().into_iter().collect();
                        server.extend(edges.iter().filter_map(|e| e.pid()));
                        let addrs: Vec<_> = edges.iter().map(|e| e.plain).collect();
                        let w = fanout::Watch {
                            server,
                            source: feed.pid(),
                            source_port: targets::FEED_PORT,
                        };
                        fanout::run(&addrs, "/feed", clients, (warm, dur), w).await
                    }
                    other => return Err(format!("unknown fan-out target {other}")),
                };
                eprintln!(
                    "round {} rate {rate}/s {t:<7} clients {} (failed {}) {:>9.0} deliveries/s p50 {:.2} ms p99 {:.2} ms serving CPU {} source CPU {} source conns {} {} KiB/client, load generator CPU {}",
                    round + 1,
                    r.clients,
                    r.failed,
                    r.rate(),
                    r.p50_ms,
                    r.p99_ms,
                    r.server_cpu.map_or("-".into(), |c| format!("{:.0}%", 100.0 * c / r.secs)),
                    r.source_cpu.map_or("-".into(), |c| format!("{:.1}%", 100.0 * c / r.secs)),
                    r.source_conns,
                    r.kib_per_client.map_or("-".into(), |k| format!("{k:.2}")),
                    r.loadgen_cpu.map_or("-".into(), |c| format!("{:.0}%", 100.0 * c / r.secs)),
                );
                runs.entry((rate, t.clone())).or_default().push(r);
                // Let TIME_WAIT sockets settle between runs.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    let report = render_fanout(&a, clients, &started, &runs);
    save_report(&a.out, "fanout-", &started, &report)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

fn render_fanout(
    a: &FanoutArgs,
    clients: usize,
    started: &str,
    runs: &BTreeMap<(u32, String), Vec<fanout::Run>>,
) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "## upgate fan-out benchmark, {started}\n");
    let _ = writeln!(
        o,
        "{}. {clients} clients subscribed to one feed of {} B messages. `floor`: every client connects to a source that writes each message to every socket from one plain loop, one write(2) per client per tick carrying all messages due, stamped with the time they were due (core 0): the least any server can spend on this many loopback sockets here. `direct`: every client connects to the source, which sends each its own copy (source on core 0). \
         `upgate`: clients connect to a `mode: fanout` route; upgate (one runtime thread, core 0) holds one upstream connection (source on core 1). `upgate-2t`: the same with two runtime threads on both cores. `upgate-tiers`: clients spread over three edge upgates (core 0, one thread each) whose fan-out pool is a core upgate's fan-out route (core 1, one thread), which holds the one upstream connection; serving CPU and RSS are the four processes' sum. Load generator on core 1. \
         {} rounds × {} s after a 2 s warm-up; medians (min–max over rounds). Latency: send timestamp in the message → client read.\n",
        machine_info(),
        a.size,
        a.rounds,
        a.duration
    );
    let _ = writeln!(
        o,
        "| feed rate | target | deliveries/s (of offered) | p50 latency | p99 latency | p99 ÷ floor's | serving CPU | source CPU | source connections | serving RSS per client | load generator CPU |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let rates: std::collections::BTreeSet<u32> = runs.keys().map(|k| k.0).collect();
    for rate in rates {
        let offered = f64::from(rate) * clients as f64;
        for t in &a.targets {
            let Some(v) = runs.get(&(rate, t.clone())) else {
                continue;
            };
            let med = |f: &dyn Fn(&fanout::Run) -> f64| {
                let xs: Vec<f64> = v.iter().map(f).filter(|x| x.is_finite()).collect();
                let (lo, hi) = min_max(&xs);
                (median(xs), lo, hi)
            };
            let (d, dlo, dhi) = med(&|r| r.rate());
            let (p50, _, _) = med(&|r| r.p50_ms);
            let (p99, plo, phi) = med(&|r| r.p99_ms);
            let (sc, _, _) = med(&|r| r.server_cpu.map_or(f64::NAN, |c| 100.0 * c / r.secs));
            let (src, _, _) = med(&|r| r.source_cpu.map_or(f64::NAN, |c| 100.0 * c / r.secs));
            let (conns, _, _) = med(&|r| r.source_conns as f64);
            let (kib, _, _) = med(&|r| r.kib_per_client.unwrap_or(f64::NAN));
            let (lg, _, _) = med(&|r| r.loadgen_cpu.map_or(f64::NAN, |c| 100.0 * c / r.secs));
            // Each round's p99 over the floor's in the same round (rounds
            // interleave targets): the figure the fan-out target is judged by.
            let vs_floor = match runs.get(&(rate, "floor".to_string())) {
                Some(f) if t != "floor" => {
                    let xs: Vec<f64> = v
                        .iter()
                        .zip(f)
                        .map(|(r, f)| r.p99_ms / f.p99_ms)
                        .filter(|x| x.is_finite())
                        .collect();
                    median_range(xs)
                }
                _ => "–".to_string(),
            };
            let _ = writeln!(
                o,
                "| {rate}/s × {clients} = {offered:.0}/s | {t} | {d:.0} ({:.2}; {dlo:.0}–{dhi:.0}) | {p50:.2} ms | {p99:.2} ms ({plo:.2}–{phi:.2}) | {vs_floor} | {sc:.0} % | {src:.1} % | {conns:.0} | {kib:.2} KiB | {lg:.0} % |",
                d / offered
            );
        }
    }
    let _ = writeln!(o, "\nCPU is % of one core over the measured window, from /proc. For `floor` and `direct` the serving process is the source itself. `p99 ÷ floor's`: each round's p99 over the floor's in the same round, median (min–max) over rounds. Where the load generator's CPU is near 100 %, its own core is full (the loopback receive path, one read per message) and latencies include its queueing.");
    o
}

/// The soft open-file limit of this process (children inherit it).
fn open_file_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(1024)
}

/// Prints the report and saves it as `OUT/PREFIX<started>.md`.
pub(crate) fn save_report(
    out: &std::path::Path,
    prefix: &str,
    started: &str,
    report: &str,
) -> Result<(), String> {
    println!("{report}");
    std::fs::create_dir_all(out).map_err(|e| e.to_string())?;
    let file = out.join(format!("{prefix}{}.md", started.replace([':', ' '], "-")));
    std::fs::write(&file, report).map_err(|e| e.to_string())?;
    eprintln!("saved {}", file.display());
    Ok(())
}

pub(crate) fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub(crate) fn machine_info() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    // Not available_parallelism: this process is pinned to one core.
    let cores = std::fs::read_to_string("/proc/cpuinfo").map_or(0, |s| {
        s.lines().filter(|l| l.starts_with("processor")).count()
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores ({cpu}), Linux {}", kernel.trim())
}

/// The direct scenario a scenario is compared with: TLS rows compare with
/// the plain scenario of the same shape (direct has no TLS).
fn base_of(si: usize) -> usize {
    match (SCENARIOS[si].tls, SCENARIOS[si].kind) {
        (true, Kind::Throughput { .. }) => 0,
        (true, Kind::Handshakes { .. }) => 3,
        _ => si,
    }
}

/// The figure a scenario is judged by, from one run.
fn primary(s: &Scenario, m: &Measured) -> f64 {
    match (s.kind, s.id) {
        (Kind::Throughput { .. }, "b") => m.mib_s(),
        (Kind::Throughput { .. }, "c") => m.p50_us,
        _ => m.rate(),
    }
}

/// `target`'s CPU per unit and figure over `reference`'s in the same round,
/// as "CPU median (min–max) · median (min–max)"; `None` unless both ran the
/// scenario. Rounds run every target within a minute of each other, so
/// these ratios cancel most of a shared machine's slow drift, which the
/// medians over rounds in the other tables keep.
fn paired(res: &Results, si: usize, target: &str, reference: &str) -> Option<String> {
    let v = res.get(&(si, target.to_string()))?;
    let r = res.get(&(si, reference.to_string()))?;
    let s = &SCENARIOS[si];
    let cpu: Vec<f64> = v
        .iter()
        .zip(r)
        .filter_map(|(m, f)| Some(m.cpu_us_per()? / f.cpu_us_per()?))
        .collect();
    let fig: Vec<f64> = v
        .iter()
        .zip(r)
        .map(|(m, f)| primary(s, m) / primary(s, f))
        .collect();
    Some(format!("CPU {} · {}", median_range(cpu), median_range(fig)))
}

/// "median (min–max)" of `v`, or "–" when it is empty.
fn median_range(v: Vec<f64>) -> String {
    if v.is_empty() {
        return "–".to_string();
    }
    let (lo, hi) = min_max(&v);
    format!("{:.2} ({lo:.2}–{hi:.2})", median(v))
}

/// Round-by-round ratios (see `paired`): every proxy against the tokio
/// floor, and each upgate build against the base build of the same kind
/// (`--base-bin-dir`).
fn round_by_round(o: &mut String, scenarios: &[String], proxies: &[&String], res: &Results) {
    use std::fmt::Write;
    let shown = |id: &str| scenarios.iter().any(|x| x == id);
    let has = |name: &str| proxies.iter().any(|p| p.as_str() == name);
    let table = |o: &mut String, intro: &str, cols: &[(String, String)]| {
        if cols.is_empty() {
            return;
        }
        let _ = writeln!(o, "\n{intro}\n");
        let names: Vec<String> = cols.iter().map(|(t, r)| format!("{t} / {r}")).collect();
        table_head(o, "| scenario |", &names.iter().collect::<Vec<_>>());
        for (si, s) in SCENARIOS.iter().enumerate() {
            if !shown(s.id) {
                continue;
            }
            let _ = write!(o, "| {} |", s.label);
            for (t, r) in cols {
                let cell = paired(res, si, t, r).unwrap_or_else(|| "–".into());
                let _ = write!(o, " {cell} |");
            }
            let _ = writeln!(o);
        }
    };
    let floor: Vec<(String, String)> = if has("floor") {
        proxies
            .iter()
            .filter(|p| p.as_str() != "floor")
            .map(|p| (p.to_string(), "floor".to_string()))
            .collect()
    } else {
        Vec::new()
    };
    table(o, "Against the floor, round by round: each proxy's CPU per unit over the floor's in the same round, then its figure over the floor's (rate; for (c) the p50 round trip, lower is better); median (min–max) over rounds:", &floor);
    // upgate keeps TCP keepalive on by default; so does `floor-ka`.
    let floor_ka: Vec<(String, String)> = if has("floor-ka") {
        proxies
            .iter()
            .filter(|p| p.starts_with("upgate") || p.as_str() == "epoll-ka")
            .map(|p| (p.to_string(), "floor-ka".to_string()))
            .collect()
    } else {
        Vec::new()
    };
    table(o, "Against the floor with upgate's default TCP keepalive (`floor-ka`), round by round, the same way:", &floor_ka);
    let builds: Vec<(String, String)> = ["upgate", "upgate-frames"]
        .iter()
        .filter(|t| has(t) && has(&format!("{t}-base")))
        .map(|t| (t.to_string(), format!("{t}-base")))
        .collect();
    table(o, "This build against the base build (`--base-bin-dir`), round by round, the same way: a CPU ratio below 1.00 is less CPU; a figure's ratio above 1.00 is a higher rate (below 1.00 for (c), a shorter round trip):", &builds);
}

fn render(
    a: &SuiteArgs,
    started: &str,
    host: &str,
    names: &[String],
    res: &Results,
    idle: &[(String, bool, load::Idle)],
    huge: Option<&load::Idle>,
) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "## upgate benchmark, {started}\n");
    let _ = writeln!(
        o,
        "{host}. Each proxy pinned to core 0 with one worker/thread; load generator and echo backend on core 1. \
         {} rounds × {} s (after 1 s warm-up), targets interleaved. Cells: median ratio to direct (min–max over rounds), then the median raw figure. \
         TLS rows are compared with the plain direct connection.\n",
        a.rounds, a.duration
    );
    let proxies: Vec<&String> = names.iter().filter(|n| *n != "direct").collect();
    table_head(&mut o, "| scenario | direct |", &proxies);
    let direct_of = |si: usize| res.get(&(base_of(si), "direct".to_string()));
    for (si, s) in SCENARIOS.iter().enumerate() {
        if !a.scenarios.iter().any(|x| x == s.id) {
            continue;
        }
        let unit = match (s.kind, s.id) {
            (_, "b") => "MiB/s",
            (_, "c") => "µs p50",
            (Kind::Handshakes { .. }, _) => "hs/s",
            _ => "msg/s",
        };
        let direct = direct_of(si);
        let dcell = direct.map_or("–".to_string(), |d| {
            format!(
                "{:.0} {unit}",
                median(
                    d.iter()
                        .map(|m| primary(&SCENARIOS[base_of(si)], m))
                        .collect()
                )
            )
        });
        let _ = write!(o, "| {} | {dcell} |", s.label);
        for p in &proxies {
            let cell = match (res.get(&(si, (*p).clone())), direct) {
                (Some(v), Some(d)) => {
                    let base_s = &SCENARIOS[base_of(si)];
                    // Ratios are taken round by round against that round's direct run.
                    let ratios: Vec<f64> = v
                        .iter()
                        .zip(d.iter())
                        .map(|(m, dm)| primary(s, m) / primary(base_s, dm))
                        .collect();
                    let (lo, hi) = min_max(&ratios);
                    let raw = median(v.iter().map(|m| primary(s, m)).collect());
                    let suffix = if s.id == "c" { "×" } else { "" };
                    format!("{:.2}{suffix} ({lo:.2}–{hi:.2}) · {raw:.0}", median(ratios))
                }
                (Some(v), None) => format!(
                    "{:.0} {unit}",
                    median(v.iter().map(|m| primary(s, m)).collect())
                ),
                _ => "–".into(),
            };
            let _ = write!(o, " {cell} |");
        }
        let _ = writeln!(o);
        if s.id == "c" {
            let _ = write!(
                o,
                "| (c) RTT p99 | {} |",
                direct.map_or("–".into(), |d| format!(
                    "{:.0} µs",
                    median(d.iter().map(|m| m.p99_us).collect())
                ))
            );
            for p in &proxies {
                let cell = match (res.get(&(si, (*p).clone())), direct) {
                    (Some(v), Some(d)) => {
                        let r: Vec<f64> = v
                            .iter()
                            .zip(d)
                            .map(|(m, dm)| m.p99_us / dm.p99_us)
                            .collect();
                        let (lo, hi) = min_max(&r);
                        format!(
                            "{:.2}× ({lo:.2}–{hi:.2}) · {:.0}",
                            median(r),
                            median(v.iter().map(|m| m.p99_us).collect())
                        )
                    }
                    _ => "–".into(),
                };
                let _ = write!(o, " {cell} |");
            }
            let _ = writeln!(o);
        }
    }
    let _ = writeln!(o, "\nProxy CPU time per unit (µs, median over rounds, min–max), from /proc over the measured window:\n");
    table_head(&mut o, "| scenario |", &proxies);
    for (si, s) in SCENARIOS.iter().enumerate() {
        if !a.scenarios.iter().any(|x| x == s.id) {
            continue;
        }
        let per = match s.kind {
            Kind::Handshakes { .. } => "per handshake",
            Kind::Throughput { .. } => "per message",
        };
        let _ = write!(o, "| {} {per} |", s.label);
        for p in &proxies {
            let cell = res.get(&(si, (*p).clone())).map_or("–".into(), |v| {
                median_range(v.iter().filter_map(Measured::cpu_us_per).collect())
            });
            let _ = write!(o, " {cell} |");
        }
        let _ = writeln!(o);
    }
    round_by_round(&mut o, &a.scenarios, &proxies, res);
    // What each core was busy with per unit: core 0 is the proxy's (and the
    // kernel's work for its sockets there), core 1 the load generator's and
    // the backend's. Direct runs use core 1 alone; a proxied run is as fast
    // as its busier core allows.
    let _ = writeln!(o, "\nBusy time per unit on each core, core 0 / core 1 (µs, median over rounds), from /proc/stat over the measured window: core 0 runs the proxy, core 1 the load generator and the echo backend (direct runs use core 1 alone). A run goes as fast as its busier core allows.\n");
    table_head(&mut o, "| scenario | direct |", &proxies);
    for (si, s) in SCENARIOS.iter().enumerate() {
        if !a.scenarios.iter().any(|x| x == s.id) {
            continue;
        }
        let _ = write!(o, "| {} |", s.label);
        let direct = "direct".to_string();
        for p in std::iter::once(&&direct).chain(proxies.iter()) {
            // (The direct row of a TLS scenario is the plain one's.)
            let key = if *p == &direct { base_of(si) } else { si };
            let cell = res.get(&(key, (*p).clone())).map_or("–".into(), |v| {
                let per: Vec<Vec<f64>> = v.iter().map(Measured::cores_us_per).collect();
                let core =
                    |i: usize| median(per.iter().filter_map(|c| c.get(i).copied()).collect());
                if per.iter().any(|c| c.len() < 2) {
                    return "–".into();
                }
                format!("{:.2} / {:.2}", core(0), core(1))
            });
            let _ = write!(o, " {cell} |");
        }
        let _ = writeln!(o);
    }
    let errors: u64 = res.values().flatten().map(|m| m.errors).sum();
    let _ = writeln!(o, "\nClient-side errors over all runs: {errors}.");
    if !idle.is_empty() {
        let _ = writeln!(o, "\n(f) {} idle WebSocket connections: proxy RSS growth per connection (all held connections echoed afterwards):\n", a.idle);
        let _ = writeln!(
            o,
            "| proxy | plain KiB/conn | TLS KiB/conn | plain: RSS growth returned 2 s after close / {}s later | TLS: the same |\n|---|---|---|---|---|",
            a.rss_linger
        );
        for p in &proxies {
            let row = |tls: bool| {
                idle.iter()
                    .find(|(n, t, _)| n == *p && *t == tls)
                    .map(|(_, _, r)| r)
            };
            let cell = |tls: bool| {
                row(tls).map_or("–".into(), |r| {
                    format!("{:.2} ({}/{} echoed)", r.kib_per_conn(), r.echoed, r.opened)
                })
            };
            let back = |tls: bool| {
                row(tls).map_or("–".into(), |r| {
                    let later = r
                        .rss_later_kib
                        .map_or("–".into(), |k| format!("{:.0} %", 100.0 * r.returned(k)));
                    format!("{:.0} % / {later}", 100.0 * r.returned(r.rss_closed_kib))
                })
            };
            let _ = writeln!(
                o,
                "| {p} | {} | {} | {} | {} |",
                cell(false),
                cell(true),
                back(false),
                back(true)
            );
        }
    }
    if let Some(r) = huge {
        let _ = writeln!(
            o,
            "\n(g) {} idle connections through upgate: {} opened ({} failed), {} echoed at the end; upgate RSS {} → {} KiB = {:.2} KiB/conn.",
            a.huge, r.opened, r.failed_open, r.echoed, r.rss_before_kib, r.rss_after_kib, r.kib_per_conn()
        );
        if let Some((k0, k1)) = r.kernel {
            let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / r.opened.max(1) as f64;
            let _ = writeln!(
                o,
                "The kernel, system-wide (the client's socket, upgate's two and the backend's: four TCP sockets per connection): TCP sockets {} → {}; socket buffers {} → {} KiB = {:.2} KiB/conn; socket structures (slab `TCP`, `TCPv6`, `sock_inode_cache`) {} → {} KiB = {:.2} KiB/conn.",
                k0.tcp_sockets, k1.tcp_sockets,
                k0.buffers_kib, k1.buffers_kib, per(k0.buffers_kib, k1.buffers_kib),
                k0.slab_kib, k1.slab_kib, per(k0.slab_kib, k1.slab_kib),
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(count: u64, cpu_secs: f64) -> Measured {
        Measured {
            secs: 1.0,
            count,
            bytes: 0,
            errors: 0,
            p50_us: 0.0,
            p99_us: 0.0,
            p999_us: 0.0,
            cpu_secs: Some(cpu_secs),
            cores_secs: Vec::new(),
        }
    }

    /// The round-by-round tables for scenario (d), given each target's two
    /// rounds as (handshakes in 1 s, CPU seconds).
    fn tables(targets: &[(&str, [(u64, f64); 2])]) -> String {
        let d = SCENARIOS.iter().position(|s| s.id == "d").expect("(d)");
        let mut res = Results::new();
        for (name, rounds) in targets {
            let runs = rounds.iter().map(|&(n, cpu)| run(n, cpu)).collect();
            res.insert((d, name.to_string()), runs);
        }
        let names: Vec<String> = targets.iter().map(|(n, _)| n.to_string()).collect();
        let mut o = String::new();
        round_by_round(
            &mut o,
            &["d".into()],
            &names.iter().collect::<Vec<_>>(),
            &res,
        );
        o
    }

    /// Each round's figures are divided by the floor's of the same round
    /// before the median is taken (the medians of each target over rounds
    /// would give 103 / 90 = 1.14 here).
    #[test]
    fn proxies_are_compared_with_the_floor_round_by_round() {
        // Floor: 100 then 80 µs per handshake; upgate 110 then 96.
        let upgate = ("upgate", [(900, 0.099), (1000, 0.096)]);
        let o = tables(&[upgate, ("floor", [(1000, 0.100), (1000, 0.080)])]);
        assert!(o.contains("| scenario | upgate / floor |"), "{o}");
        assert!(
            o.contains("| (d) ws handshakes/s | CPU 1.15 (1.10–1.20) · 0.95 (0.90–1.00) |"),
            "{o}"
        );
        // Neither the floor nor a base build among the targets: no table.
        let o = tables(&[upgate]);
        assert!(o.is_empty(), "{o}");
    }

    /// A build and its base (`--base-bin-dir`) get a table of their own.
    #[test]
    fn a_build_is_compared_with_its_base_round_by_round() {
        // Base: 100 then 120 µs per handshake; this build 95 then 108.
        let o = tables(&[
            ("upgate-base", [(1000, 0.100), (1000, 0.120)]),
            ("upgate", [(1000, 0.095), (1000, 0.108)]),
        ]);
        assert!(o.contains("| scenario | upgate / upgate-base |"), "{o}");
        assert!(
            o.contains("| (d) ws handshakes/s | CPU 0.93 (0.90–0.95) · 1.00 (1.00–1.00) |"),
            "{o}"
        );
        assert!(!o.contains("Against the floor"), "{o}");
    }

    /// With `floor-ka` among the targets, upgate builds (not the other
    /// proxies, which keep no keepalive) are also set against it.
    #[test]
    fn upgate_is_compared_with_the_keepalive_floor() {
        let o = tables(&[
            ("upgate", [(900, 0.099), (1000, 0.096)]),
            ("nginx", [(900, 0.099), (1000, 0.096)]),
            ("floor-ka", [(1000, 0.100), (1000, 0.080)]),
        ]);
        assert!(o.contains("| scenario | upgate / floor-ka |"), "{o}");
        assert!(!o.contains("nginx / floor-ka"), "{o}");
        assert!(
            o.contains("| (d) ws handshakes/s | CPU 1.15 (1.10–1.20) · 0.95 (0.90–1.00) |"),
            "{o}"
        );
    }
}
