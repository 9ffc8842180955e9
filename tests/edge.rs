//! The edge against clients that misbehave: HTTP/1.0 upgrades, protocol
//! sniffing that must not spin, one deadline from accept to a complete
//! request head, and idle connections that are closed.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::feed::raise_nofile;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

fn config(backends: &[std::net::SocketAddr], server: &str) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("ws://{a}")).collect();
    format!(
        "listen:\n  - addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\nserver:\n{server}pools:\n  p:\n    connect_timeout: 1s\n    backends: [{}]\nroutes:\n  - name: r\n    path: /chat\n    pool: p\n",
        list.join(", ")
    )
}

/// Reads until the peer closes; how long that took from `since`.
async fn closed_after(s: &mut TcpStream, since: Instant) -> Duration {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(T, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return since.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("still open after {T:?}"),
        }
    }
}

/// CPU time (user + system) this process has used, from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which may hold spaces) start at state (3).
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

#[tokio::test]
async fn an_http10_upgrade_is_refused_not_relayed() {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&config(&be.addrs, "  idle_timeout: 60s\n")).await;
    let answer = raw(
        gw.addr(),
        b"GET /chat HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.0 400"), "{answer}");
    assert!(answer.contains("needs HTTP/1.1"), "{answer}");
    let admin = gw.admin.expect("admin");
    assert_eq!(
        metric(admin, "upgate_upgrades_total", "outcome=\"rejected\"").await,
        1
    );
    assert_eq!(
        metric(admin, "upgate_upgrades_total", "outcome=\"ok\"").await,
        0
    );
    // The same request as HTTP/1.1 still works.
    let mut ws = ws(gw.addr(), "x", "/chat").await;
    assert_eq!(roundtrip(&mut ws, "hi").await, "hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_stalled_in_the_preface_cost_no_cpu() {
    raise_nofile();
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&config(&be.addrs, "  handshake_timeout: 30s\n")).await;
    let mut stalled = Vec::new();
    for _ in 0..1000 {
        let mut s = TcpStream::connect(gw.addr()).await.expect("connect");
        s.write_all(b"PR").await.expect("write");
        stalled.push(s);
    }
    // Let the gateway take them all in, then measure a quiet second.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (cpu0, t0) = (cpu_time(), Instant::now());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let share = cpu_time().saturating_sub(cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    // A 5 ms re-peek timer costs ~200,000 wake-ups a second here (> 30 % of a core).
    assert!(share < 0.08, "{:.1} % of a core while idle", share * 100.0);

    // A trickled HTTP/2 preface is still recognised, and a trickled POST is HTTP/1.1.
    let mut h2 = TcpStream::connect(gw.addr()).await.expect("connect");
    for part in [
        &b"P"[..],
        b"R",
        b"I * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\0\0\0\x04\0\0\0\0\0",
    ] {
        h2.write_all(part).await.expect("write");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut head = [0u8; 9];
    tokio::time::timeout(T, h2.read_exact(&mut head))
        .await
        .expect("answer in time")
        .expect("read");
    assert_eq!(
        head[3], 0x4,
        "the server's first frame is SETTINGS: {head:?}"
    );
    let mut post = TcpStream::connect(gw.addr()).await.expect("connect");
    for part in [
        &b"P"[..],
        b"O",
        b"ST /none HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    ] {
        post.write_all(part).await.expect("write");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut answer = [0u8; 12];
    tokio::time::timeout(T, post.read_exact(&mut answer))
        .await
        .expect("answer in time")
        .expect("read");
    assert_eq!(&answer, b"HTTP/1.1 404");
    drop(stalled);
}

#[tokio::test]
async fn handshake_timeout_is_one_deadline_from_accept_to_a_complete_head() {
    let be = echo_backends(&["a"]).await;
    let dir = TempDir::new("edge-deadline");
    let (cert, key, der) = cert_files(&dir.0, "c", &["localhost"]);
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\n  - addr: 127.0.0.1:0\n    tls: {{ certs: [{{ cert: {}, key: {} }}] }}\nadmin:\n  addr: 127.0.0.1:0\nserver:\n  handshake_timeout: 1s\npools:\n  p:\n    backends: ['ws://{}']\nroutes:\n  - name: r\n    path: /chat\n    pool: p\n",
        cert.display(),
        key.display(),
        be.addrs[0]
    );
    let gw = gateway_in(&dir.0, &yaml).await;
    // Plain: the first byte at 0.7 s, then one byte every 100 ms, never a whole head.
    let t0 = Instant::now();
    let mut s = TcpStream::connect(gw.addrs[0]).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let trickle = async {
        for b in b"GET /chat HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    trickle.await;
    let took = closed_after(&mut s, t0).await;
    // One deadline: ~1.0 s. Two in a row (sniffing, then hyper's own) would be >= 1.7 s.
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1500),
        "closed after {took:?}"
    );
    // TLS: a handshake that takes 0.7 s leaves 0.3 s for the head.
    let t0 = Instant::now();
    let tcp = TcpStream::connect(gw.addrs[1]).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut tls = tls_over(tcp, "localhost", client_config(&[der], &[b"http/1.1"]))
        .await
        .expect("TLS handshake");
    let _ = tls.write_all(b"GET /chat HTTP/1.1\r\n").await;
    let mut buf = [0u8; 256];
    let end = tokio::time::timeout(T, tls.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    let took = t0.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "TLS closed after {took:?}"
    );
    // HTTP/2 that opens its connection but never a stream: closed at the deadline too.
    let t0 = Instant::now();
    let tcp = TcpStream::connect(gw.addrs[0]).await.expect("connect");
    let (_send, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    let _ = tokio::time::timeout(T, conn).await.expect("closed in time");
    let took = t0.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "HTTP/2 closed after {took:?}"
    );
    let admin = gw.admin.expect("admin");
    for (l, n) in gw.addrs.iter().zip([2, 1]) {
        let labels = format!("listener=\"{l}\",reason=\"handshake_timeout\"");
        assert_eq!(
            metric(admin, "upgate_connections_closed_by_timeout_total", &labels).await,
            n,
            "{l}"
        );
    }
}

#[tokio::test]
async fn idle_keepalive_and_http2_connections_are_closed_but_sessions_are_not() {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&config(&be.addrs, "  idle_timeout: 1s\n")).await;
    // HTTP/1.1 keep-alive: closed 1-1.25 s after its last response.
    let mut s = TcpStream::connect(gw.addr()).await.expect("connect");
    s.write_all(b"GET /none HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 404"));
    let took = closed_after(&mut s, Instant::now()).await;
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "HTTP/1.1 idle close after {took:?}"
    );
    // HTTP/2 that only answers PINGs: closed (GOAWAY) the same way.
    let tcp = TcpStream::connect(gw.addr()).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .keep_alive_interval(Duration::from_millis(200))
        .timer(hyper_util::rt::TokioTimer::new())
        .handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
        .await
        .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let req = http::Request::get("http://x/none")
        .body(Empty::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 404);
    let t0 = Instant::now();
    tokio::time::timeout(T, conn)
        .await
        .expect("h2 connection closed in time")
        .expect("join")
        .expect("clean close");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "HTTP/2 idle close after {took:?}"
    );
    let labels = "reason=\"idle\"";
    assert_eq!(
        metric(
            gw.admin.expect("admin"),
            "upgate_connections_closed_by_timeout_total",
            labels
        )
        .await,
        2
    );
    // A quiet WebSocket session is not an idle connection.
    let mut ws = ws(gw.addr(), "x", "/chat").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(roundtrip(&mut ws, "still here").await, "still here");
}
