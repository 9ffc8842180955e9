//! WebSocket sessions through the gateway, against real echo backends.

mod support;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

fn one_pool(backends: &[std::net::SocketAddr]) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("ws://{a}")).collect();
    format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  p:\n    connect_timeout: 1s\n    backends: [{}]\nroutes:\n  - name: r\n    path: /chat\n    pool: p\n",
        list.join(", ")
    )
}

#[tokio::test]
async fn text_and_binary_echo() {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&one_pool(&be.addrs)).await;
    let mut ws = ws(gw.addr(), "example.com", "/chat").await;
    assert_eq!(roundtrip(&mut ws, "hello").await, "hello");
    let bin: Vec<u8> = (0..=255).collect();
    ws.send(Message::binary(bin.clone())).await.unwrap();
    match ws.next().await.unwrap().unwrap() {
        Message::Binary(b) => assert_eq!(&b[..], &bin[..]),
        m => panic!("expected binary, got {m:?}"),
    }
}

#[tokio::test]
async fn sixteen_mib_message_arrives_intact() {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&one_pool(&be.addrs)).await;
    let mut ws = ws(gw.addr(), "example.com", "/chat").await;
    let big: Vec<u8> = (0..16 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(31) >> 3) as u8)
        .collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    match ws.next().await.unwrap().unwrap() {
        Message::Binary(b) => assert!(b[..] == big[..], "16 MiB payload corrupted"),
        m => panic!("expected binary, got {m:?}"),
    }
}

#[tokio::test]
async fn ping_gets_pong() {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&one_pool(&be.addrs)).await;
    let mut ws = ws(gw.addr(), "example.com", "/chat").await;
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    match ws.next().await.unwrap().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"are you there"),
        m => panic!("expected pong, got {m:?}"),
    }
}

#[tokio::test]
async fn close_codes_pass_through_both_ways() {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&one_pool(&be.addrs)).await;

    // Client-initiated: the backend echoes our code and reason.
    let mut ws1 = ws(gw.addr(), "example.com", "/chat").await;
    ws1.close(Some(CloseFrame {
        code: CloseCode::from(4001),
        reason: "client bye".into(),
    }))
    .await
    .unwrap();
    let mut seen = None;
    while let Some(m) = ws1.next().await {
        if let Ok(Message::Close(f)) = m {
            seen = f;
        }
    }
    let f = seen.expect("close frame from backend");
    assert_eq!((u16::from(f.code), f.reason.as_str()), (4001, "client bye"));

    // Backend-initiated.
    let mut ws2 = ws(gw.addr(), "example.com", "/chat").await;
    ws2.send(Message::text("/close 4002 server says bye"))
        .await
        .unwrap();
    let f = loop {
        match ws2.next().await.expect("frame").expect("ok") {
            Message::Close(f) => break f.expect("close frame"),
            _ => continue,
        }
    };
    assert_eq!(
        (u16::from(f.code), f.reason.as_str()),
        (4002, "server says bye")
    );
}

#[tokio::test]
async fn subprotocol_is_negotiated_end_to_end() {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&one_pool(&be.addrs)).await;
    let tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        "ws://example.com/chat",
    )
    .unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "chat.v2, chat.v1".parse().unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "chat.v2");
    let who = whoami(&mut ws).await;
    assert!(
        who.contains("sec-websocket-protocol: chat.v2, chat.v1"),
        "{who}"
    );
}

#[tokio::test]
async fn forwarded_headers_query_and_cookies_reach_the_backend() {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&one_pool(&be.addrs)).await;
    let mut ws = ws_with(
        gw.addr(),
        "app.example.com",
        "/chat/room?id=7",
        &[("cookie", "sid=abc"), ("authorization", "Bearer t")],
    )
    .await
    .unwrap();
    let who = whoami(&mut ws).await;
    for want in [
        "path=/chat/room?id=7",
        "cookie: sid=abc",
        "authorization: Bearer t",
        "x-forwarded-for: 127.0.0.1",
        "x-forwarded-proto: http",
        "x-forwarded-host: app.example.com",
        "forwarded: for=127.0.0.1;proto=http;host=\"app.example.com\"",
        "host: app.example.com",
        "upgrade: websocket",
    ] {
        assert!(who.contains(want), "missing `{want}` in:\n{who}");
    }
}

#[tokio::test]
async fn services_told_apart_by_host_and_by_path() {
    let be = echo_backends(&["chat", "feed", "admin", "default"]).await;
    let [chat, feed, admin, default] = [be.addrs[0], be.addrs[1], be.addrs[2], be.addrs[3]];
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  chat: {{ backends: [ws://{chat}] }}\n  feed: {{ backends: [ws://{feed}] }}\n  admin: {{ backends: [ws://{admin}] }}\n  default: {{ backends: [ws://{default}] }}\nroutes:\n\
  - {{ name: any, path: /, pool: default }}\n\
  - {{ name: wild, host: '*.example.com', path: /ws, pool: feed }}\n\
  - {{ name: chat, host: chat.example.com, path: /ws, pool: chat }}\n\
  - {{ name: admin, host: chat.example.com, path: /ws/admin, pool: admin }}\n"
    );
    let gw = gateway(&yaml).await;
    let cases = [
        ("chat.example.com", "/ws", "chat"),
        ("chat.example.com", "/ws/admin/x", "admin"),
        ("Chat.Example.Com:8080", "/ws/room", "chat"),
        ("feed.example.com", "/ws", "feed"),
        ("deep.feed.example.com", "/ws/x", "feed"),
        ("chat.example.com", "/other", "default"),
        ("example.com", "/ws", "default"),
        ("feed.example.com", "/wsx", "default"),
    ];
    for (host, path, want) in cases {
        let mut ws = ws(gw.addr(), host, path).await;
        let who = whoami(&mut ws).await;
        assert_eq!(backend_of(&who), want, "{host}{path}");
    }
}

#[tokio::test]
async fn strip_prefix_rewrites_the_backend_path() {
    let be = echo_backends(&["a"]).await;
    let a = be.addrs[0];
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: ['ws://{a}/base'] }}\nroutes:\n  - {{ name: t, path: /ticker, pool: p, strip_prefix: true }}\n  - {{ name: k, path: /keep, pool: p }}\n"
    );
    let gw = gateway(&yaml).await;
    for (path, want) in [
        ("/ticker", "path=/base/ "),
        ("/ticker/eur?x=1", "path=/base/eur?x=1"),
        ("/keep/a", "path=/base/keep/a"),
    ] {
        let mut ws = ws(gw.addr(), "h", path).await;
        let who = whoami(&mut ws).await;
        assert!(who.replace('\n', " ").contains(want), "{path}: {who}");
    }
}

#[tokio::test]
async fn round_robin_spreads_sessions() {
    let be = echo_backends(&["a", "b"]).await;
    let gw = gateway(&one_pool(&be.addrs)).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let mut ws = ws(gw.addr(), "h", "/chat").await;
        seen.push(backend_of(&whoami(&mut ws).await).to_string());
    }
    assert_eq!(seen.iter().filter(|s| *s == "a").count(), 2, "{seen:?}");
    assert_eq!(seen.iter().filter(|s| *s == "b").count(), 2, "{seen:?}");
}

#[tokio::test]
async fn unknown_route_is_404_naming_host_and_path() {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&one_pool(&be.addrs)).await;
    let r = get(gw.addr(), "nowhere.example", "/nope").await;
    assert_eq!(r.status, 404);
    assert!(
        r.body.contains("nowhere.example") && r.body.contains("/nope"),
        "{}",
        r.body
    );
    let err = ws_with(gw.addr(), "h", "/nope", &[]).await.unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
}

#[tokio::test]
async fn every_backend_down_is_502() {
    let dead = dead_addrs(2).await;
    let gw = gateway(&one_pool(&dead)).await;
    let err = ws_with(gw.addr(), "h", "/chat", &[]).await.unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), 502);
            let body =
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).to_string();
            assert!(
                body.contains("no backend of pool `p`") && body.contains("2 tried"),
                "{body}"
            );
        }
        e => panic!("expected HTTP 502, got {e}"),
    }
    assert_eq!(get(gw.addr(), "h", "/chat").await.status, 502);
}

#[tokio::test]
async fn fails_over_when_the_first_backend_refuses() {
    let be = echo_backends(&["alive"]).await;
    let dead = dead_addr().await;
    let gw = gateway(&one_pool(&[dead, be.addrs[0]])).await;
    // Round robin starts at the dead one for every other session: all must land.
    for _ in 0..4 {
        let mut ws = ws(gw.addr(), "h", "/chat").await;
        assert_eq!(backend_of(&whoami(&mut ws).await), "alive");
    }
    // Plain HTTP without a body fails over too.
    for _ in 0..2 {
        let r = get(gw.addr(), "h", "/chat/x").await;
        assert_eq!(r.status, 200);
        assert!(r.body.starts_with("backend=alive"), "{}", r.body);
    }
}

#[tokio::test]
async fn malformed_handshakes_get_400_or_426() {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&one_pool(&be.addrs)).await;
    let base =
        "Host: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n";
    let bad_key = format!("GET /chat HTTP/1.1\r\n{base}Sec-WebSocket-Key: tooshort\r\n\r\n");
    let r = raw(gw.addr(), bad_key.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(r.contains("Sec-WebSocket-Key"), "{r}");
    let post = format!("POST /chat HTTP/1.1\r\n{base}Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nContent-Length: 0\r\n\r\n");
    let r = raw(gw.addr(), post.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 400") && r.contains("GET"), "{r}");
    let v8 = "GET /chat HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let r = raw(gw.addr(), v8.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 426"), "{r}");
    assert!(
        r.to_ascii_lowercase().contains("sec-websocket-version: 13"),
        "{r}"
    );
    let garbage = raw(gw.addr(), b"NOT HTTP AT ALL\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
}

#[tokio::test]
async fn a_backend_refusing_the_upgrade_has_its_answer_relayed() {
    // A plain HTTP server (not WebSocket) behind a WebSocket route.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(
                    b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\nX-Why: token\r\n\r\nforbidden",
                )
                .await;
        }
    });
    let gw = gateway(&one_pool(&[addr])).await;
    match ws_with(gw.addr(), "h", "/chat", &[]).await.unwrap_err() {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), 403);
            assert_eq!(resp.headers()["x-why"], "token");
            assert_eq!(resp.body().as_deref(), Some(&b"forbidden"[..]));
        }
        e => panic!("expected the backend's 403, got {e}"),
    }
}

#[tokio::test]
async fn hash_balancing_agrees_across_gateways() {
    let be = echo_backends(&["a", "b", "c"]).await;
    let list: Vec<String> = be.addrs.iter().map(|a| format!("ws://{a}")).collect();
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  p:\n    balance: hash\n    hash_key: header:x-user\n    backends: [{}]\nroutes:\n  - {{ name: r, pool: p }}\n",
        list.join(", ")
    );
    // Two independent gateways, as several instances behind one DNS name.
    let g1 = gateway(&yaml).await;
    let g2 = gateway(&yaml).await;
    let mut spread = std::collections::HashSet::new();
    for user in 0..12 {
        let h = format!("user-{user}");
        let mut picks = Vec::new();
        for gw in [&g1, &g2, &g1] {
            let mut ws = ws_with(gw.addr(), "h", "/", &[("x-user", h.as_str())])
                .await
                .unwrap();
            picks.push(backend_of(&whoami(&mut ws).await).to_string());
        }
        assert!(
            picks.iter().all(|p| *p == picks[0]),
            "user {user}: {picks:?}"
        );
        spread.insert(picks[0].clone());
    }
    assert!(spread.len() >= 2, "12 users all on one backend: {spread:?}");
}

#[tokio::test]
async fn origins_limit_which_pages_may_open_websockets_on_splice_and_fanout_routes() {
    let be = echo_backends(&["a"]).await;
    let feed = support::feed::Feed::start().await;
    let gw = gateway(&format!(
        "admin: {{ addr: '127.0.0.1:0' }}\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://{}] }}\n  feed: {{ backends: ['{}'] }}\nroutes:\n  - name: r\n    path: /chat\n    pool: p\n    origins: [https://app.example.com, 'https://*.example.org', 'http://localhost:8080']\n  - name: open\n    path: /open\n    pool: p\n  - name: f\n    path: /feed\n    pool: feed\n    mode: fanout\n    origins: [https://app.example.com]\n",
        be.addrs[0],
        feed.url()
    ))
    .await;
    let addr = gw.addr();
    for ok in [
        Some("https://app.example.com"),
        Some("HTTPS://App.Example.COM"),
        Some("https://eu.example.org"),
        Some("http://localhost:8080"),
        None, // not a browser
    ] {
        let h: Vec<(&str, &str)> = ok.iter().map(|o| ("origin", *o)).collect();
        let mut s = ws_with(addr, "h", "/chat", &h)
            .await
            .unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        assert_eq!(roundtrip(&mut s, "hi").await, "hi");
    }
    for bad in [
        "https://evil.example.net",
        "https://app.example.com.evil.net",
        "http://app.example.com",
        "https://example.org",
        "http://localhost:8081",
        "null",
    ] {
        let (status, _, body) = refusal(
            ws_with(addr, "h", "/chat", &[("origin", bad)])
                .await
                .unwrap_err(),
        );
        assert_eq!(status, 403, "{bad}: {body}");
        assert!(
            body.contains(&format!("origin `{bad}` may not open WebSockets")),
            "{body}"
        );
    }
    // A route without `origins` takes any page.
    let mut s = ws_with(
        addr,
        "h",
        "/open",
        &[("origin", "https://evil.example.net")],
    )
    .await
    .unwrap();
    assert_eq!(roundtrip(&mut s, "open").await, "open");
    // Fan-out routes check before joining a channel (no upstream is opened).
    let (status, _, _) = refusal(
        ws_with(
            addr,
            "h",
            "/feed",
            &[("origin", "https://evil.example.net")],
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(status, 403);
    assert_eq!(feed.accepted(), 0, "a refused client opened the upstream");
    ws_with(addr, "h", "/feed", &[("origin", "https://app.example.com")])
        .await
        .expect("allowed origin joins the feed");
    // Counted as rejected upgrades.
    let m = admin_request(gw.admin.expect("admin"), "GET", "/metrics", None).await;
    let line = "upgate_upgrades_total{route=\"r\",outcome=\"rejected\"} 6";
    assert!(m.body.contains(line), "no `{line}` in\n{}", m.body);
}

/// A real browser's `Origin` (headless Chromium, page on a loopback port)
/// matches an `origins` entry written the way the README says, and is
/// refused by a route that lists another origin.
#[tokio::test]
#[cfg_attr(no_browser, ignore = "needs chromium (apt-get install chromium)")]
async fn a_browsers_origin_is_matched_as_written() {
    let be = echo_backends(&["a"]).await;
    let page = "<body><script>\
        const keep = setInterval(() => fetch('/busy').catch(() => {}), 50);\
        let done = 0;\
        for (const name of ['allowed', 'denied']) {\
          const ws = new WebSocket('ws://' + GATEWAY + '/' + name);\
          ws.onopen = () => ws.send('hi');\
          ws.onmessage = e => { document.body.dataset[name] = 'echo:' + e.data; ws.close(); };\
          ws.onclose = e => {\
            if (!document.body.dataset[name]) document.body.dataset[name] = 'closed:' + e.code;\
            if (++done === 2) clearInterval(keep);\
          };\
        }\
        </script></body>";
    // The gateway's address goes into the page, the page's origin into the config.
    let reserved = reserve_port();
    let gw_port = reserved.port;
    let web = static_http(
        "text/html",
        page.replace("GATEWAY", &format!("'127.0.0.1:{gw_port}'")),
    )
    .await;
    let gw = gateway(&format!(
        "listen:\n  - addr: 127.0.0.1:{gw_port}\npools:\n  p: {{ backends: [ws://{}] }}\nroutes:\n  - {{ name: allowed, path: /allowed, pool: p, origins: ['http://127.0.0.1:{}'] }}\n  - {{ name: denied, path: /denied, pool: p, origins: ['https://app.example.com'] }}\n",
        be.addrs[0],
        web.port()
    ))
    .await;
    let dom = browser_dom(&format!("http://127.0.0.1:{}/", web.port())).await;
    assert!(dom.contains(r#"data-allowed="echo:hi""#), "{dom}");
    assert!(dom.contains(r#"data-denied="closed:1006""#), "{dom}");
    drop(gw);
}

/// Reads one HTTP/1.1 response head (and its `Content-Length` body) from `tcp`.
async fn read_response(tcp: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut chunk))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(n > 0, "closed before a whole head: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut rest = buf[end..].to_vec();
    while rest.len() < length {
        let mut chunk = [0u8; 1024];
        let n = tcp.read(&mut chunk).await.expect("read body");
        assert!(n > 0, "closed inside the body");
        rest.extend_from_slice(&chunk[..n]);
    }
    (head, rest)
}

const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

#[tokio::test]
async fn a_frame_sent_with_the_upgrade_request_reaches_the_backend() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&one_pool(&be.addrs)).await;
    let mut tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    // Head and a masked text frame "hi" in one write: the gateway reads both at once.
    let mut bytes =
        format!("GET /chat HTTP/1.1\r\nHost: example.com\r\n{UPGRADE}\r\n").into_bytes();
    let mask = [1u8, 2, 3, 4];
    bytes.extend_from_slice(&[0x81, 0x82]);
    bytes.extend_from_slice(&mask);
    bytes.extend(b"hi".iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    tcp.write_all(&bytes).await.unwrap();
    let (head, early) = read_response(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let mut frame = early;
    while frame.len() < 4 {
        let mut chunk = [0u8; 64];
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before the echo");
        frame.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(&frame[..4], b"\x81\x02hi");
}

#[tokio::test]
async fn after_a_refused_upgrade_the_connection_serves_its_next_request() {
    use tokio::io::AsyncWriteExt;
    let be = echo_backends(&["a"]).await;
    let dead = dead_addr().await;
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  live:\n    backends: [ws://{}]\n  dead:\n    connect_timeout: 1s\n    backends: [ws://{dead}]\nroutes:\n  - {{ name: down, path: /down, pool: dead }}\n  - {{ name: up, path: /chat, pool: live }}\n",
        be.addrs[0]
    );
    let gw = gateway(&yaml).await;
    let mut tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let first = format!("GET /down HTTP/1.1\r\nHost: h\r\n{UPGRADE}\r\n");
    tcp.write_all(first.as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(
        String::from_utf8_lossy(&body).contains("no backend of pool `dead`"),
        "{body:?}"
    );
    // Same connection: the next request is served (here, an upgrade that succeeds).
    let second = format!("GET /chat HTTP/1.1\r\nHost: h\r\n{UPGRADE}\r\n");
    tcp.write_all(second.as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}
