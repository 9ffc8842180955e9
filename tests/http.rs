//! Plain HTTP requests on a route are reverse-proxied to the route's pool.

mod support;

use support::*;

fn yaml(backend: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "{extra}listen:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://{backend}] }}\nroutes:\n  - {{ name: api, path: /api, pool: p, strip_prefix: true }}\n"
    )
}

fn peer_of(body: &str) -> &str {
    body.lines()
        .next()
        .and_then(|l| l.split("peer=").nth(1))
        .unwrap_or("?")
}

#[tokio::test]
async fn post_bodies_headers_and_request_ids() {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&yaml(be.addrs[0], "")).await;
    let tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let req = http::Request::post("/api/items?x=1")
        .header("host", "shop.example")
        .header("content-type", "application/json")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "must not be forwarded")
        .body(r#"{"n":1}"#.to_string())
        .unwrap();
    let r = http1(tcp, req).await;
    assert_eq!(r.status, 200);
    assert!(
        r.body.starts_with("backend=a method=POST path=/items?x=1 "),
        "{}",
        r.body
    );
    assert!(r.body.ends_with("\n\n{\"n\":1}"), "{}", r.body);
    assert!(
        r.body.contains("x-forwarded-host: shop.example"),
        "{}",
        r.body
    );
    assert!(
        !r.body.contains("x-hop"),
        "hop-by-hop header leaked: {}",
        r.body
    );
    // The request id generated at the edge reaches the backend and comes back.
    let id = r.headers["x-request-id"].to_str().unwrap();
    assert!(
        r.body.contains(&format!("x-request-id: {id}")),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn backend_connections_are_reused() {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&yaml(be.addrs[0], "")).await;
    let first = get(gw.addr(), "h", "/api/1").await;
    let second = get(gw.addr(), "h", "/api/2").await;
    assert_eq!((first.status, second.status), (200, 200));
    assert_eq!(
        peer_of(&first.body),
        peer_of(&second.body),
        "a new backend connection per request"
    );
}

#[tokio::test]
async fn h2c_prior_knowledge_is_proxied() {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&yaml(be.addrs[0], "")).await;
    let tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            http::Request::get("http://h2.example/api/z")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_slow_backend_gets_504() {
    // Accepts and reads, never answers.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let gw = gateway(&yaml(addr, "server: { request_timeout: 300ms }\n")).await;
    let r = get(gw.addr(), "h", "/api/slow").await;
    assert_eq!(r.status, 504);
}

#[tokio::test]
async fn a_slow_request_head_is_dropped() {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&yaml(be.addrs[0], "server: { handshake_timeout: 300ms }\n")).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    tcp.write_all(b"GET /api HTTP/1.1\r\nHost: h\r\n")
        .await
        .unwrap(); // never finished
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("the gateway must give up on the slow head");
    let text = String::from_utf8_lossy(&buf[..n.unwrap_or(0)]).to_string();
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&yaml(be.addrs[0], "")).await;
    let big = "x".repeat(64 * 1024);
    let req = format!("GET /api HTTP/1.1\r\nHost: h\r\nX-Big: {big}\r\n\r\n");
    let r = raw(gw.addr(), req.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{}", &r[..r.len().min(200)]);
}
