//! Backends and health-check targets that answer with hostile bytes: the
//! client always gets an answer, the channel's later clients are not left
//! waiting, and a health checker keeps judging.

mod support;

use std::time::Duration;

use support::*;

/// A refusal whose chunk size is near 2^64 (it once overflowed an addition).
const HUGE_CHUNK: &[u8] =
    b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\nffffffffffffffff\r\nxyz";

const T: Duration = Duration::from_secs(5);

async fn refused(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let r = tokio::time::timeout(T, ws_with(addr, "x", path, &[]))
        .await
        .expect("an answer in time");
    let Err(e) = r else {
        panic!("expected a refusal on {path}")
    };
    let (status, _, body) = refusal(e);
    (status, body)
}

#[tokio::test]
async fn a_huge_chunk_size_is_a_502_on_splice_and_fanout_routes() {
    let evil = raw_reply_server(HUGE_CHUNK).await;
    let gw = gateway(&format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: ['ws://{evil}'], eject_after: 0 }}\nroutes:\n  - {{ name: s, path: /s, pool: p }}\n  - {{ name: f, path: /f, pool: p, mode: fanout }}\n"
    ))
    .await;
    let (status, body) = refused(gw.addr(), "/s").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("could be reached"), "{body}");
    // Every client of the fan-out channel gets its answer, the later ones too.
    for _ in 0..3 {
        let (status, body) = refused(gw.addr(), "/f").await;
        assert_eq!(status, 502, "{body}");
    }
}

#[tokio::test]
async fn a_health_target_answering_a_huge_chunk_is_marked_down() {
    let evil = raw_reply_server(HUGE_CHUNK).await;
    let gw = gateway(&format!(
        "listen:\n  - addr: 127.0.0.1:0\nadmin: {{ addr: '127.0.0.1:0' }}\npools:\n  p:\n    backends: ['ws://{evil}']\n    eject_after: 0\n    health: {{ interval: 50ms, timeout: 500ms, path: /health, unhealthy_after: 2 }}\nroutes:\n  - {{ name: s, path: /s, pool: p }}\n"
    ))
    .await;
    let admin = gw.admin.expect("admin");
    let t0 = std::time::Instant::now();
    loop {
        let pools = admin_request(admin, "GET", "/pools", None).await.body;
        if pools.contains("\"healthy\":false") {
            break;
        }
        assert!(t0.elapsed() < T, "still healthy: {pools}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The checker is alive and no panic was caught.
    let m = admin_request(admin, "GET", "/metrics", None).await.body;
    assert!(
        m.contains("upgate_task_panics_total{task=\"health_check\"} 0"),
        "{m}"
    );
    let (status, _) = refused(gw.addr(), "/s").await;
    assert_eq!(status, 503);
}
