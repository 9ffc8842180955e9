//! Health: passive ejection, active checks with thresholds, 503 when nothing
//! is available, fail_open, and draining backends.

mod support;

use std::time::Duration;

use support::*;
use upgate::demo;

fn pool_yaml(pool_extra: &str, backends: &str) -> String {
    format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  p:\n    connect_timeout: 1s\n{pool_extra}    backends: [{backends}]\nroutes:\n  - {{ name: r, pool: p }}\n"
    )
}

fn status_of(err: tokio_tungstenite::tungstenite::Error) -> (u16, Option<String>) {
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => (
            resp.status().as_u16(),
            resp.headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap_or("").to_string()),
        ),
        e => panic!("expected an HTTP answer, got {e}"),
    }
}

/// Polls (bounded) until a WebSocket upgrade gets `want` (0 = success).
async fn until_status(addr: std::net::SocketAddr, want: u16) {
    for _ in 0..100 {
        let got = match ws_with(addr, "h", "/", &[]).await {
            Ok(_) => 0,
            Err(e) => status_of(e).0,
        };
        if got == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never answered {want}");
}

#[tokio::test]
async fn consecutive_failures_eject_and_answer_503_with_retry_after() {
    let dead = dead_addr().await;
    let gw = gateway(&pool_yaml(
        "    eject_after: 2\n    eject_for: 30s\n",
        &format!("ws://{dead}"),
    ))
    .await;
    for _ in 0..2 {
        let (status, _) = status_of(ws_with(gw.addr(), "h", "/", &[]).await.unwrap_err());
        assert_eq!(status, 502);
    }
    // Ejected now: the gateway stops hammering it and says when to come back.
    let (status, retry) = status_of(ws_with(gw.addr(), "h", "/", &[]).await.unwrap_err());
    assert_eq!(status, 503);
    let secs: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((25..=30).contains(&secs), "{secs}");
    assert_eq!(get(gw.addr(), "h", "/x").await.status, 503);
}

#[tokio::test]
async fn fail_open_tries_backends_even_when_all_are_ejected() {
    let dead = dead_addr().await;
    let gw = gateway(&pool_yaml(
        "    eject_after: 1\n    eject_for: 30s\n    fail_open: true\n",
        &format!("ws://{dead}"),
    ))
    .await;
    for _ in 0..3 {
        let (status, _) = status_of(ws_with(gw.addr(), "h", "/", &[]).await.unwrap_err());
        assert_eq!(status, 502, "fail_open must keep trying");
    }
}

#[tokio::test]
async fn active_checks_mark_a_backend_down_then_up_again() {
    let b = demo::Backend {
        name: "a".into(),
        kind: demo::Kind::Echo,
    };
    // The test keeps a duplicate of the listening socket: when the backend
    // stops accepting, connections still queue (so checks time out rather
    // than being refused), and the port can never be taken by another test
    // before the backend comes back on it.
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let spare = std_listener.try_clone().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
    tokio::spawn(demo::serve(listener, b.clone(), stop.clone()));
    let yaml = format!(
        "server: {{ handshake_timeout: 300ms }}\n{}",
        pool_yaml(
            "    eject_after: 0\n    health: { interval: 50ms, timeout: 200ms, path: /health, healthy_after: 2, unhealthy_after: 2 }\n",
            &format!("ws://{addr}")
        )
    );
    let gw = gateway(&yaml).await;
    let mut ws = ws(gw.addr(), "h", "/").await;
    assert_eq!(roundtrip(&mut ws, "up").await, "up");
    // The backend stops answering: upgrades time out until the checks notice, then 503.
    stop.cancel();
    until_status(gw.addr(), 503).await;
    // It answers again on the same socket: after two good checks, sessions flow again.
    let stop2 = tokio_util::sync::CancellationToken::new();
    let listener = tokio::net::TcpListener::from_std(spare).unwrap();
    tokio::spawn(demo::serve(listener, b, stop2.clone()));
    until_status(gw.addr(), 0).await;
    let mut ws = support::ws(gw.addr(), "h", "/").await;
    assert_eq!(roundtrip(&mut ws, "back").await, "back");
    stop2.cancel();
}

#[tokio::test]
async fn a_draining_backend_gets_no_new_sessions() {
    let be = echo_backends(&["old", "new"]).await;
    let backends = format!(
        "{{ url: 'ws://{}', drain: true }}, ws://{}",
        be.addrs[0], be.addrs[1]
    );
    let gw = gateway(&pool_yaml("", &backends)).await;
    for _ in 0..6 {
        let mut ws = ws(gw.addr(), "h", "/").await;
        assert_eq!(backend_of(&whoami(&mut ws).await), "new");
    }
}

#[tokio::test]
async fn live_sessions_on_a_backend_marked_down_are_closed() {
    let stop = tokio_util::sync::CancellationToken::new();
    let b = demo::Backend {
        name: "a".into(),
        kind: demo::Kind::Echo,
    };
    let addr = demo::spawn("127.0.0.1:0", b, stop.clone()).await.unwrap();
    // A TCP-connect check: once the listener is gone the backend is down,
    // although its live WebSocket sessions would go on answering (with
    // `on_backend_down: keep` this test times out).
    let extra = "    eject_after: 0\n    health: { interval: 50ms, timeout: 200ms, healthy_after: 1, unhealthy_after: 2 }\n";
    let gw = gateway(&pool_yaml(extra, &format!("ws://{addr}"))).await;
    let mut ws = ws(gw.addr(), "h", "/").await;
    assert_eq!(roundtrip(&mut ws, "before").await, "before");
    stop.cancel(); // the listener closes; the upgraded session's task keeps running
    assert!(
        ends_within(&mut ws, Duration::from_secs(5)).await,
        "the session outlived its backend being marked down"
    );
}

#[tokio::test]
async fn the_retry_budget_bounds_failover() {
    let dead: Vec<String> = dead_addrs(5)
        .await
        .iter()
        .map(|a| format!("ws://{a}"))
        .collect();
    let gw = gateway(&pool_yaml("    max_attempts: 2\n", &dead.join(", "))).await;
    let r = get(gw.addr(), "h", "/").await;
    assert_eq!(r.status, 502);
    assert!(r.body.contains("(2 tried)"), "{}", r.body);
}

#[tokio::test]
async fn two_hundred_clients_reconnect_after_a_backend_dies() {
    let (stop, kill) = (
        tokio_util::sync::CancellationToken::new(),
        tokio_util::sync::CancellationToken::new(),
    );
    let keep = echo_backends(&["a", "c"]).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b_addr = l.local_addr().unwrap();
    let b = demo::Backend {
        name: "b".into(),
        kind: demo::Kind::Echo,
    };
    tokio::spawn(demo::serve_killable(l, b, stop.clone(), kill.clone()));
    let backends = format!(
        "ws://{}, ws://{b_addr}, ws://{}",
        keep.addrs[0], keep.addrs[1]
    );
    let extra =
        "    eject_after: 1\n    health: { interval: 100ms, timeout: 200ms, unhealthy_after: 1 }\n";
    let gw = gateway(&pool_yaml(extra, &backends)).await;
    let addr = gw.addr();

    let mut clients = Vec::new();
    for _ in 0..200 {
        let mut ws = ws(addr, "h", "/").await;
        let who = backend_of(&whoami(&mut ws).await).to_string();
        clients.push((ws, who));
    }
    let on_b = clients.iter().filter(|(_, w)| w == "b").count();
    assert!(on_b >= 50, "round robin put only {on_b} of 200 on b");

    // b dies: listener and sessions. Its clients see the end within a second.
    stop.cancel();
    kill.cancel();
    let mut reconnects = Vec::new();
    for (mut ws, who) in clients {
        if who != "b" {
            continue;
        }
        assert!(
            ends_within(&mut ws, Duration::from_secs(1)).await,
            "a client of the dead backend was left hanging"
        );
        reconnects.push(tokio::spawn(async move {
            let mut ws = ws_with(addr, "h", "/", &[]).await.expect("reconnect");
            backend_of(&whoami(&mut ws).await).to_string()
        }));
    }
    for r in reconnects {
        let who = r.await.unwrap();
        assert!(who == "a" || who == "c", "reconnected to {who}");
    }
}

#[tokio::test]
async fn dns_discovery_follows_the_records() {
    use std::net::IpAddr;
    use std::sync::{Arc, Mutex};
    // Two echo backends on one port at two loopback addresses, as one DNS name would list them.
    let stop = tokio_util::sync::CancellationToken::new();
    let one = demo::spawn(
        "127.0.0.1:0",
        demo::Backend {
            name: "one".into(),
            kind: demo::Kind::Echo,
        },
        stop.clone(),
    )
    .await
    .unwrap();
    let port = one.port();
    demo::spawn(
        &format!("127.0.0.2:{port}"),
        demo::Backend {
            name: "two".into(),
            kind: demo::Kind::Echo,
        },
        stop.clone(),
    )
    .await
    .unwrap();
    let records: Arc<Mutex<Vec<IpAddr>>> = Arc::new(Mutex::new(vec!["127.0.0.1".parse().unwrap()]));
    let seen = records.clone();
    let resolver: upgate::backend::Resolver = Arc::new(move |host, _port| {
        let ips = if host == "svc.test" {
            seen.lock().unwrap().clone()
        } else {
            Vec::new()
        };
        Box::pin(async move { Ok(ips) })
    });
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  p:\n    dns_refresh: 20ms\n    backends: [ {{ url: 'ws://svc.test:{port}', discover: dns }} ]\nroutes:\n  - {{ name: r, pool: p }}\n"
    );
    let cfg = upgate::Config::parse(std::path::Path::new("routes.yaml"), &yaml).unwrap();
    let gw = upgate::Gateway::bind_with_resolver(&cfg, resolver)
        .await
        .unwrap();
    let addr = gw.local_addrs()[0];
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gw.run(async {
        let _ = rx.await;
    }));
    let who = |ws_addr| async move {
        let mut ws = ws(ws_addr, "h", "/").await;
        let name = backend_of(&whoami(&mut ws).await).to_string();
        (ws, name)
    };
    // One record: every session on "one".
    let (mut live_on_one, name) = who(addr).await;
    assert_eq!(name, "one");
    // A second record appears: "two" gets sessions within a few refreshes.
    records.lock().unwrap().push("127.0.0.2".parse().unwrap());
    let mut found = false;
    for _ in 0..100 {
        if who(addr).await.1 == "two" {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(found, "the new record never became a backend");
    // The first record disappears: it is drained — new sessions avoid it, the live one continues.
    records
        .lock()
        .unwrap()
        .retain(|ip| ip.to_string() != "127.0.0.1");
    let mut in_a_row = 0;
    for _ in 0..200 {
        in_a_row = if who(addr).await.1 == "two" {
            in_a_row + 1
        } else {
            0
        };
        if in_a_row == 6 {
            break;
        }
    }
    assert_eq!(in_a_row, 6, "sessions still land on the vanished record");
    assert_eq!(
        roundtrip(&mut live_on_one, "still here").await,
        "still here"
    );
    let _ = tx.send(());
    stop.cancel();
}

#[tokio::test]
async fn dns_discovery_through_the_system_resolver() {
    let be = echo_backends(&["local"]).await;
    let port = be.addrs[0].port();
    // `localhost` may also resolve to ::1, where nothing listens: failover covers it.
    let backends = format!("{{ url: 'ws://localhost:{port}', discover: dns }}");
    let gw = gateway(&pool_yaml("", &backends)).await;
    let mut ws = ws(gw.addr(), "h", "/").await;
    assert_eq!(backend_of(&whoami(&mut ws).await), "local");
}
