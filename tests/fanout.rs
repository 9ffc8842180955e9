//! Fan-out routes against real feed servers on loopback: one upstream per
//! channel, every message to every client in order, slow clients, failover,
//! subscribe, replay, forwarding, merged sources and keepalive.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::feed::{raise_nofile, Feed};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(10);

/// A gateway with one fan-out route `/feed` over a pool of `feeds`; `extra`
/// is appended to the route (indented YAML keys).
async fn gateway_for(feeds: &[&Feed], extra: &str) -> TestGateway {
    let backends: Vec<String> = feeds.iter().map(|f| format!("'{}'", f.url())).collect();
    gateway(&format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  feed:\n    connect_timeout: 1s\n    backends: [{}]\nroutes:\n  - name: feed\n    path: /feed\n    pool: feed\n    mode: fanout\n    strip_prefix: true\n{extra}",
        backends.join(", ")
    ))
    .await
}

/// The next data message (pings and pongs skipped), within `T`.
async fn next_data<S>(ws: &mut Ws<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(T, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => return m,
                other => panic!("stream ended: {other:?}"),
            }
        }
    })
    .await
    .expect("a message in time")
}

async fn next_text<S>(ws: &mut Ws<S>) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match next_data(ws).await {
        Message::Text(t) => t.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_receive_every_message_in_order_over_one_upstream() {
    raise_nofile();
    let feed = Feed::start().await;
    let gw = gateway_for(&[&feed], "").await;
    let addr = gw.addr();
    let clients =
        futures_util::future::join_all((0..1000).map(|_| ws(addr, "x", "/feed/eurusd"))).await;
    feed.wait_open(1, T).await;
    assert_eq!(feed.accepted(), 1, "one upstream for 1,000 clients");
    assert_eq!(feed.paths.lock().unwrap()[0], "/eurusd");

    let n = 200;
    for i in 0..n {
        if i % 2 == 0 {
            feed.publish(Message::text(format!("tick {i}")));
        } else {
            feed.publish(Message::binary(vec![i as u8; 100 + i]));
        }
    }
    let readers = clients.into_iter().map(|mut c| async move {
        for i in 0..n {
            match next_data(&mut c).await {
                Message::Text(t) => assert_eq!(t.as_str(), format!("tick {i}")),
                Message::Binary(b) => assert_eq!(&b[..], &vec![i as u8; 100 + i][..]),
                other => panic!("message {i}: {other:?}"),
            }
        }
        c
    });
    let clients = futures_util::future::join_all(readers).await;
    assert_eq!(clients.len(), 1000);
    assert_eq!(feed.accepted(), 1);
}

/// Plain clients that have caught up are written by the channel's task
/// itself, and go back to their own queue when the kernel does not take a
/// whole batch or when they have something of their own to send (a pong).
/// Whatever way each message takes, every client gets every message once,
/// in order: one client reads steadily, one pings after every few messages
/// (each pong takes it off direct delivery and back), one stops reading
/// long enough for its socket to fill (handed back mid-frame, then caught
/// up again), over plain TCP with large messages in bursts. Direct delivery
/// is used on a one-thread runtime, as this test's (and `--threads 1`).
#[tokio::test]
async fn every_message_once_in_order_across_direct_delivery_and_the_queue() {
    let feed = Feed::start().await;
    let gw = gateway_for(&[&feed], "    max_lag: 4096\n").await;
    let addr = gw.addr();
    let mut steady = ws(addr, "x", "/feed/book").await;
    let mut pinger = ws(addr, "x", "/feed/book").await;
    let mut staller = ws(addr, "x", "/feed/book").await;
    feed.wait_open(1, T).await;
    let n: u32 = 600;
    let body = |i: u32| {
        let mut b = vec![(i % 251) as u8; 32 * 1024];
        b[..4].copy_from_slice(&i.to_be_bytes());
        b
    };
    let publisher = async {
        for burst in 0..(n / 50) {
            for i in burst * 50..(burst + 1) * 50 {
                feed.publish(Message::binary(body(i)));
            }
            tokio::task::yield_now().await;
        }
    };
    let check = |i: u32, m: Message| match m {
        Message::Binary(b) => assert!(
            b[..] == body(i)[..],
            "message {i} out of order or corrupted"
        ),
        other => panic!("message {i}: {other:?}"),
    };
    let steady_reads = async {
        for i in 0..n {
            check(i, next_data(&mut steady).await);
        }
    };
    let pinger_reads = async {
        for i in 0..n {
            check(i, next_data(&mut pinger).await);
            if i % 7 == 0 {
                pinger
                    .send(Message::Ping(vec![1, 2, 3].into()))
                    .await
                    .expect("ping");
            }
        }
    };
    let staller_reads = async {
        for i in 0..n {
            if i == 20 {
                // 580 × 32 KiB published meanwhile: more than the socket buffers hold.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            check(i, next_data(&mut staller).await);
        }
    };
    tokio::join!(publisher, steady_reads, pinger_reads, staller_reads);
}

#[tokio::test]
async fn two_channels_open_two_upstreams_and_stay_separate() {
    let feed = Feed::start().await;
    let gw = gateway_for(&[&feed], "").await;
    let mut a = vec![];
    let mut b = vec![];
    for _ in 0..3 {
        a.push(ws(gw.addr(), "x", "/feed?pair=EURUSD").await);
        b.push(ws(gw.addr(), "x", "/feed?pair=GBPUSD").await);
    }
    feed.wait_open(2, T).await;
    let mut paths = feed.paths.lock().unwrap().clone();
    paths.sort();
    assert_eq!(paths, ["/?pair=EURUSD", "/?pair=GBPUSD"]);

    feed.publish_to("/?pair=EURUSD", Message::text("eur"));
    feed.publish_to("/?pair=GBPUSD", Message::text("gbp"));
    for c in &mut a {
        assert_eq!(next_text(c).await, "eur");
    }
    for c in &mut b {
        assert_eq!(next_text(c).await, "gbp");
    }
    // A later client joins an open channel; nothing new upstream.
    let mut late = ws(gw.addr(), "x", "/feed?pair=EURUSD").await;
    feed.publish_to("/?pair=EURUSD", Message::text("eur2"));
    assert_eq!(next_text(&mut late).await, "eur2");
    assert_eq!(feed.accepted(), 2);
}

#[tokio::test]
async fn channel_keyed_by_query_parameter_with_upstream_path() {
    let feed = Feed::start().await;
    let gw = gateway_for(
        &[&feed],
        "    channel: query:pair\n    upstream_path: /quotes/{channel}\n",
    )
    .await;
    let mut a = ws(gw.addr(), "x", "/feed?pair=EURUSD&token=1").await;
    let _b = ws(gw.addr(), "x", "/feed?token=2&pair=EURUSD").await;
    feed.wait_open(1, T).await;
    assert_eq!(feed.paths.lock().unwrap().clone(), ["/quotes/EURUSD"]);
    feed.publish(Message::text("q"));
    assert_eq!(next_text(&mut a).await, "q");
    // No key: a clear 400.
    let r = raw(
        gw.addr(),
        b"GET /feed?token=3 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(r.contains("query parameter `pair`"), "{r}");
    // A key that could break out of a subscribe message: refused.
    let r = raw(
        gw.addr(),
        b"GET /feed?pair=EUR\\USD HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(r.contains("without quotes, backslashes"), "{r}");
}

#[tokio::test]
async fn last_client_leaving_closes_the_upstream_after_linger() {
    let feed = Feed::start().await;
    let gw = gateway(&format!(
        "admin:\n  addr: 127.0.0.1:0\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  feed:\n    connect_timeout: 1s\n    backends: ['{}']\nroutes:\n  - name: feed\n    path: /feed\n    pool: feed\n    mode: fanout\n    strip_prefix: true\n    linger: 400ms\n",
        feed.url()
    ))
    .await;
    let admin = gw.admin.expect("admin");
    let mut c = ws(gw.addr(), "x", "/feed").await;
    feed.wait_open(1, T).await;
    c.close(None).await.expect("close");
    let left = std::time::Instant::now();
    feed.wait_open(0, T).await;
    let took = left.elapsed();
    assert!(
        took >= Duration::from_millis(350),
        "closed {took:?} after the last client left, before linger"
    );
    // Back within linger keeps the upstream: a new client, leave, rejoin quickly.
    let c1 = ws(gw.addr(), "x", "/feed").await;
    feed.wait_open(1, T).await;
    drop(c1);
    // Wait until the gateway has seen it leave (the channel is lingering).
    wait_metric(admin, "upgate_fanout_subscribers", "route=\"feed\"", 0).await;
    let mut c2 = ws(gw.addr(), "x", "/feed").await;
    feed.publish(Message::text("still"));
    assert_eq!(next_text(&mut c2).await, "still");
    assert_eq!(
        feed.accepted(),
        2,
        "rejoining within linger reused the upstream"
    );
}

#[tokio::test]
async fn a_client_that_vanishes_without_a_close_frame_leaves_at_once() {
    let feed = Feed::start().await;
    // A long pong_timeout: leaving must not wait for it.
    let gw = gateway_for(&[&feed], "    linger: 100ms\n    pong_timeout: 30s\n").await;
    let c = ws(gw.addr(), "x", "/feed").await;
    feed.wait_open(1, T).await;
    drop(c); // TCP closed, no Close frame
    let left = std::time::Instant::now();
    feed.wait_open(0, Duration::from_secs(5)).await;
    assert!(left.elapsed() >= Duration::from_millis(90), "before linger");
}

#[tokio::test]
async fn unreachable_feed_is_a_502_to_the_first_client() {
    let dead = dead_addr().await;
    let gw = gateway(&format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  feed:\n    backends: ['ws://{dead}']\nroutes:\n  - name: feed\n    path: /feed\n    pool: feed\n    mode: fanout\n"
    ))
    .await;
    let e = ws_with(gw.addr(), "x", "/feed", &[]).await.unwrap_err();
    assert!(e.to_string().contains("502"), "{e}");
}

/// A fast and a slow client on a feed of 32 KiB messages; returns what the
/// slow one saw after it resumed reading: message numbers and how it ended.
async fn slow_client_run(policy: &str) -> (Vec<u32>, Option<u16>) {
    let feed = Feed::start().await;
    let gw = gateway_for(
        &[&feed],
        &format!("    max_lag: 16\n    slow_client: {policy}\n"),
    )
    .await;
    let mut fast = ws(gw.addr(), "x", "/feed").await;
    let mut slow = ws(gw.addr(), "x", "/feed").await;
    feed.wait_open(1, T).await;
    // Published in steps the fast client keeps up with, as a live feed would be;
    // the slow client reads nothing meanwhile.
    let n = 600u32;
    for step in (0..n).step_by(8) {
        for i in step..step + 8 {
            let mut m = vec![0u8; 32 * 1024];
            m[..4].copy_from_slice(&i.to_le_bytes());
            feed.publish(Message::binary(m));
        }
        for i in step..step + 8 {
            match next_data(&mut fast).await {
                Message::Binary(b) => {
                    assert_eq!(u32::from_le_bytes([b[0], b[1], b[2], b[3]]), i)
                }
                other => panic!("{other:?}"),
            }
        }
    }
    let mut seen = Vec::new();
    let mut code = None;
    let read_all = async {
        while let Some(m) = slow.next().await {
            match m {
                Ok(Message::Binary(b)) => {
                    let i = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    seen.push(i);
                    if i == n - 1 {
                        break;
                    }
                }
                Ok(Message::Close(c)) => {
                    code = c.map(|c| u16::from(c.code));
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    };
    tokio::time::timeout(T, read_all)
        .await
        .expect("slow client finished");
    (seen, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_skips_ahead_with_drop_oldest() {
    let (seen, code) = slow_client_run("drop_oldest").await;
    assert_eq!(code, None);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "in order");
    assert_eq!(seen.last(), Some(&599), "caught up with the live end");
    assert!(seen.len() < 600, "skipped some: saw {}", seen.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_is_closed_with_1008_under_disconnect() {
    let (seen, code) = slow_client_run("disconnect").await;
    assert_eq!(code, Some(1008), "saw {} messages", seen.len());
    assert!(
        seen.windows(2).all(|w| w[1] == w[0] + 1),
        "no gaps before the close"
    );
}

#[tokio::test]
async fn clients_stay_connected_through_upstream_failover() {
    let a = Feed::start().await;
    let b = Feed::start().await;
    let gw = gateway_for(
        &[&a, &b],
        "    on_upstream_lost: '{\"status\":\"reconnecting\"}'\n",
    )
    .await;
    let mut clients = vec![];
    for _ in 0..20 {
        clients.push(ws(gw.addr(), "x", "/feed").await);
    }
    let (live, standby) = if a.open() == 1 { (&a, &b) } else { (&b, &a) };
    live.wait_open(1, T).await;
    live.publish(Message::text("before"));
    for c in &mut clients {
        assert_eq!(next_text(c).await, "before");
    }
    live.kill();
    for c in &mut clients {
        assert_eq!(next_text(c).await, r#"{"status":"reconnecting"}"#);
    }
    standby.wait_open(1, T).await;
    standby.publish(Message::text("after"));
    for c in &mut clients {
        assert_eq!(next_text(c).await, "after", "the same connection resumed");
    }
    assert_eq!(standby.accepted(), 1);
}

#[tokio::test]
async fn subscribe_is_sent_after_every_connect() {
    let feed = Feed::start().await;
    let gw = gateway_for(
        &[&feed],
        "    subscribe: ['{\"op\":\"subscribe\",\"channel\":\"{channel}\"}']\n",
    )
    .await;
    let mut c = ws(gw.addr(), "x", "/feed/EURUSD").await;
    let (path, m) = feed.next_received(T).await;
    assert_eq!(path, "/EURUSD");
    assert_eq!(
        m,
        Message::text(r#"{"op":"subscribe","channel":"/EURUSD"}"#)
    );
    feed.drop_connections();
    let (_, again) = feed.next_received(T).await;
    assert_eq!(again, m, "re-sent after the reconnect");
    feed.publish(Message::text("live"));
    assert_eq!(next_text(&mut c).await, "live");
    assert_eq!(feed.accepted(), 2);
}

#[tokio::test]
async fn late_joiners_get_the_last_messages_first() {
    let feed = Feed::start().await;
    let gw = gateway_for(&[&feed], "    replay_last: 3\n").await;
    let mut first = ws(gw.addr(), "x", "/feed").await;
    feed.wait_open(1, T).await;
    for i in 1..=5 {
        feed.publish(Message::text(format!("m{i}")));
    }
    for i in 1..=5 {
        assert_eq!(next_text(&mut first).await, format!("m{i}"));
    }
    let mut late = ws(gw.addr(), "x", "/feed").await;
    feed.publish(Message::text("m6"));
    for want in ["m3", "m4", "m5", "m6"] {
        assert_eq!(next_text(&mut late).await, want);
    }
}

#[tokio::test]
async fn forwarded_client_messages_reach_the_upstream_within_the_rate_limit() {
    let feed = Feed::start().await;
    let gw = gateway_for(
        &[&feed],
        "    client_messages: forward\n    client_rate: 5\n",
    )
    .await;
    let mut c = ws(gw.addr(), "x", "/feed/room1").await;
    let mut other = ws(gw.addr(), "x", "/feed/room1").await;
    for i in 0..3 {
        c.send(Message::text(format!("hello {i}")))
            .await
            .expect("send");
    }
    for i in 0..3 {
        let (path, m) = feed.next_received(T).await;
        assert_eq!(
            (path.as_str(), m),
            ("/room1", Message::text(format!("hello {i}")))
        );
    }
    // A flood past the rate: closed with 1008; the other client is unaffected.
    for i in 0..20 {
        if c.send(Message::text(format!("flood {i}"))).await.is_err() {
            break;
        }
    }
    let code = close_code(&mut c, T).await;
    assert_eq!(code, Some(u16::from(CloseCode::Policy)));
    feed.publish(Message::text("still here"));
    assert_eq!(next_text(&mut other).await, "still here");
}

#[tokio::test]
async fn merged_sources_are_tagged_with_their_pool() {
    let a = Feed::start().await;
    let b = Feed::start().await;
    let gw = gateway(&format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  eu:\n    backends: ['{}']\n  us:\n    backends: ['{}']\nroutes:\n  - name: quotes\n    path: /quotes\n    mode: fanout\n    sources: [eu, us]\n    tag: true\n",
        a.url(),
        b.url()
    ))
    .await;
    let mut c = ws(gw.addr(), "x", "/quotes").await;
    a.wait_open(1, T).await;
    b.wait_open(1, T).await;
    a.publish(Message::text(r#"{"p":1.1}"#));
    b.publish(Message::text("not json"));
    b.publish(Message::binary(vec![1, 2, 3]));
    let mut got = vec![];
    for _ in 0..3 {
        got.push(next_data(&mut c).await);
    }
    assert!(
        got.contains(&Message::text(r#"{"source":"eu","data":{"p":1.1}}"#)),
        "{got:?}"
    );
    assert!(
        got.contains(&Message::text(r#"{"source":"us","data":"not json"}"#)),
        "{got:?}"
    );
    assert!(
        got.contains(&Message::binary(vec![1, 2, 3])),
        "binary passes untagged: {got:?}"
    );
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_pong_timeout() {
    let feed = Feed::start().await;
    let gw = gateway_for(
        &[&feed],
        "    ping_interval: 200ms\n    pong_timeout: 300ms\n",
    )
    .await;
    // A well-behaved client answers pings (tungstenite does, while it reads).
    let mut alive = ws(gw.addr(), "x", "/feed").await;
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = alive.next().await {
            if let Message::Text(t) = m {
                let _ = got_tx.send(t.to_string());
            }
        }
    });
    // A silent one: handshake by hand, then never answer.
    let mut silent = TcpStream::connect(gw.addr()).await.expect("connect");
    silent
        .write_all(b"GET /feed HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .expect("write");
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let ended = tokio::time::timeout(T, async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "silent client still connected");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(450), "dropped after {took:?}");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(got.windows(2).any(|w| w == [0x89, 0x00]), "was pinged");
    // The live client kept answering and still receives.
    feed.publish(Message::text("ok"));
    let m = tokio::time::timeout(T, got_rx.recv())
        .await
        .expect("in time");
    assert_eq!(m.as_deref(), Some("ok"));
}

#[tokio::test]
async fn eager_channel_opens_at_start_and_serves_over_tls() {
    let feed = Feed::start().await;
    let dir = TempDir::new("fanout-tls");
    let (cert, key, ca) = cert_files(&dir.0, "feed", &["feed.test"]);
    let gw = gateway_in(
        &dir.0,
        &format!(
            "listen:\n  - addr: 127.0.0.1:0\n    tls:\n      certs:\n        - {{ cert: {}, key: {} }}\npools:\n  feed:\n    backends: ['{}']\nroutes:\n  - name: feed\n    path: /feed\n    pool: feed\n    mode: fanout\n    eager: true\n",
            cert.display(),
            key.display(),
            feed.url()
        ),
    )
    .await;
    feed.wait_open(1, T).await;
    assert_eq!(feed.paths.lock().unwrap().clone(), ["/feed"]);
    let tls = tls_connect(gw.addr(), "feed.test", &[ca], &[b"http/1.1"]).await;
    let mut c = ws_over(tls, "feed.test", "/feed", &[]).await.expect("wss");
    feed.publish(Message::text("over tls"));
    assert_eq!(next_text(&mut c).await, "over tls");
    drop(c);
    assert_eq!(feed.accepted(), 1);
}

#[tokio::test]
async fn shutdown_closes_clients_with_1001_and_an_idle_eager_channel_does_not_hold_it_up() {
    let feed = Feed::start().await;
    let yaml = |grace: &str| {
        format!(
            "server: {{ shutdown_grace: {grace} }}\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  feed:\n    backends: ['{}']\nroutes:\n  - {{ name: feed, path: /feed, pool: feed, mode: fanout, eager: true }}\n",
            feed.url()
        )
    };
    // No client: the drain ends at once, not after the 10 s grace.
    let gw = gateway(&yaml("10s")).await;
    feed.wait_open(1, T).await;
    let t0 = std::time::Instant::now();
    let drained = gw.shutdown().await;
    assert!(drained.finished_in_grace, "{drained:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    feed.wait_open(0, T).await;

    // A client keeps receiving through the grace period, then gets 1001.
    let gw = gateway(&yaml("500ms")).await;
    let mut c = ws(gw.addr(), "x", "/feed").await;
    let mut gw = gw;
    gw.trigger_shutdown();
    feed.publish(Message::text("during the grace period"));
    assert_eq!(next_text(&mut c).await, "during the grace period");
    let code = close_code(&mut c, T).await;
    assert_eq!(code, Some(1001));
    let drained = gw.join().await.expect("gateway task");
    assert!(!drained.finished_in_grace);
}

#[tokio::test]
async fn channel_keyed_by_header() {
    let feed = Feed::start().await;
    let gw = gateway_for(
        &[&feed],
        "    channel: header:X-Room\n    upstream_path: /rooms/{channel}\n",
    )
    .await;
    let mut a = ws_with(gw.addr(), "x", "/feed/anything", &[("x-room", "blue")])
        .await
        .expect("upgrade");
    let _b = ws_with(gw.addr(), "x", "/feed/else", &[("x-room", "blue")])
        .await
        .expect("upgrade");
    let _c = ws_with(gw.addr(), "x", "/feed", &[("x-room", "red")])
        .await
        .expect("upgrade");
    feed.wait_open(2, T).await;
    let mut paths = feed.paths.lock().unwrap().clone();
    paths.sort();
    assert_eq!(paths, ["/rooms/blue", "/rooms/red"]);
    feed.publish_to("/rooms/blue", Message::text("blue news"));
    assert_eq!(next_text(&mut a).await, "blue news");
    let e = ws_with(gw.addr(), "x", "/feed", &[]).await.unwrap_err();
    assert!(e.to_string().contains("400"), "{e}");
}

/// A client speaking raw frames, so the test sees RSV1 and the exact bytes.
struct RawClient {
    s: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    /// Handshakes on `path` offering `extensions`; the response head.
    async fn connect(
        addr: std::net::SocketAddr,
        path: &str,
        extensions: Option<&str>,
    ) -> (RawClient, String) {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let ext = extensions.map_or(String::new(), |e| {
            format!("Sec-WebSocket-Extensions: {e}\r\n")
        });
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n").as_bytes())
            .await
            .expect("write");
        let mut c = RawClient { s, buf: Vec::new() };
        let end = loop {
            if let Some(i) = c.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            c.fill().await;
        };
        let head = String::from_utf8_lossy(&c.buf[..end]).to_string();
        c.buf.drain(..end);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        (c, head)
    }

    async fn fill(&mut self) {
        let mut tmp = [0u8; 65536];
        let n = tokio::time::timeout(T, self.s.read(&mut tmp))
            .await
            .expect("data in time")
            .expect("read");
        assert!(n > 0, "connection closed");
        self.buf.extend_from_slice(&tmp[..n]);
    }

    /// The next server frame: its first byte (FIN, RSV1, opcode) and payload.
    async fn frame(&mut self) -> (u8, Vec<u8>) {
        loop {
            if self.buf.len() >= 2 {
                let (len, at) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => (
                        usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
                        4,
                    ),
                    127 if self.buf.len() >= 10 => {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(&self.buf[2..10]);
                        (u64::from_be_bytes(a) as usize, 10)
                    }
                    n if n < 126 => (usize::from(n), 2),
                    _ => (usize::MAX, 0),
                };
                if len != usize::MAX && self.buf.len() >= at + len {
                    let first = self.buf[0];
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return (first, payload);
                }
            }
            self.fill().await;
        }
    }

    /// The next data frame (pings skipped).
    async fn data(&mut self) -> (u8, Vec<u8>) {
        loop {
            let f = self.frame().await;
            if f.0 & 0x0f != 0x9 {
                return f;
            }
        }
    }

    /// Sends one masked frame whose first byte is `first`.
    async fn send(&mut self, first: u8, payload: &[u8]) {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut f = vec![first];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 65535 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        self.s.write_all(&f).await.expect("send");
    }
}

/// Raw deflate with a sync flush, its 4-byte tail removed (RFC 7692 §7.2.1).
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = flate2::Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 1024);
    c.compress_vec(data, &mut out, flate2::FlushCompress::Sync)
        .expect("compress");
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn inflate(z: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::DeflateDecoder::new([z, &[0, 0, 0xff, 0xff][..]].concat().as_slice())
        .read_to_end(&mut out)
        .ok();
    out
}

const DEFLATE_ANSWER: &str =
    "sec-websocket-extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover";

#[tokio::test]
async fn compression_is_done_once_for_every_deflate_client_and_plain_clients_get_plain() {
    let feed = Feed::start().await;
    let gw = gateway_for(&[&feed], "    compression: true\n").await;
    let (mut z1, head) = RawClient::connect(
        gw.addr(),
        "/feed",
        Some("permessage-deflate; client_max_window_bits"),
    )
    .await;
    assert!(head.to_ascii_lowercase().contains(DEFLATE_ANSWER), "{head}");
    let (mut z2, _) = RawClient::connect(gw.addr(), "/feed", Some("permessage-deflate")).await;
    let (mut plain, head) = RawClient::connect(gw.addr(), "/feed", None).await;
    assert!(!head.to_ascii_lowercase().contains("extensions"), "{head}");
    feed.wait_open(1, T).await;

    let tick = r#"{"pair":"EURUSD","bid":1.08412,"ask":1.08415}"#.repeat(50);
    feed.publish(Message::text(tick.clone()));
    let (f1, p1) = z1.data().await;
    let (f2, p2) = z2.data().await;
    assert_eq!((f1, f2), (0xC1, 0xC1), "FIN + RSV1 + text");
    assert_eq!(p1, p2, "the same compressed bytes for both");
    assert!(p1.len() * 10 < tick.len(), "{} of {}", p1.len(), tick.len());
    assert_eq!(inflate(&p1), tick.as_bytes());
    assert_eq!(plain.data().await, (0x81, tick.clone().into_bytes()));

    // What compression would not shrink goes out as it is, in order.
    feed.publish(Message::binary(vec![7u8, 1, 3]));
    feed.publish(Message::text(tick.clone()));
    for c in [&mut z1, &mut z2] {
        assert_eq!(c.data().await, (0x82, vec![7, 1, 3]));
        let (f, p) = c.data().await;
        assert_eq!((f, inflate(&p)), (0xC1, tick.clone().into_bytes()));
    }
}

#[tokio::test]
async fn offers_are_declined_without_compression_or_with_a_small_server_window() {
    let feed = Feed::start().await;
    let off = gateway_for(&[&feed], "").await;
    let (mut c, head) = RawClient::connect(off.addr(), "/feed", Some("permessage-deflate")).await;
    assert!(!head.to_ascii_lowercase().contains("extensions"), "{head}");
    let on = gateway_for(&[&feed], "    compression: true\n").await;
    let (mut d, head) = RawClient::connect(
        on.addr(),
        "/feed",
        Some("permessage-deflate; server_max_window_bits=10"),
    )
    .await;
    assert!(!head.to_ascii_lowercase().contains("extensions"), "{head}");
    feed.wait_open(2, T).await;
    let tick = "abc".repeat(500);
    feed.publish(Message::text(tick.clone()));
    assert_eq!(c.data().await, (0x81, tick.clone().into_bytes()));
    assert_eq!(d.data().await, (0x81, tick.into_bytes()));
    // RSV1 from a client that did not negotiate compression: 1002.
    c.send(0xC1, &deflate(b"hello")).await;
    let (f, p) = c.frame().await;
    assert_eq!((f, &p[..2]), (0x88, &1002u16.to_be_bytes()[..]));
}

#[tokio::test]
async fn compressed_client_messages_are_inflated_before_forwarding_and_bombs_are_refused() {
    let feed = Feed::start().await;
    let gw = gateway_for(
        &[&feed],
        "    compression: true\n    client_messages: forward\n    max_message: 65536\n",
    )
    .await;
    let (mut c, _) = RawClient::connect(gw.addr(), "/feed/room", Some("permessage-deflate")).await;
    let hello = "hello ".repeat(200);
    c.send(0xC1, &deflate(hello.as_bytes())).await;
    // Fragmented: RSV1 on the first frame only.
    let z = deflate(b"fragmented and compressed");
    c.send(0x41, &z[..3]).await;
    c.send(0x80, &z[3..]).await;
    c.send(0x81, b"plain").await;
    for want in [hello.as_str(), "fragmented and compressed", "plain"] {
        let (path, m) = feed.next_received(T).await;
        assert_eq!((path.as_str(), m), ("/room", Message::text(want)));
    }
    // 1 MiB of zeros in a few KiB: cut off at max_message with 1009.
    c.send(0xC2, &deflate(&vec![0u8; 1 << 20])).await;
    let (f, p) = c.data().await;
    assert_eq!((f, &p[..2]), (0x88, &1009u16.to_be_bytes()[..]));
}

/// A real browser (headless Chromium) negotiates compression with upgate's
/// answer and reads the compressed messages.
#[tokio::test]
#[cfg_attr(no_browser, ignore = "needs chromium (apt-get install chromium)")]
async fn a_browser_reads_compressed_messages() {
    let feed = std::sync::Arc::new(Feed::start().await);
    let gw = gateway_for(&[&*feed], "    compression: true\n").await;
    let tick = r#"{"pair":"EURUSD","bid":1.08412}"#.repeat(20);
    // The feed publishes while the browser runs (its clock is its own).
    let publisher = {
        let feed = feed.clone();
        let tick = tick.clone();
        tokio::spawn(async move {
            // As long as the browser may take to start (a cold start on a fresh machine).
            feed.wait_open(1, Duration::from_secs(60)).await;
            for i in 0..200 {
                feed.publish(Message::text(format!("{i}:{tick}")));
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    let page = format!(
        "<body><script>\
         const ws = new WebSocket('ws://{}/feed');\
         let n = 0;\
         ws.onclose = e => {{ document.body.dataset.closed = e.code; }};\
         ws.onopen = () => {{ document.body.dataset.open = 'yes'; }};\
         const keep = setInterval(() => fetch('http://{}/busy', {{mode: 'no-cors'}}).catch(() => {{}}), 50);\
         ws.onmessage = e => {{\
           const [i, data] = [e.data.split(':')[0], e.data.slice(e.data.indexOf(':') + 1)];\
           if (++n === 3) {{\
             document.body.dataset.ext = ws.extensions;\
             document.body.dataset.ok = String(data === {tick:?});\
             ws.close();\
             clearInterval(keep);\
           }}\
         }};\
         </script></body>",
        gw.addr(),
        gw.addr()
    );
    // The page comes from a loopback HTTP server of its own (a `data:` page
    // may not open connections to loopback addresses).
    let url = format!("http://{}/", static_http("text/html", page).await);
    let dom = browser_dom(&url).await;
    publisher.abort();
    assert!(
        dom.contains(r#"data-ext="permessage-deflate; server_no_context_takeover; client_no_context_takeover""#),
        "{dom}"
    );
    assert!(dom.contains(r#"data-ok="true""#), "{dom}");
}

impl RawClient {
    /// Reads frames until a Close; its code (None for an empty payload).
    async fn close_code(&mut self) -> Option<u16> {
        loop {
            let (first, payload) = self.frame().await;
            if first & 0x0f == 0x8 {
                return payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
            }
        }
    }
}

#[tokio::test]
async fn invalid_utf8_is_closed_with_1007_even_when_client_messages_are_ignored() {
    let feed = Feed::start().await;
    let gw = gateway_for(&[&feed], "").await;
    let (mut c, _) = RawClient::connect(gw.addr(), "/feed", None).await;
    c.send(0x81, b"fine").await;
    c.send(0x81, b"\xce\xba\xff").await;
    assert_eq!(c.close_code().await, Some(1007));
}

#[tokio::test]
async fn close_frames_the_rfc_forbids_are_answered_with_1002_or_1007() {
    let feed = Feed::start().await;
    let gw = gateway_for(&[&feed], "").await;
    let cases: [(&[u8], Option<u16>); 7] = [
        (b"\x03", Some(1002)),                // a 1-byte payload
        (&999u16.to_be_bytes(), Some(1002)),  // below 1000
        (&1005u16.to_be_bytes(), Some(1002)), // reserved: never on the wire
        (&2999u16.to_be_bytes(), Some(1002)),
        (b"\x03\xe8\xce\xba\xe1\xbd", Some(1007)), // reason not UTF-8
        (&4001u16.to_be_bytes(), Some(4001)),      // a valid code is echoed
        (b"", Some(1000)),
    ];
    for (payload, want) in cases {
        let (mut c, _) = RawClient::connect(gw.addr(), "/feed", None).await;
        c.send(0x88, payload).await;
        assert_eq!(c.close_code().await, want, "close payload {payload:?}");
    }
}

#[tokio::test]
async fn fragmented_text_fails_at_the_fragment_that_breaks_utf8() {
    let feed = Feed::start().await;
    let gw = gateway_for(&[&feed], "    client_messages: forward\n").await;
    let (mut c, _) = RawClient::connect(gw.addr(), "/feed", None).await;
    // First fragment valid (ends inside a code point), the second makes it invalid; no final fragment.
    c.send(0x01, b"\xce\xba\xe1").await;
    c.send(0x00, b"\xbd\xb9\xf4\x90\x80\x80").await;
    assert_eq!(c.close_code().await, Some(1007));
    // Reserved opcode, continuation without a message, reserved bits: 1002.
    for (first, payload) in [(0x85u8, &b""[..]), (0x80, b"x"), (0xA1, b"x")] {
        let (mut c, _) = RawClient::connect(gw.addr(), "/feed", None).await;
        c.send(first, payload).await;
        assert_eq!(c.close_code().await, Some(1002), "first byte {first:#x}");
    }
}

#[tokio::test]
async fn the_answer_to_a_forwarded_message_goes_out_before_a_protocol_close() {
    let feed = Feed::start().await;
    let gw = gateway_for(&[&feed], "    client_messages: forward\n").await;
    let (mut c, _) = RawClient::connect(gw.addr(), "/feed", None).await;
    feed.wait_open(1, T).await;
    c.send(0x81, b"question").await;
    c.send(0xA1, b"bad rsv").await; // RSV2 without an extension
    let (_, m) = feed.next_received(T).await;
    assert_eq!(m, Message::text("question"));
    feed.publish(Message::text("answer"));
    assert_eq!(c.data().await, (0x81, b"answer".to_vec()));
    assert_eq!(c.close_code().await, Some(1002));
}

#[tokio::test]
async fn one_client_opening_channel_after_channel_is_held_to_the_defaults() {
    // The attack: 300 channel names in turn, one connection at a time.
    let feed = Feed::start().await;
    let gw = gateway_for(&[&feed], "").await;
    let (mut opened, mut refused) = (0, 0);
    for i in 0..300 {
        match ws_with(gw.addr(), "x", &format!("/feed/name{i}"), &[]).await {
            Ok(mut c) => {
                opened += 1;
                let _ = c.close(None).await;
            }
            Err(e) => {
                let (status, retry, body) = refusal(e);
                assert_eq!(status, 429, "{body}");
                assert_eq!(retry, "2");
                assert!(body.contains("too many new channels"), "{body}");
                refused += 1;
            }
        }
    }
    // channel_opens_per_ip defaults to 30 a minute: the source saw at most that many.
    assert_eq!((opened, refused), (30, 270));
    assert!(feed.accepted() <= 30, "{} upstreams", feed.accepted());
}

#[tokio::test]
async fn max_channels_and_the_allowed_keys_bound_what_reaches_the_source() {
    let feed = Feed::start().await;
    let gw = gateway_for(
        &[&feed],
        "    max_channels: 2\n    linger: 50ms\n    channels: ['EUR*', GBPUSD]\n",
    )
    .await;
    let (status, _, body) = refusal(
        ws_with(gw.addr(), "x", "/feed/XAUUSD", &[])
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (status, body.contains("no channel `/XAUUSD`")),
        (404, true),
        "{body}"
    );
    let mut a = ws(gw.addr(), "x", "/feed/EURUSD").await;
    let _b = ws(gw.addr(), "x", "/feed/GBPUSD").await;
    let (status, retry, body) = refusal(
        ws_with(gw.addr(), "x", "/feed/EURGBP", &[])
            .await
            .unwrap_err(),
    );
    assert_eq!((status, retry.as_str()), (503, "1"), "{body}");
    assert!(body.contains("2 channels open"), "{body}");
    // Joining an open channel is never refused.
    let _a2 = ws(gw.addr(), "x", "/feed/EURUSD").await;
    assert_eq!(feed.accepted(), 2);
    // A channel that closes makes room.
    let _ = a.close(None).await;
    drop(_a2);
    feed.wait_open(1, T).await;
    let _c = ws(gw.addr(), "x", "/feed/EURGBP").await;
    assert_eq!(feed.accepted(), 3);
}
