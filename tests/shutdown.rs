//! Graceful shutdown: stop accepting, let live sessions finish within the
//! grace period, then close what is left.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio_tungstenite::tungstenite::Message;

fn yaml(backend: std::net::SocketAddr, grace: &str) -> String {
    format!(
        "server: {{ shutdown_grace: {grace} }}\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://{backend}] }}\nroutes:\n  - {{ name: r, pool: p }}\n"
    )
}

/// Waits (bounded) until the listener refuses new connections.
async fn until_refused(addr: std::net::SocketAddr) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the gateway kept accepting after shutdown");
}

#[tokio::test]
async fn open_sessions_finish_within_the_grace_period() {
    let be = echo_backends(&["a"]).await;
    let mut gw = gateway(&yaml(be.addrs[0], "30s")).await;
    let addr = gw.addr();
    let mut sessions = Vec::new();
    for i in 0..20 {
        let mut ws = ws(addr, "h", "/").await;
        assert_eq!(
            roundtrip(&mut ws, &format!("before {i}")).await,
            format!("before {i}")
        );
        sessions.push(ws);
    }
    gw.trigger_shutdown();
    let done = gw.join();
    until_refused(addr).await;
    // Every live session keeps working during the grace period, then ends cleanly.
    for (i, mut ws) in sessions.into_iter().enumerate() {
        assert_eq!(
            roundtrip(&mut ws, &format!("after {i}")).await,
            format!("after {i}")
        );
        ws.close(None).await.unwrap();
        while let Some(Ok(m)) = ws.next().await {
            assert!(matches!(m, Message::Close(_)), "{m:?}");
        }
        // Dropping the client closes its TCP connection: the session is over.
    }
    let drained = tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("drained")
        .unwrap();
    assert!(drained.finished_in_grace, "{drained:?}");
    assert_eq!(drained.cut, 0);
}

#[tokio::test]
async fn sessions_still_open_after_the_grace_period_are_closed() {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&yaml(be.addrs[0], "200ms")).await;
    let mut ws = ws(gw.addr(), "h", "/").await;
    assert_eq!(roundtrip(&mut ws, "hi").await, "hi");
    let drained = tokio::time::timeout(Duration::from_secs(10), gw.shutdown())
        .await
        .expect("shutdown finished");
    assert!(!drained.finished_in_grace);
    assert!(drained.cut >= 1, "{drained:?}");
    // The client sees its connection end (no close frame: the splice is byte-level).
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = ws.send(Message::text("anyone?")).await;
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "session was not closed after the grace period");
}
