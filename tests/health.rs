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
    let stop = tokio_util::sync::CancellationToken::new();
    let b = demo::Backend {
        name: "a".into(),
        kind: demo::Kind::Echo,
    };
    let addr = demo::spawn("127.0.0.1:0", b.clone(), stop.clone())
        .await
        .unwrap();
    let extra = "    eject_after: 0\n    health: { interval: 50ms, timeout: 200ms, path: /health, healthy_after: 2, unhealthy_after: 2 }\n";
    let gw = gateway(&pool_yaml(extra, &format!("ws://{addr}"))).await;
    let mut ws = ws(gw.addr(), "h", "/").await;
    assert_eq!(roundtrip(&mut ws, "up").await, "up");
    // The backend goes away: connection refused (502) until the checks notice, then 503.
    stop.cancel();
    until_status(gw.addr(), 503).await;
    // It comes back on the same address: after two good checks, sessions flow again.
    let stop2 = tokio_util::sync::CancellationToken::new();
    demo::spawn(&addr.to_string(), b, stop2.clone())
        .await
        .unwrap();
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
    use futures_util::StreamExt;
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
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None
                | Some(Err(_))
                | Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the session outlived its backend being marked down"
    );
}
