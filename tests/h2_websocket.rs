//! WebSockets over HTTP/2 (RFC 8441): an extended CONNECT with
//! `:protocol websocket` is answered `200` and carries the WebSocket on its
//! stream; the backend leg stays HTTP/1.1. Several WebSockets share one
//! connection.

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::feed::Feed;
use support::*;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(10);

type H2Ws = Ws<TokioIo<hyper::upgrade::Upgraded>>;

async fn h2<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: S,
) -> SendRequest<Empty<Bytes>> {
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    send
}

/// Opens a WebSocket on a new stream: the response, and the socket if it is `200`.
async fn open(
    send: &mut SendRequest<Empty<Bytes>>,
    uri: &str,
    headers: &[(&str, &str)],
) -> (http::Response<hyper::body::Incoming>, Option<H2Ws>) {
    let t0 = std::time::Instant::now();
    let resp = loop {
        let mut req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(uri)
            .header("sec-websocket-version", "13");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut req = req.body(Empty::new()).expect("request");
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        send.ready().await.expect("connection ready");
        match send.send_request(req).await {
            Ok(r) => break r,
            // The server's SETTINGS (extended CONNECT enabled) may not have arrived yet.
            Err(e) if t0.elapsed() < T => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("CONNECT: {e}"),
        }
    };
    if resp.status() != 200 {
        return (resp, None);
    }
    let (parts, body) = resp.into_parts();
    let mut resp = http::Response::from_parts(parts, body);
    let up = hyper::upgrade::on(&mut resp)
        .await
        .expect("upgraded stream");
    let ws =
        tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Client, None)
            .await;
    (resp, Some(ws))
}

fn yaml(backend: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "admin: {{ addr: '127.0.0.1:0' }}\nlisten:\n  - addr: 127.0.0.1:0\n  - addr: 127.0.0.1:0\n    tls:\n      certs:\n        - {{ cert: site.pem, key: site-key.pem }}\npools:\n  p: {{ backends: [ws://{backend}] }}\n{extra}routes:\n  - {{ name: r, path: /chat, pool: p }}\n"
    )
}

#[tokio::test]
async fn websockets_over_http2_share_one_tls_connection_and_work_over_h2c() {
    let be = echo_backends(&["a"]).await;
    let dir = TempDir::new("h2ws");
    let (_, _, ca) = cert_files(&dir.0, "site", &["site.test"]);
    let gw = gateway_in(&dir.0, &yaml(be.addrs[0], "")).await;
    let tls = tls_connect(gw.addrs[1], "site.test", &[ca], &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut send = h2(tls).await;
    let mut socks = Vec::new();
    for i in 0..3 {
        let (resp, ws) = open(&mut send, "https://site.test/chat", &[]).await;
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("sec-websocket-accept").is_none());
        socks.push((i, ws.expect("websocket")));
    }
    // Interleaved on the one connection, each stream its own session.
    for round in 0..3 {
        for (i, ws) in &mut socks {
            let text = format!("stream {i} round {round}");
            assert_eq!(roundtrip(ws, &text).await, text);
        }
    }
    let who = whoami(&mut socks[0].1).await;
    for want in [
        "upgrade: websocket",
        "sec-websocket-key: ",
        "x-forwarded-proto: https",
        "host: site.test",
    ] {
        assert!(who.contains(want), "`{want}` not in {who}");
    }
    let m = admin_request(gw.admin.expect("admin"), "GET", "/metrics", None).await;
    for line in [
        format!(
            "upgate_connections_accepted_total{{listener=\"{}\"}} 1",
            gw.addrs[1]
        ),
        "upgate_upgrades_total{route=\"r\",outcome=\"ok\"} 3".to_string(),
        "upgate_upgrades_http2_total{route=\"r\"} 3".to_string(),
    ] {
        assert!(m.body.contains(&line), "no `{line}` in\n{}", m.body);
    }

    // Plain HTTP/2 (prior knowledge) as well.
    let tcp = tokio::net::TcpStream::connect(gw.addrs[0]).await.unwrap();
    let mut send = h2(tcp).await;
    let (resp, ws) = open(&mut send, "http://site.test/chat", &[]).await;
    assert_eq!(resp.status(), 200);
    let mut ws = ws.expect("websocket");
    assert_eq!(roundtrip(&mut ws, "h2c").await, "h2c");
}

#[tokio::test]
async fn subprotocols_and_close_codes_pass_over_http2() {
    let be = echo_backends(&["a"]).await;
    let dir = TempDir::new("h2ws-sub");
    let _ = cert_files(&dir.0, "site", &["site.test"]);
    let gw = gateway_in(&dir.0, &yaml(be.addrs[0], "")).await;
    let tcp = tokio::net::TcpStream::connect(gw.addrs[0]).await.unwrap();
    let mut send = h2(tcp).await;
    let (resp, ws) = open(
        &mut send,
        "http://site.test/chat",
        &[("sec-websocket-protocol", "chat.v2, chat.v1")],
    )
    .await;
    assert_eq!(resp.headers()["sec-websocket-protocol"], "chat.v2");
    let mut ws = ws.expect("websocket");
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::from(4001),
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    assert_eq!(close_code(&mut ws, T).await, Some(4001));
}

#[tokio::test]
async fn refusals_over_http2_are_http_answers() {
    let be = echo_backends(&["a"]).await;
    // A backend that answers the upgrade with a plain 200.
    let plain = static_http("text/plain", "ok".into()).await;
    let dir = TempDir::new("h2ws-bad");
    let _ = cert_files(&dir.0, "site", &["site.test"]);
    let extra = format!("  plain: {{ backends: [ws://{plain}] }}\n");
    let mut y = yaml(be.addrs[0], &extra);
    y.push_str("  - { name: plain, path: /plain, pool: plain }\n");
    let gw = gateway_in(&dir.0, &y).await;
    let tcp = tokio::net::TcpStream::connect(gw.addrs[0]).await.unwrap();
    let mut send = h2(tcp).await;
    let (resp, ws) = open(&mut send, "http://site.test/nowhere", &[]).await;
    assert_eq!((resp.status().as_u16(), ws.is_none()), (404, true));
    let (resp, _) = open(&mut send, "http://site.test/plain", &[]).await;
    assert_eq!(
        resp.status(),
        502,
        "a backend that did not switch must not look like success"
    );
    // The connection still serves WebSockets after the refusals.
    let (resp, ws) = open(&mut send, "http://site.test/chat", &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        roundtrip(&mut ws.expect("websocket"), "after").await,
        "after"
    );
}

#[tokio::test]
async fn an_http2_websocket_is_authenticated_like_any_other() {
    let be = echo_backends(&["a"]).await;
    let feed = Feed::start().await;
    let dir = TempDir::new("h2ws-auth");
    let _ = cert_files(&dir.0, "site", &["site.test"]);
    let key = support::jwt::SigningKey::generate(jsonwebtoken::Algorithm::ES256);
    key.write_public(&dir.0, "ec.pem");
    let auth =
        "    auth: { jwt: { keys: [{ file: ec.pem }], forward_claims: { sub: X-User-Id } } }\n";
    let mut y = yaml(
        be.addrs[0],
        &format!("  f: {{ backends: ['{}'] }}\n", feed.url()),
    );
    y = y.replace(
        "  - { name: r, path: /chat, pool: p }\n",
        &format!("  - name: r\n    path: /chat\n    pool: p\n{auth}  - name: feed\n    path: /feed\n    pool: f\n    mode: fanout\n{auth}"),
    );
    let gw = gateway_in(&dir.0, &y).await;
    let tcp = tokio::net::TcpStream::connect(gw.addrs[0]).await.unwrap();
    let mut send = h2(tcp).await;
    for path in ["/chat", "/feed"] {
        let (resp, ws) = open(&mut send, &format!("http://site.test{path}"), &[]).await;
        assert_eq!(
            (resp.status().as_u16(), ws.is_none()),
            (401, true),
            "{path}"
        );
        assert!(resp.headers().contains_key("www-authenticate"));
    }
    let token = key.sign(None, &support::jwt::claims("frank", "i", "a"));
    let auth = format!("Bearer {token}");
    let (resp, ws) = open(
        &mut send,
        "http://site.test/chat",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let who = whoami(&mut ws.expect("websocket")).await;
    assert!(who.contains("x-user-id: frank\n"), "{who}");
    let (resp, ws) = open(
        &mut send,
        "http://site.test/feed",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(resp.status(), 200);
    feed.wait_open(1, T).await;
    feed.publish(Message::text("tick"));
    let mut ws = ws.expect("fan-out websocket");
    loop {
        match tokio::time::timeout(T, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                assert_eq!(t.as_str(), "tick");
                break;
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("no message: {other:?}"),
        }
    }
}

#[tokio::test]
async fn fan_out_clients_over_http2() {
    let feed = Feed::start().await;
    let dir = TempDir::new("h2ws-fanout");
    let _ = cert_files(&dir.0, "site", &["site.test"]);
    let gw = gateway_in(
        &dir.0,
        &format!(
            "listen:\n  - addr: 127.0.0.1:0\npools:\n  feed: {{ backends: ['{}'] }}\nroutes:\n  - {{ name: f, path: /feed, pool: feed, mode: fanout }}\n",
            feed.url()
        ),
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let mut send = h2(tcp).await;
    let (resp, a) = open(&mut send, "http://site.test/feed", &[]).await;
    assert_eq!(resp.status(), 200);
    let (_, b) = open(&mut send, "http://site.test/feed", &[]).await;
    let (mut a, mut b) = (a.expect("a"), b.expect("b"));
    feed.wait_open(1, T).await;
    feed.publish(Message::text("tick"));
    for ws in [&mut a, &mut b] {
        let m = tokio::time::timeout(T, ws.next()).await.expect("in time");
        assert_eq!(m.expect("message").expect("ok"), Message::text("tick"));
    }
}

/// Headless Chromium loads a page over HTTPS (HTTP/2) through the gateway and
/// opens a WebSocket to the same origin: Chromium sends it as an HTTP/2
/// extended CONNECT, and the echo comes back.
#[tokio::test]
#[cfg_attr(no_browser, ignore = "needs chromium (apt-get install chromium)")]
async fn a_browser_opens_its_websocket_on_the_pages_http2_connection() {
    let be = echo_backends(&["a"]).await;
    let page = "<body><script>\
        const ws = new WebSocket('wss://' + location.host + '/chat');\
        const keep = setInterval(() => fetch('/busy').catch(() => {}), 50);\
        ws.onopen = () => ws.send('hello over h2');\
        ws.onmessage = e => { document.body.dataset.got = e.data; ws.close(); clearInterval(keep); };\
        ws.onclose = e => { document.body.dataset.closed = e.code; };\
        </script></body>";
    let web = static_http("text/html", page.into()).await;
    let dir = TempDir::new("h2ws-browser");
    let _ = cert_files(&dir.0, "site", &["localhost"]);
    let extra = format!("  web: {{ backends: [http://{web}] }}\n");
    let mut y = yaml(be.addrs[0], &extra);
    y.push_str("  - { name: page, path: /, pool: web }\n");
    let gw = gateway_in(&dir.0, &y).await;
    let url = format!("https://localhost:{}/", gw.addrs[1].port());
    let dom = browser_dom(&url).await;
    assert!(dom.contains(r#"data-got="hello over h2""#), "{dom}");
    let m = admin_request(gw.admin.expect("admin"), "GET", "/metrics", None).await;
    let line = "upgate_upgrades_http2_total{route=\"r\"} 1";
    assert!(
        m.body.contains(line),
        "the browser's WebSocket came over HTTP/2: no `{line}` in\n{}",
        m.body
    );
}
