//! Route session limits: `max_sessions` (503 beyond it) and
//! `max_sessions_per_ip` (429 beyond it), on splice and fan-out routes,
//! released when sessions end or fail to start.

mod support;

use std::time::Duration;

use support::feed::Feed;
use support::*;
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(10);

/// Retries an upgrade until it is admitted (a place frees when the session
/// that held it has ended on the gateway's side).
async fn admitted_within(addr: std::net::SocketAddr, path: &str) -> Ws<tokio::net::TcpStream> {
    let t0 = std::time::Instant::now();
    loop {
        match ws_with(addr, "h", path, &[]).await {
            Ok(s) => return s,
            Err(e) => {
                let (status, _, body) = refusal(e);
                assert_eq!(status, 503, "{body}");
                assert!(t0.elapsed() < T, "the place never came back");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test]
async fn max_sessions_refuses_with_503_and_places_come_back() {
    let be = echo_backends(&["a"]).await;
    let dead = dead_addr().await;
    let feed = Feed::start().await;
    let gw = gateway(&format!(
        "admin: {{ addr: '127.0.0.1:0' }}\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://{}] }}\n  dead: {{ backends: [ws://{dead}] }}\n  feed: {{ backends: ['{}'] }}\nroutes:\n  - {{ name: r, path: /r, pool: p, max_sessions: 2 }}\n  - {{ name: open, path: /open, pool: p }}\n  - {{ name: d, path: /d, pool: dead, max_sessions: 1 }}\n  - {{ name: f, path: /f, pool: feed, mode: fanout, max_sessions: 1 }}\n",
        be.addrs[0],
        feed.url()
    ))
    .await;
    let addr = gw.addr();
    let mut one = ws(addr, "h", "/r").await;
    let mut two = ws(addr, "h", "/r").await;
    let (status, retry, body) = refusal(ws_with(addr, "h", "/r", &[]).await.unwrap_err());
    assert_eq!((status, retry.as_str()), (503, "1"), "{body}");
    assert!(
        body.contains("route `r` is at its limit of 2 sessions"),
        "{body}"
    );
    // Other routes are not affected, and the admitted sessions work.
    let mut open = ws(addr, "h", "/open").await;
    assert_eq!(roundtrip(&mut open, "o").await, "o");
    assert_eq!(roundtrip(&mut one, "1").await, "1");
    // A session that ends gives its place back.
    two.close(None).await.unwrap();
    drop(two);
    let mut three = admitted_within(addr, "/r").await;
    assert_eq!(roundtrip(&mut three, "3").await, "3");

    // An upgrade that fails (no backend) does not keep its place.
    for _ in 0..3 {
        let (status, _, body) = refusal(ws_with(addr, "h", "/d", &[]).await.unwrap_err());
        assert_eq!(status, 502, "{body}");
    }

    // Fan-out clients count the same way.
    let first = ws(addr, "h", "/f").await;
    let (status, _, body) = refusal(ws_with(addr, "h", "/f", &[]).await.unwrap_err());
    assert_eq!(status, 503, "{body}");
    drop(first);
    admitted_within(addr, "/f").await;

    let m = admin_request(gw.admin.expect("admin"), "GET", "/metrics", None).await;
    let refused_r: u64 = m
        .body
        .lines()
        .find_map(|l| l.strip_prefix("upgate_sessions_refused_total{route=\"r\",limit=\"route\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(refused_r >= 1, "{}", m.body);
    for line in [
        "upgate_sessions_refused_total{route=\"d\",limit=\"route\"} 0",
        "upgate_sessions_refused_total{route=\"r\",limit=\"client\"} 0",
    ] {
        assert!(m.body.contains(line), "no `{line}` in\n{}", m.body);
    }
}

#[tokio::test]
async fn max_sessions_per_ip_refuses_with_429_per_client_address() {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&format!(
        "admin: {{ addr: '127.0.0.1:0' }}\nlisten:\n  - {{ addr: 127.0.0.1:0, proxy_protocol: true }}\npools:\n  p: {{ backends: [ws://{}] }}\nroutes:\n  - {{ name: r, path: /, pool: p, max_sessions_per_ip: 2 }}\n",
        be.addrs[0]
    ))
    .await;
    // Clients behind a balancer: the PROXY header gives each one's address.
    let addr = gw.addr();
    let from = |ip: &'static str| async move {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(format!("PROXY TCP4 {ip} 127.0.0.1 1000 80\r\n").as_bytes())
            .await
            .unwrap();
        ws_over(tcp, "h", "/", &[]).await
    };
    let mut a1 = from("192.0.2.1").await.unwrap();
    let _a2 = from("192.0.2.1").await.unwrap();
    let (status, retry, body) = refusal(from("192.0.2.1").await.unwrap_err());
    assert_eq!((status, retry.as_str()), (429, "1"), "{body}");
    assert!(
        body.contains("192.0.2.1 already has 2 sessions on route `r`"),
        "{body}"
    );
    let mut b = from("192.0.2.2").await.expect("another client is admitted");
    assert_eq!(roundtrip(&mut b, "b").await, "b");
    assert_eq!(roundtrip(&mut a1, "a").await, "a");
    let admin = gw.admin.expect("admin");
    let routes: serde_json::Value =
        serde_json::from_str(&admin_request(admin, "GET", "/routes", None).await.body).unwrap();
    assert_eq!(routes["routes"][0]["clients"], 2, "{routes}");
    assert_eq!(routes["routes"][0]["max_sessions_per_ip"], 2, "{routes}");
    let m = admin_request(admin, "GET", "/metrics", None).await;
    let line = "upgate_sessions_refused_total{route=\"r\",limit=\"client\"} 1";
    assert!(m.body.contains(line), "no `{line}` in\n{}", m.body);
}

#[tokio::test]
async fn limits_count_sessions_across_reloads_and_take_new_values_at_once() {
    let be = echo_backends(&["a"]).await;
    let dir = TempDir::new("limits-reload");
    let file = dir.0.join("routes.yaml");
    let y = |max: u32, extra: &str| {
        format!(
            "server: {{ watch_interval: 0s }}\nadmin: {{ addr: '127.0.0.1:0' }}\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://{}] }}\nroutes:\n  - {{ name: r, path: /r, pool: p, max_sessions: {max} }}\n{extra}",
            be.addrs[0]
        )
    };
    std::fs::write(&file, y(1, "")).unwrap();
    let gw = gateway_file(&file).await;
    let (addr, admin) = (gw.addr(), gw.admin.expect("admin"));
    let mut first = ws(addr, "h", "/r").await;
    // A reload that leaves the route as it is: the live session still counts.
    std::fs::write(&file, y(1, "  - { name: other, path: /o, pool: p }\n")).unwrap();
    let r = admin_request(admin, "POST", "/reload", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (status, _, body) = refusal(ws_with(addr, "h", "/r", &[]).await.unwrap_err());
    assert_eq!(status, 503, "{body}");
    // A higher limit applies to the next upgrade.
    std::fs::write(&file, y(2, "")).unwrap();
    let r = admin_request(admin, "POST", "/reload", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut second = ws(addr, "h", "/r").await;
    assert_eq!(roundtrip(&mut second, "2").await, "2");
    assert_eq!(roundtrip(&mut first, "1").await, "1");
    let (status, _, _) = refusal(ws_with(addr, "h", "/r", &[]).await.unwrap_err());
    assert_eq!(status, 503, "two sessions fill a limit of 2");
}
