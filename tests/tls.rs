//! TLS at the edge (SNI picks among certificates made here with rcgen) and
//! towards `wss://` backends.

mod support;

use support::*;

fn served_cert(
    s: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> rustls_pki_types::CertificateDer<'static> {
    s.get_ref().1.peer_certificates().expect("peer certs")[0]
        .clone()
        .into_owned()
}

#[tokio::test]
async fn sni_chooses_between_certificates_and_wss_works() {
    let dir = TempDir::new("sni");
    let (dc, dk, default_der) = cert_files(&dir.0, "default", &["default.test"]);
    let (cc, ck, chat_der) = cert_files(&dir.0, "chat", &["chat.test"]);
    let (fc, fk, feed_der) = cert_files(&dir.0, "feed", &["*.feed.test"]);
    let be = echo_backends(&["chat", "feed"]).await;
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\n    tls:\n      certs:\n        - {{ cert: {}, key: {} }}\n        - {{ cert: {}, key: {} }}\n        - {{ cert: {}, key: {} }}\npools:\n  chat: {{ backends: [ws://{}] }}\n  feed: {{ backends: [ws://{}] }}\nroutes:\n  - {{ name: chat, host: chat.test, pool: chat }}\n  - {{ name: feed, host: '*.feed.test', pool: feed }}\n",
        dc.display(), dk.display(), cc.display(), ck.display(), fc.display(), fk.display(), be.addrs[0], be.addrs[1]
    );
    let gw = gateway_in(&dir.0, &yaml).await;
    let all = [default_der.clone(), chat_der.clone(), feed_der.clone()];

    let s = tls_connect(gw.addr(), "chat.test", &all, &[b"http/1.1"]).await;
    assert_eq!(served_cert(&s), chat_der);
    let mut ws = ws_over(s, "chat.test", "/room", &[]).await.unwrap();
    let who = whoami(&mut ws).await;
    assert_eq!(backend_of(&who), "chat");
    assert!(who.contains("x-forwarded-proto: https"), "{who}");

    let s = tls_connect(gw.addr(), "eu.feed.test", &all, &[b"http/1.1"]).await;
    assert_eq!(served_cert(&s), feed_der);
    let mut ws = ws_over(s, "eu.feed.test", "/", &[]).await.unwrap();
    assert_eq!(backend_of(&whoami(&mut ws).await), "feed");

    // Unknown names get the first certificate.
    let s = tls_connect(gw.addr(), "default.test", &all, &[b"http/1.1"]).await;
    assert_eq!(served_cert(&s), default_der);
    let r = http1(
        s,
        http::Request::get("/x")
            .header("host", "default.test")
            .body(String::new())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn alpn_h2_serves_plain_http_over_tls() {
    let dir = TempDir::new("h2");
    let (c, k, der) = cert_files(&dir.0, "site", &["site.test"]);
    let be = echo_backends(&["a"]).await;
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\n    tls: {{ certs: [{{ cert: {}, key: {} }}] }}\npools:\n  p: {{ backends: [ws://{}] }}\nroutes:\n  - {{ name: r, path: /api, pool: p }}\n",
        c.display(), k.display(), be.addrs[0]
    );
    let gw = gateway_in(&dir.0, &yaml).await;
    let s = tls_connect(gw.addr(), "site.test", &[der], &[b"h2", b"http/1.1"]).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(s),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("https://site.test/api/v1?q=1")
        .body(empty())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.starts_with("backend=a method=GET path=/api/v1?q=1"),
        "{body}"
    );
    assert!(body.contains("host: site.test"), "{body}");
    assert!(body.contains("x-forwarded-proto: https"), "{body}");
}

#[tokio::test]
async fn wss_backend_with_a_configured_ca() {
    // The backend is itself an upgate TLS listener in front of an echo server.
    let dir = TempDir::new("wss");
    let (c, k, _) = cert_files(&dir.0, "backend", &["localhost"]);
    let be = echo_backends(&["behind-tls"]).await;
    let inner = format!(
        "listen:\n  - addr: 127.0.0.1:0\n    tls: {{ certs: [{{ cert: {}, key: {} }}] }}\npools:\n  p: {{ backends: [ws://{}] }}\nroutes:\n  - {{ name: r, pool: p }}\n",
        c.display(), k.display(), be.addrs[0]
    );
    let tls_backend = gateway_in(&dir.0, &inner).await;
    let outer = format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  p:\n    ca_file: {}\n    backends: [wss://localhost:{}]\nroutes:\n  - {{ name: r, pool: p, preserve_host: false }}\n",
        c.display(), tls_backend.addr().port()
    );
    let gw = gateway_in(&dir.0, &outer).await;
    let mut ws = ws(gw.addr(), "public.example", "/x").await;
    let who = whoami(&mut ws).await;
    assert_eq!(backend_of(&who), "behind-tls");
    // preserve_host: false sends the backend's own authority.
    assert!(
        who.contains(&format!("host: localhost:{}", tls_backend.addr().port())),
        "{who}"
    );
    assert_eq!(get(gw.addr(), "public.example", "/y").await.status, 200);
}

#[tokio::test]
async fn a_client_that_never_finishes_tls_is_dropped() {
    let dir = TempDir::new("slow");
    let (c, k, _) = cert_files(&dir.0, "s", &["s.test"]);
    let yaml = format!(
        "server: {{ handshake_timeout: 300ms }}\nlisten:\n  - addr: 127.0.0.1:0\n    tls: {{ certs: [{{ cert: {}, key: {} }}] }}\npools:\n  p: {{ backends: ['ws://127.0.0.1:9'] }}\nroutes:\n  - {{ name: r, pool: p }}\n",
        c.display(), k.display()
    );
    let gw = gateway_in(&dir.0, &yaml).await;
    use tokio::io::AsyncReadExt;
    let mut tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let mut buf = [0u8; 16];
    // Say nothing: the gateway closes the connection after the handshake timeout.
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
}

/// A socket that sends at most `step` bytes per write and lets the other
/// tasks run between writes, so the gateway reads records in pieces.
struct Trickle {
    tcp: tokio::net::TcpStream,
    step: usize,
    yielded: bool,
}

impl tokio::io::AsyncRead for Trickle {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Trickle {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if !self.yielded {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        self.yielded = false;
        let n = data.len().min(self.step);
        std::pin::Pin::new(&mut self.tcp).poll_write(cx, &data[..n])
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn records_that_arrive_in_pieces_are_served_whole() {
    // The edge reads TLS itself (rustls's unbuffered connection): a client
    // whose handshake and records arrive a few bytes at a time must be
    // served exactly like one that sends them whole.
    let dir = TempDir::new("trickle");
    let (c, k, der) = cert_files(&dir.0, "site", &["site.test"]);
    let be = echo_backends(&["a"]).await;
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\n    tls: {{ certs: [{{ cert: {}, key: {} }}] }}\npools:\n  p: {{ backends: [ws://{}] }}\nroutes:\n  - {{ name: r, pool: p }}\n",
        c.display(), k.display(), be.addrs[0]
    );
    let gw = gateway_in(&dir.0, &yaml).await;
    for step in [1, 7, 997] {
        let tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let io = Trickle {
            tcp,
            step,
            yielded: false,
        };
        let name = rustls_pki_types::ServerName::try_from("site.test").unwrap();
        let tls = tokio_rustls::TlsConnector::from(client_config(
            std::slice::from_ref(&der),
            &[b"http/1.1"],
        ))
        .connect(name, io)
        .await
        .expect("a handshake sent in pieces");
        let mut ws = ws_over(tls, "site.test", "/", &[]).await.unwrap();
        assert_eq!(roundtrip(&mut ws, "first").await, "first");
        // Several records (16 KiB each at most), each in many pieces.
        let big: String = (0..40_000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        assert!(
            roundtrip(&mut ws, &big).await == big,
            "step {step}: echoed whole"
        );
    }
}
