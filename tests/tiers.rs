//! Tiered fan-out: edge upgates whose fan-out route's pool is a core
//! upgate's fan-out route. However many edges there are, the source behind
//! the core sees one connection per channel; channel keys pass through
//! unchanged, `subscribe` and `replay_last` work across the tiers, and an
//! upstream failover at the core keeps the edges' clients connected.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use support::feed::Feed;
use support::*;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(10);

/// The next data message (pings and pongs skipped), within `T`; a Close
/// or the end of the stream fails the test (a client must stay connected).
async fn next_text(ws: &mut Ws<tokio::net::TcpStream>) -> String {
    tokio::time::timeout(T, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Text(t))) => return t.to_string(),
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    })
    .await
    .expect("a message in time")
}

/// A core over two sources (the second a standby) and three edges over the
/// core. The core strips `/feed` and keys channels by the rest of the path;
/// the edges keep the path, so a channel's key reaches the core unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_behind_a_core_sees_one_connection_per_channel_whatever_the_edges() {
    let a = Feed::start().await;
    let b = Feed::start().await;
    let core = gateway(&format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  source:\n    connect_timeout: 1s\n    backends: ['{}', '{}']\nroutes:\n  - name: feed\n    path: /feed\n    pool: source\n    mode: fanout\n    strip_prefix: true\n    replay_last: 1\n    subscribe: ['{{\"op\":\"subscribe\",\"channel\":\"{{channel}}\"}}']\n    on_upstream_lost: '{{\"status\":\"reconnecting\"}}'\n",
        a.url(),
        b.url()
    ))
    .await;
    let mut edges = Vec::new();
    for _ in 0..3 {
        edges.push(
            gateway(&format!(
                "listen:\n  - addr: 127.0.0.1:0\npools:\n  core:\n    connect_timeout: 1s\n    backends: ['ws://{}']\nroutes:\n  - name: feed\n    path: /feed\n    pool: core\n    mode: fanout\n    replay_last: 1\n",
                core.addr()
            ))
            .await,
        );
    }
    // 10 clients per channel per edge: 60 clients, 2 channels.
    let channels = ["/feed/EURUSD", "/feed/GBPUSD"];
    let mut clients = Vec::new();
    for e in &edges {
        for ch in channels {
            for _ in 0..10 {
                clients.push((ch, ws(e.addr(), "x", ch).await));
            }
        }
    }
    // One source connection per channel over the two sources (the core's
    // pool balances channels across them).
    let total = || a.accepted() + b.accepted();
    let deadline = tokio::time::Instant::now() + T;
    while a.open() + b.open() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the core opened {} upstreams",
            total()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(total(), 2, "one connection per channel, whatever the edges");
    let holds = |f: &Feed, p: &str| f.paths.lock().expect("lock").iter().any(|x| x == p);
    let (eur, other) = if holds(&a, "/EURUSD") {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let gbp = if holds(&a, "/GBPUSD") { &a } else { &b };
    assert!(holds(eur, "/EURUSD") && holds(gbp, "/GBPUSD"));
    // The core subscribed once per channel, not once per edge.
    let mut subs = Vec::new();
    for f in [eur, gbp] {
        let (path, m) = f.next_received(T).await;
        subs.push((path, m.into_text().expect("text").to_string()));
    }
    subs.sort();
    assert_eq!(
        subs,
        [
            (
                "/EURUSD".to_string(),
                r#"{"op":"subscribe","channel":"/EURUSD"}"#.to_string()
            ),
            (
                "/GBPUSD".to_string(),
                r#"{"op":"subscribe","channel":"/GBPUSD"}"#.to_string()
            ),
        ]
    );

    // Each channel's messages reach its clients on every edge, and only them.
    eur.publish_to("/EURUSD", Message::text("e1"));
    gbp.publish_to("/GBPUSD", Message::text("g1"));
    for (ch, c) in clients.iter_mut() {
        let want = if ch.ends_with("EURUSD") { "e1" } else { "g1" };
        assert_eq!(next_text(c).await, want, "{ch}");
    }
    // A late client on an edge gets the channel's last message first.
    let mut late = ws(edges[1].addr(), "x", "/feed/EURUSD").await;
    assert_eq!(next_text(&mut late).await, "e1");

    // The source of EURUSD dies: the core moves the channel to the other
    // source; the edges' clients of it stay connected, are told, and
    // receive from the new source, which again sees one connection for it.
    eur.kill();
    let before = other.accepted();
    for (ch, c) in clients.iter_mut().filter(|(ch, _)| ch.ends_with("EURUSD")) {
        assert_eq!(next_text(c).await, r#"{"status":"reconnecting"}"#, "{ch}");
    }
    assert_eq!(next_text(&mut late).await, r#"{"status":"reconnecting"}"#);
    let deadline = tokio::time::Instant::now() + T;
    while !holds(other, "/EURUSD") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "EURUSD never reached the other source"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Its subscribe comes first on the new connection.
    loop {
        let (path, m) = other.next_received(T).await;
        if path == "/EURUSD" {
            assert_eq!(
                m,
                Message::text(r#"{"op":"subscribe","channel":"/EURUSD"}"#)
            );
            break;
        }
    }
    other.publish_to("/EURUSD", Message::text("e2"));
    for (ch, c) in clients.iter_mut().filter(|(ch, _)| ch.ends_with("EURUSD")) {
        assert_eq!(next_text(c).await, "e2", "{ch} after the core's failover");
    }
    assert_eq!(next_text(&mut late).await, "e2");
    // One new connection per moved channel (both, should one source have held both).
    let moved = if std::ptr::eq(eur, gbp) { 2 } else { 1 };
    let deadline = tokio::time::Instant::now() + T;
    while other.accepted() < before + moved {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the moved channels never reached the other source"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        other.accepted(),
        before + moved,
        "one new connection per moved channel"
    );
    eprintln!(
        "tiers: 3 edges, {} clients, 2 channels: the sources saw one connection per channel, before and after the core's failover",
        clients.len() + 1
    );
}
