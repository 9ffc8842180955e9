//! `mode: frames`: upgate speaks WebSocket on both legs, relays messages
//! and close codes, and with `resume: true` moves a session to another
//! backend when its backend dies or asks clients to go away. Rebalancing:
//! resuming sessions move; splice (and frames) routes with `rebalance:
//! close` close with 1012 at a frame boundary, paced.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use support::*;

/// A WebSocket backend that answers `NAME:text`, records what it received,
/// closes with a code on `close:CODE`, and can be killed (every connection
/// dropped without a Close, the listener gone: what SIGKILL does).
struct Backend {
    name: &'static str,
    addr: std::net::SocketAddr,
    got: Arc<Mutex<Vec<String>>>,
    kill: CancellationToken,
    /// Open WebSocket sessions.
    live: Arc<std::sync::atomic::AtomicUsize>,
}

impl Backend {
    async fn start(name: &'static str) -> Backend {
        Backend::start_on(name, 0).await
    }

    /// On `port` (a [`reserve_port`] one: bound with SO_REUSEPORT).
    async fn start_on(name: &'static str, port: u16) -> Backend {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_reuseport(true).unwrap();
        sock.bind(([127, 0, 0, 1], port).into()).unwrap();
        let listener: TcpListener = sock.listen(1024).unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let kill = CancellationToken::new();
        let (g, k) = (got.clone(), kill.clone());
        let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let l = live.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    r = listener.accept() => r.unwrap(),
                    _ = k.cancelled() => return,
                };
                let (g, k, l) = (g.clone(), k.clone(), l.clone());
                tokio::spawn(async move {
                    // Selects the first subprotocol offered, if any (the
                    // callback's type is tungstenite's, large error and all).
                    #[allow(clippy::result_large_err)]
                    let select = |req: &http::Request<()>, mut resp: http::Response<()>| {
                        let first = req
                            .headers()
                            .get("sec-websocket-protocol")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.split(',').next())
                            .map(|p| p.trim().to_string());
                        if let Some(p) = first {
                            resp.headers_mut()
                                .insert("sec-websocket-protocol", p.parse().unwrap());
                        }
                        Ok(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, select).await else {
                        return;
                    };
                    l.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    struct Down(Arc<std::sync::atomic::AtomicUsize>);
                    impl Drop for Down {
                        fn drop(&mut self) {
                            self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                    let _down = Down(l);
                    loop {
                        let m = tokio::select! {
                            m = ws.next() => m,
                            _ = k.cancelled() => return, // dropped: no Close
                        };
                        match m {
                            Some(Ok(Message::Text(t))) => {
                                let t = t.to_string();
                                g.lock().unwrap().push(t.clone());
                                if let Some(code) = t.strip_prefix("close:") {
                                    let code: u16 = code.parse().unwrap();
                                    let _ = ws
                                        .close(Some(CloseFrame {
                                            code: CloseCode::from(code),
                                            reason: "bye".into(),
                                        }))
                                        .await;
                                    return;
                                }
                                if ws.send(Message::text(format!("{name}:{t}"))).await.is_err() {
                                    return;
                                }
                            }
                            Some(Ok(Message::Binary(b))) => {
                                if ws.send(Message::Binary(b)).await.is_err() {
                                    return;
                                }
                            }
                            Some(Ok(Message::Close(f))) => {
                                let code = f.map_or(1005, |f| u16::from(f.code));
                                g.lock().unwrap().push(format!("closed:{code}"));
                                // tungstenite answers the Close; the stream then ends.
                                while let Some(Ok(_)) = ws.next().await {}
                                return;
                            }
                            Some(Ok(_)) => {}
                            _ => return,
                        }
                    }
                });
            }
        });
        Backend {
            name,
            addr,
            got,
            kill,
            live,
        }
    }

    fn got(&self) -> Vec<String> {
        self.got.lock().unwrap().clone()
    }

    /// Waits (up to 5 s) until a session of this backend received a Close.
    async fn until_closed(&self) {
        let t0 = std::time::Instant::now();
        while !self.got().iter().any(|g| g.starts_with("closed:")) {
            assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", self.got());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn yaml(backends: &[&Backend], route: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("ws://{}", b.addr))
        .collect();
    format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [{}] }}\nroutes:\n  - {{ name: r, path: /ws, pool: p, mode: frames{route} }}\n",
        list.join(", ")
    )
}

/// The next text message, skipping control frames, within 5 s.
async fn next_text<S>(ws: &mut Ws<S>) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return t.to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    })
    .await
    .expect("a message within 5 s")
}

/// The next Close frame's code and reason, within `limit`.
async fn close_of<S>(ws: &mut Ws<S>, limit: Duration) -> (u16, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(limit, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => {
                    return (u16::from(f.code), f.reason.to_string())
                }
                Some(Ok(Message::Close(None))) => return (1005, String::new()),
                Some(Ok(_)) => continue,
                other => panic!("expected a Close, got {other:?}"),
            }
        }
    })
    .await
    .expect("a Close in time")
}

#[tokio::test]
async fn messages_and_close_codes_pass_both_ways() {
    let a = Backend::start("a").await;
    let gw = gateway(&yaml(&[&a], "")).await;
    let mut ws = ws(gw.addr(), "h", "/ws").await;
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "a:hi");
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Binary(b) => {
                assert_eq!(&b[..], &[1, 2, 3]);
                break;
            }
            Message::Ping(_) | Message::Pong(_) => {}
            m => panic!("{m:?}"),
        }
    }
    // The backend's close code and reason reach the client.
    ws.send(Message::text("close:4001")).await.unwrap();
    assert_eq!(
        close_of(&mut ws, Duration::from_secs(5)).await,
        (4001, "bye".into())
    );
    // And a client's close code reaches the backend.
    let mut ws2 = support::ws(gw.addr(), "h", "/ws").await;
    ws2.close(Some(CloseFrame {
        code: CloseCode::from(4002),
        reason: "done".into(),
    }))
    .await
    .unwrap();
    assert_eq!(close_of(&mut ws2, Duration::from_secs(5)).await.0, 4002);
}

#[tokio::test]
async fn without_resume_a_lost_backend_ends_the_session_with_1011() {
    let a = Backend::start("a").await;
    let gw = gateway(&yaml(&[&a], "")).await;
    let mut ws = ws(gw.addr(), "h", "/ws").await;
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "a:hi");
    a.kill.cancel();
    let (code, reason) = close_of(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(code, 1011, "{reason}");
    assert!(reason.starts_with("backend lost"), "{reason}");
}

/// `client_rate` on a frames route: a client over its message rate is
/// closed with 1008 and its messages beyond the bucket never reach the
/// backend.
#[tokio::test]
async fn a_client_over_its_message_rate_is_closed_with_1008() {
    let a = Backend::start("a").await;
    let gw = gateway(&yaml(&[&a], ", client_rate: 5")).await;
    let mut ws = ws(gw.addr(), "h", "/ws").await;
    for i in 0..20 {
        if ws.send(Message::text(format!("m{i}"))).await.is_err() {
            break;
        }
    }
    let (code, reason) = close_of(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(
        (code, reason.as_str()),
        (1008, "message rate limit exceeded")
    );
    a.until_closed().await;
    let got = a.got();
    // A full bucket of 5 (and what refilled in the microseconds between).
    let messages = got.iter().filter(|g| g.starts_with('m')).count();
    assert!((5..=6).contains(&messages), "{got:?}");
    assert_eq!(
        got.last().map(String::as_str),
        Some("closed:1001"),
        "{got:?}"
    );
}

/// A client that leaves without a Close (its TCP connection just ends):
/// the backend gets its last message, then a Close 1001, as from a client
/// that went away, never a normal closure it did not ask for.
#[tokio::test]
async fn a_client_gone_without_a_close_is_1001_to_the_backend() {
    let a = Backend::start("a").await;
    let gw = gateway(&yaml(&[&a], "")).await;
    let mut ws = ws(gw.addr(), "h", "/ws").await;
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "a:hi");
    ws.send(Message::text("bye")).await.unwrap();
    drop(ws);
    a.until_closed().await;
    assert_eq!(a.got(), ["hi", "bye", "closed:1001"]);
}

/// A client that stops reading, sends its last message and resets: the
/// gateway's write towards it fails while that message waits unread
/// behind the write. The message still reaches the backend (the same
/// promise the splice keeps), and the backend is then told the client went.
#[tokio::test]
async fn the_last_message_of_a_client_that_reset_reaches_the_backend() {
    // A backend that, on "flood", sends up to 400 binary messages of 64 KiB
    // (far more than the sockets between it and the client buffer) while
    // it records every text and the close code it receives.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::<String>::new()));
    let (g, done) = (got.clone(), Arc::new(tokio::sync::Notify::new()));
    let d = done.clone();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let (mut tx, mut rx) = ws.split();
        let flood = CancellationToken::new();
        let f = flood.clone();
        let sender = tokio::spawn(async move {
            f.cancelled().await;
            for _ in 0..400 {
                if tx
                    .send(Message::binary(vec![7u8; 64 * 1024]))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        while let Some(Ok(m)) = rx.next().await {
            match m {
                Message::Text(t) if t.as_str() == "flood" => flood.cancel(),
                Message::Text(t) => g.lock().unwrap().push(t.to_string()),
                Message::Close(f) => {
                    let code = f.map_or(1005, |f| u16::from(f.code));
                    g.lock().unwrap().push(format!("closed:{code}"));
                    break;
                }
                _ => {}
            }
        }
        sender.abort();
        d.notify_one();
    });
    let gw = gateway(&format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: ['ws://{addr}'] }}\nroutes:\n  - {{ name: r, path: /ws, pool: p, mode: frames }}\n"
    ))
    .await;
    let mut ws = ws(gw.addr(), "h", "/ws").await;
    ws.send(Message::text("flood")).await.unwrap();
    // The flood is flowing: the gateway is writing to this client.
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Binary(b)))) => assert_eq!(b.len(), 64 * 1024),
        other => panic!("expected the flood, got {other:?}"),
    }
    // Unread, it fills this client's receive buffer and the gateway's send
    // buffer; then the gateway's write waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.send(Message::text("last words")).await.unwrap();
    socket2::SockRef::from(ws.get_ref())
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(ws);
    tokio::time::timeout(Duration::from_secs(10), done.notified())
        .await
        .expect("the backend's session ended");
    let got = got.lock().unwrap().clone();
    assert_eq!(
        got.first().map(String::as_str),
        Some("last words"),
        "{got:?}"
    );
    // As a client that went away: 1001, not a normal closure.
    assert_eq!(
        got.last().map(String::as_str),
        Some("closed:1001"),
        "the backend is told the client went: {got:?}"
    );
}

/// The backend dies (no Close, listener gone): the client stays, the
/// preamble reaches the new backend, later messages arrive in order.
#[tokio::test]
async fn a_dying_backend_moves_the_session_and_replays_the_preamble() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let gw = gateway(&yaml(
        &[&a, &b],
        ", resume: true, replay_first: 2, on_resume: '{\"resumed\":true}'",
    ))
    .await;
    let mut ws = ws(gw.addr(), "h", "/ws").await;
    ws.send(Message::text("auth")).await.unwrap();
    let first = next_text(&mut ws).await;
    let (dead, alive) = if first.starts_with("a:") {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert_eq!(first, format!("{}:auth", dead.name));
    ws.send(Message::text("subscribe")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, format!("{}:subscribe", dead.name));
    ws.send(Message::text("one")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, format!("{}:one", dead.name));
    dead.kill.cancel();
    // No close: the app is told, the preamble is replayed (its answers come
    // again: at-least-once), and the session goes on.
    assert_eq!(next_text(&mut ws).await, r#"{"resumed":true}"#);
    let n = alive.name;
    for want in ["auth", "subscribe"] {
        assert_eq!(next_text(&mut ws).await, format!("{n}:{want}"));
    }
    ws.send(Message::text("two")).await.unwrap();
    ws.send(Message::text("three")).await.unwrap();
    for want in ["two", "three"] {
        assert_eq!(next_text(&mut ws).await, format!("{n}:{want}"));
    }
    assert_eq!(alive.got(), ["auth", "subscribe", "two", "three"]);
    assert_eq!(dead.got(), ["auth", "subscribe", "one"]);
    // Still the same client session.
    ws.send(Message::text("four")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, format!("{n}:four"));
}

/// While no backend is there, client messages wait (in order) and go to
/// the next backend that takes the session, after the preamble.
#[tokio::test]
async fn messages_sent_during_the_gap_wait_for_the_next_backend() {
    let a = Backend::start("a").await;
    let later = reserve_port();
    let b_addr: std::net::SocketAddr = ([127, 0, 0, 1], later.port).into();
    let gw = gateway(&format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://{}, ws://{b_addr}] }}\nroutes:\n  - {{ name: r, path: /ws, pool: p, mode: frames, resume: true, replay_first: 1, resume_timeout: 10s }}\n",
        a.addr
    ))
    .await;
    let mut ws = ws(gw.addr(), "h", "/ws").await; // b refuses: a takes it
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "a:hello");
    a.kill.cancel();
    // Long enough for upgate to see the backend go; no backend listens now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for m in ["x", "y", "z"] {
        ws.send(Message::text(m)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = Backend::start_on("b", later.port).await;
    for want in ["hello", "x", "y", "z"] {
        assert_eq!(next_text(&mut ws).await, format!("b:{want}"));
    }
    assert_eq!(b.got(), ["hello", "x", "y", "z"]);
}

/// A backend closing with 1001 (going away, as on a deploy) moves the
/// session; one closing with 1000 ends it normally.
#[tokio::test]
async fn close_1001_moves_the_session_and_close_1000_ends_it() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let gw = gateway(&format!(
        "admin: {{ addr: '127.0.0.1:0' }}\n{}",
        yaml(&[&a, &b], ", resume: true, on_resume: resumed")
    ))
    .await;
    let admin = gw.admin.expect("admin");
    let mut ws = ws(gw.addr(), "h", "/ws").await;
    ws.send(Message::text("hi")).await.unwrap();
    let first = next_text(&mut ws).await;
    let other = if first.starts_with("a:") { "b" } else { "a" };
    ws.send(Message::text("close:1001")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "resumed");
    // Counted by cause, with the gap it took.
    let resumes = "upgate_frames_resumes_total";
    assert_eq!(
        metric(admin, resumes, r#"route="r",cause="backend_close""#).await,
        1
    );
    assert_eq!(
        metric(admin, resumes, r#"route="r",cause="backend_gone""#).await,
        0
    );
    assert_eq!(
        metric(
            admin,
            "upgate_frames_resume_gap_seconds_count",
            r#"route="r""#
        )
        .await,
        1
    );
    ws.send(Message::text("again")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, format!("{other}:again"));
    ws.send(Message::text("close:1000")).await.unwrap();
    assert_eq!(
        close_of(&mut ws, Duration::from_secs(5)).await,
        (1000, "bye".into())
    );
}

#[tokio::test]
async fn no_backend_within_resume_timeout_closes_with_the_reason() {
    let a = Backend::start("a").await;
    let gw = gateway(&yaml(&[&a], ", resume: true, resume_timeout: 500ms")).await;
    let mut ws = ws(gw.addr(), "h", "/ws").await;
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "a:hi");
    let started = std::time::Instant::now();
    a.kill.cancel();
    let (code, reason) = close_of(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(code, 1012, "{reason}");
    assert!(
        reason.contains("no backend took the session within 500ms"),
        "{reason}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_full_resume_buffer_closes_with_1013() {
    let a = Backend::start("a").await;
    let gw = gateway(&yaml(
        &[&a],
        ", resume: true, resume_buffer: 10, resume_timeout: 10s",
    ))
    .await;
    let mut ws = ws(gw.addr(), "h", "/ws").await;
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "a:hi");
    a.kill.cancel();
    // Wait until upgate noticed (the session is in its gap), then overflow.
    tokio::time::sleep(Duration::from_millis(200)).await;
    ws.send(Message::text("0123456789abcdef")).await.unwrap();
    let (code, reason) = close_of(&mut ws, Duration::from_secs(5)).await;
    assert_eq!((code, reason.as_str()), (1013, "resume buffer full"));
}

/// Frames keys where they mean nothing are config errors.
#[test]
fn frames_keys_belong_to_frames_routes() {
    let cfg = |route: &str| {
        upgate::Config::parse(
            std::path::Path::new("routes.yaml"),
            &format!("listen:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://127.0.0.1:9] }}\nroutes:\n  - {{ name: r, pool: p{route} }}\n"),
        )
    };
    let e = cfg(", resume: true").unwrap_err().to_string();
    assert!(
        e.contains("`resume` is only used with `mode: frames`"),
        "{e}"
    );
    let e = cfg(", mode: frames, replay_first: 1")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`replay_first` is only used with `resume: true`"),
        "{e}"
    );
    let e = cfg(", mode: frames, linger: 1s").unwrap_err().to_string();
    assert!(
        e.contains("`linger` is only used with `mode: fanout`"),
        "{e}"
    );
    let e = cfg(", max_message: 1000").unwrap_err().to_string();
    assert!(
        e.contains("`max_message` is only used with `mode: fanout` or `mode: frames`"),
        "{e}"
    );
    assert!(cfg(", mode: frames, resume: true, replay_first: 2, max_message: 4096").is_ok());
}

/// 1,000 live sessions over two backends; one backend is killed (its
/// connections dropped without a Close, its listener gone). No client is
/// disconnected: each of the dead backend's sessions is told it resumed,
/// gets its preamble's answer from the other backend and goes on. Prints
/// the time from the kill to each moved session's `on_resume` message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sessions_outlive_their_backend() {
    const N: usize = 1000;
    let _ = rlimit::increase_nofile_limit(16_384);
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let gw = gateway(&yaml(
        &[&a, &b],
        ", resume: true, replay_first: 1, on_resume: resumed",
    ))
    .await;
    let addr = gw.addr();
    let (kill_tx, kill_rx) = tokio::sync::watch::channel(None::<std::time::Instant>);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(N);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let (mut kill_rx, ready_tx) = (kill_rx.clone(), ready_tx.clone());
        tasks.spawn(async move {
            let mut ws = ws(addr, "h", "/ws").await;
            let first = roundtrip(&mut ws, &format!("hello {i}")).await;
            let on_a = first.starts_with("a:");
            ready_tx.send(()).await.unwrap();
            let killed = *kill_rx.wait_for(Option::is_some).await.unwrap();
            let mut moved_after = None;
            if on_a {
                assert_eq!(next_text(&mut ws).await, "resumed");
                moved_after = killed.map(|k| k.elapsed());
                assert_eq!(next_text(&mut ws).await, format!("b:hello {i}"));
            }
            assert_eq!(
                roundtrip(&mut ws, &format!("after {i}")).await,
                format!("b:after {i}")
            );
            moved_after
        });
    }
    for _ in 0..N {
        ready_rx.recv().await.unwrap();
    }
    a.kill.cancel();
    kill_tx.send(Some(std::time::Instant::now())).unwrap();
    let mut gaps = Vec::new();
    let mut done = 0;
    while let Some(r) = tokio::time::timeout(Duration::from_secs(60), tasks.join_next())
        .await
        .expect("every session went on within 60 s")
    {
        if let Some(gap) = r.expect("a session failed") {
            gaps.push(gap);
        }
        done += 1;
    }
    assert_eq!(done, N, "every session went on");
    assert!(
        gaps.len() >= N / 4,
        "{} of {N} sessions were on the killed backend",
        gaps.len()
    );
    gaps.sort();
    let at = |q: f64| gaps[((gaps.len() - 1) as f64 * q) as usize];
    eprintln!(
        "frames resume: {} of {N} sessions moved, 0 disconnected; kill to on_resume p50 {:?}, p99 {:?}, max {:?}",
        gaps.len(),
        at(0.5),
        at(0.99),
        gaps[gaps.len() - 1]
    );
}

/// One server frame (unmasked, payload under 64 KiB): its first byte and payload.
async fn read_frame(tcp: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; 2];
    tcp.read_exact(&mut h).await.unwrap();
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            tcp.read_exact(&mut l).await.unwrap();
            usize::from(u16::from_be_bytes(l))
        }
        n => usize::from(n),
    };
    let mut p = vec![0u8; len];
    tcp.read_exact(&mut p).await.unwrap();
    (h[0], p)
}

/// The client leg negotiates permessage-deflate with upgate while the
/// backend leg stays plain; the subprotocol the backend selected is the
/// client's, and a resumed session's new backend must select it too.
#[tokio::test]
async fn compression_and_subprotocol_are_negotiated_per_leg() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let gw = gateway(&yaml(
        &[&a, &b],
        ", compression: true, resume: true, on_resume: resumed",
    ))
    .await;
    let mut tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Protocol: chat.v2, chat.v1\r\n\
          Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-protocol: chat.v2\r\n"),
        "{head}"
    );
    assert!(
        head.contains("sec-websocket-extensions: permessage-deflate"),
        "{head}"
    );
    // A masked, uncompressed text frame; its answer comes compressed (RSV1).
    let text = "hello hello hello hello hello hello hello hello";
    let mask = [7u8, 1, 9, 3];
    let mut f = vec![0x81, 0x80 | text.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(text.bytes().enumerate().map(|(i, c)| c ^ mask[i % 4]));
    let inflate = |p: &[u8]| {
        let mut d = flate2::Decompress::new(false);
        let mut input = p.to_vec();
        input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut out = Vec::with_capacity(1024);
        d.decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
            .unwrap();
        String::from_utf8(out).unwrap()
    };
    tcp.write_all(&f).await.unwrap();
    let (b0, p) = read_frame(&mut tcp).await;
    assert_eq!(b0, 0xC1, "FIN + RSV1 + text");
    let first = inflate(&p);
    assert!(first.ends_with(&format!(":{text}")), "{first}");
    let (dead, alive) = if first.starts_with("a:") {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert_eq!(dead.got(), [text], "the backend got plain text");
    // Moved: the new backend selected chat.v2 as well, or it would not be used.
    dead.kill.cancel();
    let (b0, p) = read_frame(&mut tcp).await;
    let resumed = if b0 & 0x40 != 0 {
        inflate(&p)
    } else {
        String::from_utf8(p).unwrap()
    };
    assert_eq!(resumed, "resumed");
    tcp.write_all(&f).await.unwrap();
    let (_, p) = read_frame(&mut tcp).await;
    assert_eq!(inflate(&p), format!("{}:{text}", alive.name));
}

/// A backend joins a pool whose sessions all sit on the other: the
/// rebalancer moves frames sessions to it at `max_moves_per_second` until
/// the spread is even, and no client is disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalancing_moves_sessions_to_a_new_backend_at_the_configured_pace() {
    use std::sync::atomic::Ordering::SeqCst;
    const N: usize = 40;
    let a = Backend::start("a").await;
    let later = reserve_port();
    let b_addr: std::net::SocketAddr = ([127, 0, 0, 1], later.port).into();
    let gw = gateway(&format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  p:\n    backends: [ws://{}, ws://{b_addr}]\n    eject_after: 1000\n    rebalance: {{ max_moves_per_second: 10, tolerance: 0.1 }}\nroutes:\n  - {{ name: r, path: /ws, pool: p, mode: frames, resume: true, on_resume: resumed }}\n",
        a.addr
    ))
    .await;
    let mut clients = Vec::new();
    for i in 0..N {
        let mut ws = ws(gw.addr(), "h", "/ws").await;
        assert_eq!(
            roundtrip(&mut ws, &format!("hi {i}")).await,
            format!("a:hi {i}")
        );
        clients.push(ws);
    }
    let b = Backend::start_on("b", later.port).await;
    let started = std::time::Instant::now();
    let mut first_move = None;
    loop {
        let on_b = b.live.load(SeqCst);
        if on_b >= 1 && first_move.is_none() {
            first_move = Some(started.elapsed());
        }
        if on_b >= N / 2 - 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "only {on_b} moved in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let spread = started.elapsed() - first_move.unwrap_or_default();
    // 20 moves at 10 a second take at least two ticks of the rebalancer.
    assert!(spread >= Duration::from_millis(800), "{spread:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (on_a, on_b) = (a.live.load(SeqCst), b.live.load(SeqCst));
    assert_eq!(on_a + on_b, N);
    assert!(
        (N / 2 - 2..=N / 2 + 2).contains(&on_b),
        "a {on_a}, b {on_b}"
    );
    // Every client is still in its session; the moved ones were told.
    let mut moved = 0;
    for (i, ws) in clients.iter_mut().enumerate() {
        let mut answer = roundtrip(ws, &format!("again {i}")).await;
        if answer == "resumed" {
            moved += 1;
            answer = next_text(ws).await;
        }
        assert!(answer.ends_with(&format!(":again {i}")), "{answer}");
    }
    assert_eq!(moved, on_b);
    eprintln!("rebalance: {on_b} of {N} sessions moved to the new backend over {spread:?}, 0 disconnected");
}

/// How a streaming client's session ended, and the session it opened again.
struct Ended {
    code: u16,
    reason: String,
    at: std::time::Instant,
    /// Who answered first on the new session.
    answer: String,
    _again: Ws<tokio::net::TcpStream>,
}

/// Streams 20 KB binary messages (one in flight) until the session is
/// closed or `stop` is cancelled; every echo must come back intact. A
/// closed client reconnects at once, as real ones do. Returns how it was
/// closed, or the still-open stream.
async fn stream_until_closed(
    gw: std::net::SocketAddr,
    mut ws: Ws<tokio::net::TcpStream>,
    i: usize,
    stop: CancellationToken,
) -> Result<Ended, Ws<tokio::net::TcpStream>> {
    let mut n = 0u32;
    loop {
        if stop.is_cancelled() {
            return Err(ws);
        }
        n += 1;
        let mut payload = vec![(i % 251) as u8; 20_000];
        payload[..4].copy_from_slice(&n.to_be_bytes());
        // A send may meet the Close already: the read below tells.
        let _ = ws.send(Message::Binary(payload.clone().into())).await;
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => {
                    assert!(b[..] == payload[..], "client {i}: echo {n} corrupted");
                    break;
                }
                Some(Ok(Message::Close(Some(f)))) => {
                    let at = std::time::Instant::now();
                    // Let tungstenite send its answer and see the end.
                    let _ = tokio::time::timeout(Duration::from_secs(5), async {
                        while let Some(Ok(_)) = ws.next().await {}
                    })
                    .await;
                    let mut again = support::ws(gw, "h", "/ws").await;
                    let answer = roundtrip(&mut again, &format!("back {i}")).await;
                    return Ok(Ended {
                        code: u16::from(f.code),
                        reason: f.reason.to_string(),
                        at,
                        answer,
                        _again: again,
                    });
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("client {i}: expected an echo or a Close, got {other:?}"),
            }
        }
    }
}

/// `rebalance: close` on a splice route: a backend joins a pool whose
/// sessions all sit on the other; the rebalancer closes sessions of the
/// loaded one with 1012 at `max_moves_per_second`, at a frame boundary
/// while they stream 20 KB messages both ways (no client sees a broken
/// frame; the backend gets a Close 1001), and the clients that reconnect
/// land on the new backend (least_conn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_close_ends_splice_sessions_with_1012_at_the_configured_pace() {
    use std::sync::atomic::Ordering::SeqCst;
    const N: usize = 30;
    let a = Backend::start("a").await;
    let later = reserve_port();
    let b_addr: std::net::SocketAddr = ([127, 0, 0, 1], later.port).into();
    let gw = gateway(&format!(
        "listen:\n  - addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\npools:\n  p:\n    backends: [ws://{}, ws://{b_addr}]\n    balance: least_conn\n    eject_after: 1000\n    rebalance: {{ max_moves_per_second: 5, tolerance: 0.1 }}\nroutes:\n  - {{ name: r, path: /ws, pool: p, rebalance: close }}\n",
        a.addr
    ))
    .await;
    let admin = gw.admin.expect("admin");
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for i in 0..N {
        let mut ws = ws(gw.addr(), "h", "/ws").await;
        assert_eq!(
            roundtrip(&mut ws, &format!("hi {i}")).await,
            format!("a:hi {i}")
        );
        tasks.push(tokio::spawn(stream_until_closed(
            gw.addr(),
            ws,
            i,
            stop.clone(),
        )));
    }
    let b = Backend::start_on("b", later.port).await;
    let started = std::time::Instant::now();
    // Until half the sessions were closed and the spread stays even.
    while a.live.load(SeqCst) > N / 2 + 1 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "a still holds {}",
            a.live.load(SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.cancel();
    let mut ended = Vec::new();
    let mut open = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.expect("client task") {
            Ok(e) => ended.push((i, e)),
            Err(ws) => open.push((i, ws)),
        }
    }
    let closes = ended.len();
    assert!((N / 2 - 1..=N / 2 + 1).contains(&closes), "{closes} closed");
    for (i, e) in &ended {
        assert_eq!(
            (e.code, e.reason.as_str()),
            (1012, "service restart: rebalancing, reconnect"),
            "client {i}"
        );
    }
    // Paced: about 15 closes at 5 a second span at least two ticks.
    let first = ended.iter().map(|(_, e)| e.at).min().expect("closes");
    let last = ended.iter().map(|(_, e)| e.at).max().expect("closes");
    let spread = last - first;
    assert!(
        spread >= Duration::from_millis(1500),
        "{closes} closes in {spread:?}"
    );
    // The backend was told the client went away, once per closed session.
    let told = a.got().iter().filter(|m| *m == "closed:1001").count();
    assert_eq!(told, closes, "Close 1001 at the old backend");
    wait_metric(
        admin,
        "upgate_rebalance_closes_total",
        "route=\"r\"",
        closes as u64,
    )
    .await;
    // Reconnected clients landed on the new backend; the others stayed on a.
    for (i, e) in &ended {
        assert_eq!(e.answer, format!("b:back {i}"));
    }
    assert_eq!(
        (a.live.load(SeqCst), b.live.load(SeqCst)),
        (N - closes, closes)
    );
    for (i, ws) in open.iter_mut() {
        ws.send(Message::text(format!("still {i}"))).await.unwrap();
        loop {
            match ws.next().await.expect("open").expect("frame") {
                Message::Text(t) => {
                    assert_eq!(t.as_str(), format!("a:still {i}"));
                    break;
                }
                Message::Binary(_) | Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("{other:?}"),
            }
        }
    }
    eprintln!("rebalance: close: {closes} of {N} splice sessions closed with 1012 over {spread:?}; {} stayed", open.len());
    drop(b);
}

/// `rebalance: close` on a frames route without resume closes with 1012
/// too; where it means nothing it is a config error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_close_on_a_frames_route_and_where_it_is_refused() {
    use std::sync::atomic::Ordering::SeqCst;
    let a = Backend::start("a").await;
    let later = reserve_port();
    let b_addr: std::net::SocketAddr = ([127, 0, 0, 1], later.port).into();
    let gw = gateway(&format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  p:\n    backends: [ws://{}, ws://{b_addr}]\n    eject_after: 1000\n    rebalance: {{ max_moves_per_second: 10 }}\nroutes:\n  - {{ name: r, path: /ws, pool: p, mode: frames, rebalance: close }}\n",
        a.addr
    ))
    .await;
    let mut clients = Vec::new();
    for i in 0..4 {
        let mut ws = ws(gw.addr(), "h", "/ws").await;
        assert_eq!(
            roundtrip(&mut ws, &format!("hi {i}")).await,
            format!("a:hi {i}")
        );
        clients.push(ws);
    }
    let _b = Backend::start_on("b", later.port).await;
    let mut closed = 0;
    for ws in clients.iter_mut() {
        if let Ok(Some(Ok(Message::Close(Some(f))))) =
            tokio::time::timeout(Duration::from_millis(3000), ws.next()).await
        {
            assert_eq!(u16::from(f.code), 1012);
            closed += 1;
        }
    }
    assert_eq!(closed, 2, "4 sessions on a, 0 on b: 2 leave");
    // Both went through the frames session's close: the backend heard 1001.
    for _ in 0..100 {
        if a.got().iter().filter(|m| *m == "closed:1001").count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.got().iter().filter(|m| *m == "closed:1001").count(), 2);
    assert_eq!(a.live.load(SeqCst), 2);

    let cfg = |pool: &str, route: &str| {
        upgate::Config::parse(
            std::path::Path::new("routes.yaml"),
            &format!("listen:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://127.0.0.1:9]{pool} }}\nroutes:\n  - {{ name: r, pool: p, rebalance: close{route} }}\n"),
        )
    };
    let e = cfg("", "").unwrap_err().to_string();
    assert!(
        e.contains("routes[0].rebalance") && e.contains("pool `p` has no `rebalance:` settings"),
        "{e}"
    );
    let r = ", rebalance: { max_moves_per_second: 3 }";
    assert!(cfg(r, "").is_ok());
    let e = cfg(r, ", mode: frames, resume: true")
        .unwrap_err()
        .to_string();
    assert!(e.contains("moves its sessions without closing them"), "{e}");
    let e = cfg(r, ", mode: fanout").unwrap_err().to_string();
    assert!(
        e.contains("fan-out sessions have no backend of their own"),
        "{e}"
    );
    let e = cfg(r, "").map(|_| ()).and_then(|_| {
        upgate::Config::parse(
            std::path::Path::new("routes.yaml"),
            "listen:\n  - addr: 127.0.0.1:0\npools:\n  p: { backends: [ws://127.0.0.1:9] }\nroutes:\n  - { name: r, pool: p, rebalance: later }\n",
        )
        .map(|_| ())
    });
    let e = e.unwrap_err().to_string();
    assert!(e.contains("rebalance") && e.contains("close"), "{e}");
}

/// A rolling restart: three backends, 1,000 live sessions; each backend in
/// turn is killed and started again on its port. No client is disconnected
/// and every session still answers at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_three_backends_disconnects_nobody() {
    const N: usize = 1000;
    let _ = rlimit::increase_nofile_limit(16_384);
    let ports = [reserve_port(), reserve_port(), reserve_port()];
    let names = ["a", "b", "c"];
    let mut backends = Vec::new();
    for (p, n) in ports.iter().zip(names) {
        backends.push(Backend::start_on(n, p.port).await);
    }
    let list: Vec<String> = ports
        .iter()
        .map(|p| format!("ws://127.0.0.1:{}", p.port))
        .collect();
    let gw = gateway(&format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  p:\n    backends: [{}]\n    eject_after: 0\nroutes:\n  - {{ name: r, path: /ws, pool: p, mode: frames, resume: true, replay_first: 1 }}\n",
        list.join(", ")
    ))
    .await;
    let mut clients = Vec::new();
    for i in 0..N {
        let mut ws = ws(gw.addr(), "h", "/ws").await;
        let answer = roundtrip(&mut ws, &format!("hello {i}")).await;
        assert!(answer.ends_with(&format!(":hello {i}")), "{answer}");
        clients.push(ws);
    }
    let started = std::time::Instant::now();
    for k in 0..backends.len() {
        let b = &backends[k];
        let had = b.live.load(std::sync::atomic::Ordering::SeqCst);
        b.kill.cancel();
        // Its sessions move to the two others; then it comes back.
        tokio::time::sleep(Duration::from_millis(500)).await;
        backends[k] = Backend::start_on(names[k], ports[k].port).await;
        eprintln!("restarted {}: it had {had} sessions", names[k]);
    }
    let took = started.elapsed();
    // Every client is still in its session: its preamble's answers came
    // again from each new backend (at-least-once), then its own message.
    for (i, ws) in clients.iter_mut().enumerate() {
        ws.send(Message::text(format!("after {i}"))).await.unwrap();
        loop {
            let t = next_text(ws).await;
            if t.ends_with(&format!(":hello {i}")) {
                continue;
            }
            assert!(t.ends_with(&format!(":after {i}")), "{t}");
            break;
        }
    }
    let live: usize = backends
        .iter()
        .map(|b| b.live.load(std::sync::atomic::Ordering::SeqCst))
        .sum();
    assert_eq!(live, N, "every session has a backend");
    eprintln!("rolling restart of 3 backends under {N} sessions in {took:?}: 0 disconnected");
}

/// The demo's `live` route, as `routes.yaml` ships it: the page's "restart"
/// makes the backend serving the session close everything with 1012 (a
/// redeploy); the live session moves to the other backend, is told, gets
/// its first message's answer again from there and goes on, while a
/// spliced chat session on the restarted backend is closed.
#[tokio::test]
async fn the_demo_restart_moves_the_live_session_and_closes_chat() {
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/routes.yaml"))
        .expect("routes.yaml");
    let start = shipped.find("  - name: live").expect("the live route");
    let len = shipped[start + 4..]
        .find("  - name:")
        .expect("a route after it");
    let live = &shipped[start..start + 4 + len];
    let backends = echo_backends(&["echo-1", "echo-2"]).await;
    let gw = gateway(&format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  chat:\n    backends: [ws://{}, ws://{}]\nroutes:\n  - {{ name: chat, path: /chat, pool: chat }}\n{live}",
        backends.addrs[0], backends.addrs[1]
    ))
    .await;
    let who = |answer: &str| answer.split_whitespace().next().unwrap_or("").to_string();
    let mut page = ws(gw.addr(), "h", "/live").await;
    let first = who(&whoami(&mut page).await);
    // A chat session on the same backend.
    let mut chat = loop {
        let mut c = ws(gw.addr(), "h", "/chat").await;
        if who(&whoami(&mut c).await) == first {
            break c;
        }
    };
    page.send(Message::text("/restart")).await.unwrap();
    let got = [next_text(&mut page).await, next_text(&mut page).await];
    let told = got.iter().position(|m| m == r#"{"resumed":true}"#);
    let Some(told) = told else {
        panic!("no on_resume message: {got:?}")
    };
    let again = &got[1 - told];
    let now = who(again);
    // The new backend got the same request: path, client host, forwarding headers.
    for line in [
        "path=/live ",
        "\nhost: h\n",
        "\nx-forwarded-for: 127.0.0.1\n",
        "\nsec-websocket-version: 13\n",
    ] {
        assert!(again.contains(line), "{line:?} missing in {again}");
    }
    assert!(
        now.starts_with("backend=echo-") && now != first,
        "{first} -> {now}"
    );
    assert_eq!(
        close_of(&mut chat, Duration::from_secs(5)).await,
        (1012, "demo backend restarting".to_string())
    );
    assert_eq!(roundtrip(&mut page, "still here").await, "still here");
}
