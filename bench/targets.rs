//! Starting what the suite measures: the echo backend, upgate, nginx,
//! HAProxy and Caddy, each proxy pinned to core 0 with one worker/thread.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BACKEND_PORT: u16 = 19001;

/// A proxy (or the backend itself, for `direct`) under test.
pub struct Proc {
    pub name: String,
    pub plain: SocketAddr,
    pub tls: Option<SocketAddr>,
    pub child: Option<Child>,
}

impl Proc {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Proc {
    /// Stops the whole process tree (nginx's worker outlives a killed master):
    /// SIGTERM to every process, then SIGKILL to what is left after 3 s.
    fn drop(&mut self) {
        let Some(c) = &mut self.child else { return };
        let pids: Vec<String> = crate::proc_stat::tree(c.id())
            .iter()
            .map(u32::to_string)
            .collect();
        let _ = Command::new("kill")
            .arg("-TERM")
            .args(&pids)
            .stderr(Stdio::null())
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            if matches!(c.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(&pids)
            .stderr(Stdio::null())
            .status();
        let _ = c.wait();
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Waits until something accepts on `a`.
pub fn wait_port(a: SocketAddr, what: &str) -> Result<(), String> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(15) {
        if std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{what} did not start listening on {a}"))
}

fn port_free(a: SocketAddr) -> Result<(), String> {
    if std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok() {
        return Err(format!("{a} is already in use (a leftover process?)"));
    }
    Ok(())
}

/// Starts `program` pinned to `core`, after checking nothing listens on `port` yet.
pub fn spawn(
    port: u16,
    core: &str,
    program: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
    log: &Path,
) -> Result<Child, String> {
    port_free(addr(port))?;
    let out = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let mut c = Command::new("taskset");
    c.arg("-c").arg(core).arg(program).args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(out)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))
}

pub fn which(p: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|d| d.join(p))
            .find(|f| f.is_file())
    })
}

/// The echo backend on core 1, listening on 127.0.0.1 plus `extra_ips` more loopback addresses.
pub fn backend(bin_dir: &Path, work: &Path, extra_ips: usize) -> Result<Proc, String> {
    let mut args: Vec<String> = Vec::new();
    for i in 0..=extra_ips {
        args.push("--listen".into());
        args.push(format!("127.0.0.{}:{BACKEND_PORT}", i + 1));
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = spawn(
        BACKEND_PORT,
        "1",
        &bin_dir.join("upgate-bench-backend"),
        &argv,
        &[],
        &work.join("backend.log"),
    )?;
    wait_port(addr(BACKEND_PORT), "backend")?;
    Ok(Proc {
        name: "direct".into(),
        plain: addr(BACKEND_PORT),
        tls: None,
        child: Some(child),
    })
}

pub struct Certs {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate and key in one file, as HAProxy wants it.
    pub combined: PathBuf,
    pub der: rustls_pki_types::CertificateDer<'static>,
}

pub fn certs(work: &Path) -> Result<Certs, String> {
    use rustls_pki_types::pem::PemObject;
    let (c, k) = upgate::tls::self_signed(&["localhost"]).map_err(|e| e.to_string())?;
    let cert = work.join("cert.pem");
    let key = work.join("key.pem");
    let combined = work.join("combined.pem");
    std::fs::write(&cert, &c).map_err(|e| e.to_string())?;
    std::fs::write(&key, &k).map_err(|e| e.to_string())?;
    std::fs::write(&combined, format!("{c}{k}")).map_err(|e| e.to_string())?;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(c.as_bytes())
        .map_err(|e| e.to_string())?;
    Ok(Certs {
        cert,
        key,
        combined,
        der,
    })
}

/// upgate with one runtime thread; `backend_ips` loopback addresses in its pool.
/// An upgate binary from `bin_dir` with one runtime thread, listening on
/// `port` (plain) and `port + 363` (TLS); `backend_ips` loopback addresses in its pool.
/// `name` tells builds apart (`upgate-base` is a build of another commit);
/// `upgate-frames` (and `upgate-frames-base`) route with `mode: frames` instead of splicing.
pub fn upgate(
    name: &str,
    bin_dir: &Path,
    port: u16,
    work: &Path,
    certs: &Certs,
    backend_ips: usize,
) -> Result<Proc, String> {
    let route = if name.starts_with("upgate-frames") {
        "{ name: echo, pool: echo, mode: frames, max_message: 67108864 }"
    } else {
        "{ name: echo, pool: echo }"
    };
    let tls_port = port + 363;
    let backends: Vec<String> = (0..backend_ips.max(1))
        .map(|i| format!("ws://127.0.0.{}:{BACKEND_PORT}", i + 1))
        .collect();
    let yaml = format!(
        "server: {{ max_connections: 400000, shutdown_grace: 1s }}\nlisten:\n  - addr: 127.0.0.1:{port}\n  - addr: 127.0.0.1:{tls_port}\n    tls: {{ certs: [{{ cert: {}, key: {} }}] }}\npools:\n  echo: {{ backends: [{}] }}\nroutes:\n  - {route}\n",
        certs.cert.display(),
        certs.key.display(),
        backends.join(", ")
    );
    let cfg = work.join(format!("{name}.yaml"));
    std::fs::write(&cfg, yaml).map_err(|e| e.to_string())?;
    let cfg_s = cfg.display().to_string();
    let child = spawn(
        port,
        "0",
        &bin_dir.join("upgate"),
        &["--config", &cfg_s, "--threads", "1"],
        &[("RUST_LOG", "warn")],
        &work.join(format!("{name}.log")),
    )?;
    wait_port(addr(port), name)?;
    Ok(Proc {
        name: name.into(),
        plain: addr(port),
        tls: Some(addr(tls_port)),
        child: Some(child),
    })
}

/// `--keepalive` for a floor relay: upgate's own default
/// (`server.tcp_keepalive`) when `on`, else off.
fn keepalive_secs(on: bool) -> String {
    let secs = if on {
        upgate::config::ServerSettings::default()
            .tcp_keepalive
            .as_secs()
    } else {
        0
    };
    secs.to_string()
}

/// The proxy floor (`upgate-bench-backend --relay`): reads the head,
/// connects, copies both ways; one thread on core 0 like the proxies. Its
/// TLS port (`--tls-relay`) does the same behind upgate's rustls config and
/// holds no buffer while idle: the floor for TLS rows and TLS idle memory.
/// `floor-ka` is the same with TCP keepalive on as upgate's default
/// (`server.tcp_keepalive`): the floor for upgate as it ships.
pub fn relay(bin_dir: &Path, work: &Path, certs: &Certs, keepalive: bool) -> Result<Proc, String> {
    let (name, port) = if keepalive {
        ("floor-ka", 18150)
    } else {
        ("floor", 18130)
    };
    let tls_port = port + 1;
    let spec = format!("127.0.0.1:{port}=127.0.0.1:{BACKEND_PORT}");
    let tls_spec = format!("127.0.0.1:{tls_port}=127.0.0.1:{BACKEND_PORT}");
    let (cert, key) = (
        certs.cert.display().to_string(),
        certs.key.display().to_string(),
    );
    let child = spawn(
        port,
        "0",
        &bin_dir.join("upgate-bench-backend"),
        &[
            "--relay",
            &spec,
            "--tls-relay",
            &tls_spec,
            "--cert",
            &cert,
            &key,
            "--keepalive",
            &keepalive_secs(keepalive),
        ],
        // Pages freed go back at once: the floor's memory is the least possible.
        &[("MIMALLOC_PURGE_DELAY", "0")],
        &work.join(format!("{name}.log")),
    )?;
    wait_port(addr(port), name)?;
    wait_port(addr(tls_port), &format!("{name} (TLS)"))?;
    Ok(Proc {
        name: name.into(),
        plain: addr(port),
        tls: Some(addr(tls_port)),
        child: Some(child),
    })
}

/// The floor below the floor (`upgate-bench-backend --epoll-relay`): the
/// same relay on one thread driving epoll itself, no runtime, the fewest
/// system calls Linux allows (bench/epoll_relay.rs); on core 0 like the
/// proxies. Plain only. `epoll-ka`: with upgate's default TCP keepalive.
pub fn epoll_relay(bin_dir: &Path, work: &Path, keepalive: bool) -> Result<Proc, String> {
    let (name, port) = if keepalive {
        ("epoll-ka", 18160)
    } else {
        ("epoll", 18140)
    };
    let spec = format!("127.0.0.1:{port}=127.0.0.1:{BACKEND_PORT}");
    let child = spawn(
        port,
        "0",
        &bin_dir.join("upgate-bench-backend"),
        &[
            "--epoll-relay",
            &spec,
            "--keepalive",
            &keepalive_secs(keepalive),
        ],
        &[("MIMALLOC_PURGE_DELAY", "0")],
        &work.join(format!("{name}.log")),
    )?;
    wait_port(addr(port), name)?;
    Ok(Proc {
        name: name.into(),
        plain: addr(port),
        tls: None,
        child: Some(child),
    })
}

pub fn nginx(work: &Path, certs: &Certs, max_conns: usize) -> Result<Proc, String> {
    let bin = which("nginx").ok_or("nginx not installed")?;
    let dir = work.join("nginx");
    std::fs::create_dir_all(dir.join("logs")).map_err(|e| e.to_string())?;
    let conf = format!(
        r#"worker_processes 1;
worker_rlimit_nofile {fds};
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections {fds}; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream echo {{ server 127.0.0.1:{BACKEND_PORT}; keepalive 64; }}
  server {{
    listen 127.0.0.1:18081;
    listen 127.0.0.1:18444 ssl;
    ssl_certificate {cert}; ssl_certificate_key {key};
    location / {{
      proxy_pass http://echo;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_set_header Host $host;
      proxy_read_timeout 3600s; proxy_send_timeout 3600s;
      proxy_buffering off;
    }}
  }}
}}
"#,
        d = dir.display(),
        cert = certs.cert.display(),
        key = certs.key.display(),
        fds = max_conns * 2 + 100
    );
    let cfg = dir.join("nginx.conf");
    std::fs::write(&cfg, conf).map_err(|e| e.to_string())?;
    let (p, c) = (dir.display().to_string(), cfg.display().to_string());
    let child = spawn(
        18081,
        "0",
        &bin,
        &["-p", &p, "-c", &c, "-g", "daemon off;"],
        &[],
        &dir.join("stderr.log"),
    )?;
    wait_port(addr(18081), "nginx")?;
    Ok(Proc {
        name: "nginx".into(),
        plain: addr(18081),
        tls: Some(addr(18444)),
        child: Some(child),
    })
}

pub fn haproxy(work: &Path, certs: &Certs, max_conns: usize) -> Result<Proc, String> {
    let bin = which("haproxy").ok_or("haproxy not installed")?;
    let conf = format!(
        r#"global
  nbthread 1
  maxconn {max_conns}
  tune.ssl.default-dh-param 2048
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
frontend fe
  bind 127.0.0.1:18082
  bind 127.0.0.1:18445 ssl crt {combined}
  maxconn {max_conns}
  default_backend be
backend be
  server s1 127.0.0.1:{BACKEND_PORT} maxconn {max_conns}
"#,
        combined = certs.combined.display()
    );
    let cfg = work.join("haproxy.cfg");
    std::fs::write(&cfg, conf).map_err(|e| e.to_string())?;
    let c = cfg.display().to_string();
    let child = spawn(
        18082,
        "0",
        &bin,
        &["-db", "-f", &c],
        &[],
        &work.join("haproxy.log"),
    )?;
    wait_port(addr(18082), "haproxy")?;
    Ok(Proc {
        name: "haproxy".into(),
        plain: addr(18082),
        tls: Some(addr(18445)),
        child: Some(child),
    })
}

pub fn caddy(work: &Path, certs: &Certs) -> Result<Proc, String> {
    let bin = which("caddy").ok_or("caddy not installed")?;
    let conf = format!(
        r#"{{
  admin off
  auto_https off
  storage file_system {d}/caddy-data
}}
http://:18083 {{
  bind 127.0.0.1
  reverse_proxy 127.0.0.1:{BACKEND_PORT}
}}
https://localhost:18446 {{
  bind 127.0.0.1
  tls {cert} {key}
  reverse_proxy 127.0.0.1:{BACKEND_PORT}
}}
"#,
        d = work.display(),
        cert = certs.cert.display(),
        key = certs.key.display()
    );
    let cfg = work.join("Caddyfile");
    std::fs::write(&cfg, conf).map_err(|e| e.to_string())?;
    let c = cfg.display().to_string();
    let h = work.display().to_string();
    let child = spawn(
        18083,
        "0",
        &bin,
        &["run", "--config", &c, "--adapter", "caddyfile"],
        &[
            ("GOMAXPROCS", "1"),
            ("HOME", &h),
            ("XDG_DATA_HOME", &h),
            ("XDG_CONFIG_HOME", &h),
        ],
        &work.join("caddy.log"),
    )?;
    wait_port(addr(18083), "caddy")?;
    Ok(Proc {
        name: "caddy".into(),
        plain: addr(18083),
        tls: Some(addr(18446)),
        child: Some(child),
    })
}

pub const FEED_PORT: u16 = 19101;

/// The timestamped feed (`upgate-bench-backend --feed`) pinned to `core`:
/// every connection receives `rate` messages/s of `size` bytes. `floor`
/// serves the connections from one plain write loop (`--floor`).
pub fn feed(
    bin_dir: &Path,
    work: &Path,
    core: &str,
    (rate, size): (u32, usize),
    floor: bool,
) -> Result<Proc, String> {
    let (a, r, s) = (
        format!("127.0.0.1:{FEED_PORT}"),
        rate.to_string(),
        size.to_string(),
    );
    let child = spawn(
        FEED_PORT,
        core,
        &bin_dir.join("upgate-bench-backend"),
        &[
            "--feed",
            &a,
            "--feed-rate",
            &r,
            "--feed-size",
            &s,
            "--floor",
        ][..if floor { 7 } else { 6 }],
        &[],
        &work.join("feed.log"),
    )?;
    wait_port(addr(FEED_PORT), "feed")?;
    Ok(Proc {
        name: "direct".into(),
        plain: addr(FEED_PORT),
        tls: None,
        child: Some(child),
    })
}

/// upgate with one fan-out route (`/feed`, one channel) over the feed, on
/// core 0 with one runtime thread (as the suite runs it).
pub fn upgate_fanout(
    bin_dir: &Path,
    work: &Path,
    cores: &str,
    threads: usize,
) -> Result<Proc, String> {
    let port = 18070;
    let yaml = format!(
        "server: {{ max_connections: 400000, shutdown_grace: 1s }}\nlisten:\n  - addr: 127.0.0.1:{port}\npools:\n  feed: {{ backends: ['ws://127.0.0.1:{FEED_PORT}'] }}\nroutes:\n  - {{ name: feed, path: /feed, pool: feed, mode: fanout, strip_prefix: true }}\n"
    );
    upgate_with(bin_dir, work, "upgate-fanout", &yaml, port, cores, threads)
}

/// A core upgate (fan-out route `/feed` over the feed, core 1) and `edges`
/// edge upgates (fan-out route `/feed` over the core, keeping the path;
/// core 0), one runtime thread each: tiered fan-out.
pub fn upgate_tiers(
    bin_dir: &Path,
    work: &Path,
    edges: usize,
) -> Result<(Proc, Vec<Proc>), String> {
    let core_port = 18071;
    let yaml = format!(
        "server: {{ max_connections: 400000, shutdown_grace: 1s }}\nlisten:\n  - addr: 127.0.0.1:{core_port}\npools:\n  feed: {{ backends: ['ws://127.0.0.1:{FEED_PORT}'] }}\nroutes:\n  - {{ name: feed, path: /feed, pool: feed, mode: fanout, strip_prefix: true }}\n"
    );
    let core = upgate_with(bin_dir, work, "upgate-core", &yaml, core_port, "1", 1)?;
    let mut out = Vec::new();
    for i in 0..edges {
        let port = core_port + 1 + i as u16;
        let yaml = format!(
            "server: {{ max_connections: 400000, shutdown_grace: 1s }}\nlisten:\n  - addr: 127.0.0.1:{port}\npools:\n  core: {{ backends: ['ws://127.0.0.1:{core_port}'] }}\nroutes:\n  - {{ name: feed, path: /feed, pool: core, mode: fanout }}\n"
        );
        out.push(upgate_with(
            bin_dir,
            work,
            &format!("upgate-edge{i}"),
            &yaml,
            port,
            "0",
            1,
        )?);
    }
    Ok((core, out))
}

/// An upgate from `bin_dir` running `yaml` (written to `work/NAME.yaml`,
/// logging to `work/NAME.log`), pinned to `cores` with `threads` runtime
/// threads, once it listens on `port`.
pub fn upgate_with(
    bin_dir: &Path,
    work: &Path,
    name: &str,
    yaml: &str,
    port: u16,
    cores: &str,
    threads: usize,
) -> Result<Proc, String> {
    let cfg = work.join(format!("{name}.yaml"));
    std::fs::write(&cfg, yaml).map_err(|e| e.to_string())?;
    let cfg_s = cfg.display().to_string();
    let child = spawn(
        port,
        cores,
        &bin_dir.join("upgate"),
        &["--config", &cfg_s, "--threads", &threads.to_string()],
        &[("RUST_LOG", "warn")],
        &work.join(format!("{name}.log")),
    )?;
    wait_port(addr(port), "upgate")?;
    Ok(Proc {
        name: "upgate".into(),
        plain: addr(port),
        tls: None,
        child: Some(child),
    })
}
