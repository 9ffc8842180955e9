//! A fleet on real network separation: network namespaces joined by a
//! bridge (one namespace per host: HAProxy, three upgates, three echo
//! backends, one client), HAProxy from Debian in TCP mode in front with
//! `send-proxy-v2` and health checks on upgate's `/readyz`, the way
//! operators run it. Every address lives inside namespaces this test makes
//! and removes; nothing touches the machine's own network.
//!
//! Needs root, `ip` (iproute2) and `haproxy`. Where namespaces cannot be
//! made, the tests say so and skip, unless `UPGATE_REQUIRE_FLEET` is set
//! (as `.ci/run` does), which makes that a failure.

mod support;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::{roundtrip, ws_over, Ws};
use tokio::net::TcpStream;

const SUBNET: &str = "10.241.0";
const HAPROXY: &str = "10.241.0.2";
const CLIENT: &str = "10.241.0.100";

/// The upgates' and backends' log filter: `FLEET_LOG`, or `info`.
fn fleet_log() -> String {
    std::env::var("FLEET_LOG").unwrap_or_else(|_| "info".into())
}

/// Runs `ip ARGS`; an error names the command.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The fleet's namespaces and processes; all removed on drop.
struct Fleet {
    tag: String,
    hosts: Vec<String>,
    procs: Vec<(String, Child)>,
    dir: support::TempDir,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for (_, c) in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &self.ns(h)]);
        }
        let _ = ip(&["netns", "del", &self.ns("sw")]);
    }
}

static FLEETS: AtomicUsize = AtomicUsize::new(0);

impl Fleet {
    fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.tag)
    }

    /// Makes the switch (a bridge in its own namespace) and no hosts yet.
    /// `None` (with the reason printed) where namespaces cannot be made.
    fn new() -> Option<Fleet> {
        // Interface names are at most 15 bytes: tag (≤ 9) + host (≤ 6).
        let tag = format!(
            "f{}x{}",
            std::process::id() % 100_000,
            FLEETS.fetch_add(1, Ordering::Relaxed) % 10
        );
        let f = Fleet {
            tag,
            hosts: Vec::new(),
            procs: Vec::new(),
            dir: support::TempDir::new("fleet"),
        };
        let sw = f.ns("sw");
        let made = ip(&["netns", "add", &sw])
            .and_then(|()| ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]))
            .and_then(|()| ip(&["-n", &sw, "link", "set", "br0", "up"]));
        match made {
            Ok(()) => Some(f),
            Err(e) if std::env::var_os("UPGATE_REQUIRE_FLEET").is_some() => {
                panic!("UPGATE_REQUIRE_FLEET is set but network namespaces cannot be made: {e}")
            }
            Err(e) => {
                eprintln!("SKIPPED: network namespaces cannot be made here ({e}); the fleet tests need root and iproute2");
                None
            }
        }
    }

    /// A host `name` at `SUBNET.last` on the switch.
    fn host(&mut self, name: &str, last: u8) {
        let (ns, sw) = (self.ns(name), self.ns("sw"));
        let (dev, peer) = (format!("{}e", self.tag), format!("{}{name}", self.tag));
        ip(&["netns", "add", &ns]).expect("netns add");
        self.hosts.push(name.to_string());
        ip(&[
            "-n", &sw, "link", "add", &peer, "type", "veth", "peer", "name", &dev, "netns", &ns,
        ])
        .expect("veth");
        ip(&["-n", &sw, "link", "set", &peer, "master", "br0"]).expect("bridge port");
        ip(&["-n", &sw, "link", "set", &peer, "up"]).expect("peer up");
        let addr = format!("{SUBNET}.{last}/24");
        ip(&["-n", &ns, "addr", "add", &addr, "dev", &dev]).expect("addr");
        ip(&["-n", &ns, "link", "set", &dev, "up"]).expect("dev up");
        ip(&["-n", &ns, "link", "set", "lo", "up"]).expect("lo up");
    }

    /// Starts `program ARGS` inside host `name`'s namespace.
    fn run(&mut self, name: &str, program: &str, args: &[&str]) {
        let log = std::fs::File::create(self.dir.0.join(format!("{name}.log"))).expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(name), program])
            .args(args)
            .env("RUST_LOG", fleet_log())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn");
        self.procs.push((name.to_string(), child));
    }

    /// SIGKILLs the process(es) started on host `name`.
    fn kill(&mut self, name: &str) {
        for (n, c) in self.procs.iter_mut().filter(|(n, _)| n == name) {
            let _ = c.kill();
            let _ = c.wait();
            eprintln!("killed {n}");
        }
        self.procs.retain(|(n, _)| n != name);
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.0.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Three echo backends, three upgates (PROXY protocol listeners,
    /// `balance: hash` on `X-Key`), HAProxy in front, and the client host.
    fn standard() -> Option<Fleet> {
        let mut f = Fleet::new()?;
        let upgate = env!("CARGO_BIN_EXE_upgate");
        for (i, b) in ["b1", "b2", "b3"].iter().enumerate() {
            f.host(b, 21 + i as u8);
            let listen = format!("{SUBNET}.{}:9001", 21 + i);
            f.run(
                b,
                upgate,
                &["demo-backend", "--listen", &listen, "--name", b],
            );
        }
        for (i, u) in ["u1", "u2", "u3"].iter().enumerate() {
            f.host(u, 11 + i as u8);
            // What docs/operations.md asks of hosts that restart in place:
            // connections queued to a closing listener move to the new
            // process's listener instead of being reset (Linux 5.14+).
            let ok = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &f.ns(u),
                    "sysctl",
                    "-qw",
                    "net.ipv4.tcp_migrate_req=1",
                ])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "sysctl net.ipv4.tcp_migrate_req=1 in {u}");
            let me = format!("{SUBNET}.{}", 11 + i);
            let yaml = format!(
                "server: {{ shutdown_grace: 3s }}\nadmin: {{ addr: '{me}:9901', insecure: true }}\nlisten:\n  - {{ addr: '{me}:8080', proxy_protocol: true }}\npools:\n  echo:\n    balance: hash\n    hash_key: header:X-Key\n    connect_timeout: 1s\n    eject_after: 1\n    backends: [ws://{SUBNET}.21:9001, ws://{SUBNET}.22:9001, ws://{SUBNET}.23:9001]\nroutes:\n  - {{ name: echo, path: /, pool: echo }}\n"
            );
            let cfg = f.dir.0.join(format!("{u}.yaml"));
            std::fs::write(&cfg, yaml).expect("config");
            let cfg = cfg.display().to_string();
            f.run(u, upgate, &["--config", &cfg, "run"]);
        }
        f.host("hap", 2);
        let servers: String = (1..=3)
            .map(|i| format!("  server u{i} {SUBNET}.1{i}:8080\n"))
            .collect();
        let hap = format!(
            "global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n  retries 3\n  option redispatch\nfrontend ws\n  bind {HAPROXY}:80\n  default_backend upgates\nbackend upgates\n  balance roundrobin\n  option httpchk\n  http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost\n  http-check expect status 200\n  default-server inter 200ms fall 2 rise 2 send-proxy-v2 check port 9901\n{servers}"
        );
        let cfg = f.dir.0.join("haproxy.cfg");
        std::fs::write(&cfg, hap).expect("haproxy.cfg");
        let cfg = cfg.display().to_string();
        f.run("hap", "haproxy", &["-f", &cfg, "-db"]);
        f.host("client", 100);
        Some(f)
    }

    /// Runs `job` on a thread inside host `name`'s network namespace and
    /// waits for it (a panic there reports every process's output).
    fn on<T, Fut>(&self, name: &str, job: impl FnOnce() -> Fut + Send + 'static) -> T
    where
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        self.spawn_on(name, job).join().unwrap_or_else(|e| {
            self.dump_logs();
            std::panic::resume_unwind(e)
        })
    }

    /// Starts `job` on a thread inside host `name`'s network namespace, with
    /// its own runtime: every socket it opens lives in that namespace.
    fn spawn_on<T, Fut>(
        &self,
        name: &str,
        job: impl FnOnce() -> Fut + Send + 'static,
    ) -> std::thread::JoinHandle<T>
    where
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.ns(name));
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("namespace file");
            // SAFETY: setns(2) with a valid open namespace descriptor and
            // CLONE_NEWNET moves only this (new, otherwise unused) thread
            // into the namespace; no memory is shared with the call.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(job())
        })
    }

    /// Every process's output, for a failure's report.
    fn dump_logs(&self) {
        for (name, _) in &self.procs {
            eprintln!("--- {name}:\n{}", self.log(name));
        }
    }
}

/// A WebSocket session through HAProxy with `X-Key: key`, or why not.
async fn open(key: &str) -> Result<Ws<TcpStream>, String> {
    let addr: SocketAddr = format!("{HAPROXY}:80").parse().expect("addr");
    let tcp = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    tokio::time::timeout(
        Duration::from_secs(3),
        ws_over(tcp, "fleet", "/", &[("X-Key", key)]),
    )
    .await
    .map_err(|_| "handshake timed out".to_string())?
    .map_err(|e| format!("handshake: {e}"))
}

/// What a demo backend says of a session: (backend, the upgate it came
/// through, the client address it was given).
async fn who(ws: &mut Ws<TcpStream>) -> (String, String, String) {
    let a = roundtrip(ws, "/whoami").await;
    let field = |prefix: &str| {
        a.split_whitespace()
            .find_map(|w| w.strip_prefix(prefix))
            .unwrap_or("")
            .to_string()
    };
    let peer = field("peer=");
    let upgate = peer
        .rsplit_once(':')
        .map_or(peer.clone(), |(h, _)| h.to_string());
    let xff = a
        .lines()
        .find_map(|l| l.strip_prefix("x-forwarded-for: "))
        .unwrap_or("")
        .to_string();
    (field("backend="), upgate, xff)
}

/// Whether the session still answers (a reset or a close says no).
async fn answers(ws: &mut Ws<TcpStream>) -> bool {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    if ws.send(Message::text("still?")).await.is_err() {
        return false;
    }
    let next = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(_))) => return true,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                _ => return false,
            }
        }
    });
    next.await.unwrap_or(false)
}

/// Waits until a session through HAProxy works (every upgate and HAProxy's
/// checks are up), within 20 s.
async fn until_ready() {
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < Duration::from_secs(20) {
        match open("ready").await {
            Ok(mut ws) => {
                let _ = roundtrip(&mut ws, "ping").await;
                return;
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the fleet never answered: {last}");
}

/// Client addresses reach the backends through HAProxy (PROXY v2) on every
/// upgate host, and consistent hashing agrees across the fleet: a key goes
/// to the same backend through any upgate, and losing a backend moves only
/// its own keys.
#[test]
#[cfg_attr(
    any(no_haproxy, no_iproute),
    ignore = "needs haproxy and iproute2 (apt-get install haproxy iproute2)"
)]
fn through_haproxy_every_upgate_passes_the_client_address_and_hashing_agrees() {
    let Some(mut fleet) = Fleet::standard() else {
        return;
    };
    let keys: Vec<String> = (0..12).map(|k| format!("key-{k}")).collect();
    let ks = keys.clone();
    // (key, backend, upgate, client address) for 4 sessions per key.
    let seen = fleet.on("client", move || async move {
        until_ready().await;
        let mut seen = Vec::new();
        for round in 0..4 {
            for k in &ks {
                let mut ws = open(k)
                    .await
                    .unwrap_or_else(|e| panic!("round {round}, {k}: {e}"));
                let (b, u, xff) = who(&mut ws).await;
                seen.push((k.clone(), b, u, xff));
            }
        }
        seen
    });
    let upgates: std::collections::BTreeSet<&str> = seen.iter().map(|s| s.2.as_str()).collect();
    assert_eq!(
        upgates.len(),
        3,
        "HAProxy spread sessions over every upgate: {upgates:?}"
    );
    for (k, b, u, xff) in &seen {
        assert_eq!(
            xff, CLIENT,
            "{k} through {u} (backend {b}): the client's own address"
        );
    }
    let owner = |k: &str| -> String {
        let owners: std::collections::BTreeSet<&str> = seen
            .iter()
            .filter(|s| s.0 == k)
            .map(|s| s.1.as_str())
            .collect();
        assert_eq!(
            owners.len(),
            1,
            "{k} reached {owners:?} through different upgates"
        );
        owners.into_iter().next().unwrap_or("").to_string()
    };
    let before: Vec<(String, String)> = keys.iter().map(|k| (k.clone(), owner(k))).collect();
    let lost = before[0].1.clone();
    assert!(
        before.iter().any(|(_, b)| *b != lost),
        "12 keys all on one backend: {before:?}"
    );
    // Lose the backend of the first key.
    fleet.kill(&lost);
    let ks = keys.clone();
    let after = fleet.on("client", move || async move {
        let mut after = Vec::new();
        for round in 0..3 {
            for k in &ks {
                let mut ws = open(k)
                    .await
                    .unwrap_or_else(|e| panic!("after, round {round}, {k}: {e}"));
                let (b, u, _) = who(&mut ws).await;
                after.push((k.clone(), b, u));
            }
        }
        after
    });
    for (k, was) in &before {
        let now: std::collections::BTreeSet<&str> = after
            .iter()
            .filter(|s| s.0 == *k)
            .map(|s| s.1.as_str())
            .collect();
        assert_eq!(now.len(), 1, "{k} after the loss: {now:?}");
        let now = now.into_iter().next().unwrap_or("");
        if *was == lost {
            assert_ne!(now, lost, "{k} moved off the lost backend");
        } else {
            assert_eq!(now, was, "{k} stayed where it was");
        }
    }
    let moved = before.iter().filter(|(_, b)| *b == lost).count();
    eprintln!(
        "fleet: 3 upgates behind HAProxy; {} sessions all carried the client address; {} keys agree across upgates; losing {lost} moved its {moved} keys and no other",
        seen.len(),
        keys.len()
    );
}

/// One upgate host is lost (its process killed): sessions opened after it
/// succeed on the others (HAProxy redispatches and its checks on /readyz
/// mark it down), and its own clients reconnect and land elsewhere.
#[test]
#[cfg_attr(
    any(no_haproxy, no_iproute),
    ignore = "needs haproxy and iproute2 (apt-get install haproxy iproute2)"
)]
fn losing_an_upgate_host_fails_no_new_session() {
    let Some(mut fleet) = Fleet::standard() else {
        return;
    };
    // 30 held sessions over the three upgates.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let holder = fleet.spawn_on("client", move || async move {
        until_ready().await;
        let mut held = Vec::new();
        for i in 0..30 {
            let mut ws = open(&format!("h{i}")).await.expect("held session");
            let (_, u, _) = who(&mut ws).await;
            held.push((u, ws));
        }
        let _ = done_tx.send(held.iter().map(|(u, _)| u.clone()).collect::<Vec<_>>());
        // Wait for the kill, then see who ended, and open as many again
        // while counting failures of new sessions, for 3 s.
        let _ = tokio::task::spawn_blocking(move || rx.recv()).await;
        let killed_at = Instant::now();
        let (mut ok, mut failed, mut first_fail, mut last_fail) = (0, 0, None, None);
        let mut landed = Vec::new();
        while killed_at.elapsed() < Duration::from_secs(3) {
            match open(&format!("n{ok}")).await {
                Ok(mut ws) => {
                    let (_, u, _) = who(&mut ws).await;
                    landed.push(u);
                    ok += 1;
                }
                Err(e) => {
                    failed += 1;
                    first_fail.get_or_insert(killed_at.elapsed());
                    last_fail = Some((killed_at.elapsed(), e));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The lost host's clients: their sessions ended; they reconnect.
        let mut ended = 0;
        let mut relanded = Vec::new();
        for (u, ws) in held.iter_mut() {
            let alive = answers(ws).await;
            if !alive {
                ended += 1;
                let mut again = open("back").await.expect("reconnect");
                let (_, now, _) = who(&mut again).await;
                relanded.push((u.clone(), now));
            }
        }
        (ok, failed, first_fail, last_fail, landed, ended, relanded)
    });
    let Ok(held_on) = done_rx.recv_timeout(Duration::from_secs(60)) else {
        fleet.dump_logs();
        panic!("the sessions were not held");
    };
    let held_on: Vec<String> = held_on;
    let victim_ip = format!("{SUBNET}.11");
    let on_victim = held_on.iter().filter(|u| **u == victim_ip).count();
    assert!(on_victim > 0, "no session on u1: {held_on:?}");
    fleet.kill("u1");
    let killed = Instant::now();
    tx.send(()).expect("holder alive");
    // HAProxy's checks on /readyz (every 200 ms, down after 2 misses) take
    // the host out of rotation; until then `redispatch` retries elsewhere.
    let mut marked_down = None;
    while killed.elapsed() < Duration::from_secs(5) {
        if fleet.log("hap").contains("upgates/u1 is DOWN") {
            marked_down = Some(killed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (ok, failed, first_fail, last_fail, landed, ended, relanded) =
        holder.join().expect("holder");
    assert_eq!(
        failed, 0,
        "new sessions failed after losing u1 ({failed} of {}; first at {first_fail:?}, last {last_fail:?})",
        ok + failed
    );
    assert!(
        landed.iter().all(|u| *u != victim_ip),
        "a session reached the dead host"
    );
    assert_eq!(ended, on_victim, "exactly the lost host's sessions ended");
    assert!(relanded
        .iter()
        .all(|(was, now)| *was == victim_ip && *now != victim_ip));
    let Some(marked_down) = marked_down else {
        fleet.dump_logs();
        panic!("HAProxy never marked u1 down");
    };
    eprintln!(
        "fleet: u1 killed under 30 sessions ({on_victim} on it): HAProxy marked it down after {marked_down:?}; {ok} new sessions in the next 3 s, {failed} failed; its {ended} clients reconnected elsewhere"
    );
}

/// A rolling upgrade of the three upgate hosts: on each, a new process is
/// started on the same ports (SO_REUSEPORT) and the old one is sent
/// SIGTERM; it drains. New sessions opened all along never fail, and no
/// held session is cut before `shutdown_grace` (3 s) has passed since its
/// host's SIGTERM.
#[test]
#[cfg_attr(
    any(no_haproxy, no_iproute),
    ignore = "needs haproxy and iproute2 (apt-get install haproxy iproute2)"
)]
fn a_rolling_upgrade_of_every_upgate_host_fails_no_handshake() {
    let Some(mut fleet) = Fleet::standard() else {
        return;
    };
    let grace = Duration::from_secs(3);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Vec<String>>();
    let (term_tx, term_rx) = std::sync::mpsc::channel::<Option<(String, Instant)>>();
    let client = fleet.spawn_on("client", move || async move {
        use futures_util::StreamExt;
        until_ready().await;
        // 15 held sessions; each records when it ended.
        let mut ends = Vec::new();
        let mut hosts = Vec::new();
        for i in 0..15 {
            let mut ws = open(&format!("h{i}")).await.expect("held session");
            let (_, u, _) = who(&mut ws).await;
            hosts.push(u.clone());
            ends.push(tokio::spawn(async move {
                while let Some(Ok(_)) = ws.next().await {}
                (u, Instant::now())
            }));
        }
        let _ = ready_tx.send(hosts);
        // New sessions every 20 ms until the upgrade is over.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let terms = tokio::task::spawn_blocking(move || {
            let mut terms = Vec::new();
            while let Ok(Some(t)) = term_rx.recv() {
                terms.push(t);
            }
            s.store(true, Ordering::Relaxed);
            terms
        });
        let (mut ok, mut failed) = (0, Vec::new());
        let began = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let at = began.elapsed();
            match open(&format!("n{ok}"))
                .await
                .map_err(|e| format!("{e} (opened {at:?} into the upgrade)"))
            {
                Ok(mut ws) => {
                    if answers(&mut ws).await {
                        ok += 1;
                    } else {
                        failed.push("no answer after the upgrade".to_string());
                    }
                }
                Err(e) => failed.push(e),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let terms = terms.await.expect("terms");
        let mut ended = Vec::new();
        for e in ends {
            ended.push(e.await.expect("end"));
        }
        (ok, failed, terms, ended)
    });
    let hosts = ready_rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            fleet.dump_logs();
            panic!("the sessions were not held")
        });
    let upgate = env!("CARGO_BIN_EXE_upgate");
    let began = Instant::now();
    for u in ["u1", "u2", "u3"] {
        let old: Vec<u32> = fleet
            .procs
            .iter()
            .filter(|(n, _)| n == u)
            .map(|(_, c)| c.id())
            .collect();
        let cfg = fleet.dir.0.join(format!("{u}.yaml")).display().to_string();
        let next = format!("{u}-new");
        let log = std::fs::File::create(fleet.dir.0.join(format!("{next}.log"))).expect("log");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &fleet.ns(u),
                upgate,
                "--config",
                &cfg,
                "run",
            ])
            .env("RUST_LOG", fleet_log())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn");
        fleet.procs.push((next.clone(), child));
        let t0 = Instant::now();
        while !fleet.log(&next).contains("listening on") {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{next} never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        for pid in old {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let ip_of = format!("{SUBNET}.1{}", &u[1..]);
        eprintln!("SIGTERM to the old {u} at {:?}", began.elapsed());
        term_tx
            .send(Some((ip_of, Instant::now())))
            .expect("client alive");
        // One host at a time, as operators roll: the old process must have
        // exited (at most `shutdown_grace` later) before the next host.
        // While both processes share the admin port, HAProxy's checks meet
        // the old one's `503 draining` about half the time and may mark the
        // host down; overlapping every host's drain could so mark them all
        // down at once (seen: ~400 ms without a server).
        let t0 = Instant::now();
        loop {
            let mut alive = false;
            for (_, c) in fleet.procs.iter_mut().filter(|(n, _)| n == u) {
                alive |= matches!(c.try_wait(), Ok(None));
            }
            if !alive {
                break;
            }
            assert!(
                t0.elapsed() < grace + Duration::from_secs(5),
                "the old {u} did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        fleet.procs.retain(|(n, _)| n != u);
    }
    term_tx.send(None).expect("client alive");
    let (ok, failed, terms, ended) = client.join().expect("client");
    if !failed.is_empty() {
        fleet.dump_logs();
    }
    assert!(
        failed.is_empty(),
        "{} of {} new sessions failed during the rolling upgrade: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    for (u, at) in &ended {
        let term = terms
            .iter()
            .find(|(h, _)| h == u)
            .map(|(_, t)| *t)
            .unwrap_or_else(|| panic!("a session on {u}, which was never upgraded"));
        let lived = at.saturating_duration_since(term);
        assert!(
            lived + Duration::from_millis(100) >= grace,
            "a session on {u} was cut {lived:?} after its SIGTERM, before shutdown_grace"
        );
    }
    eprintln!(
        "fleet: rolling upgrade of 3 upgates: {ok} new sessions, 0 failed; {} held sessions ({hosts:?}) each lasted shutdown_grace after its host's SIGTERM",
        ended.len()
    );
}
