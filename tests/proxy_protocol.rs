//! Listeners behind an L4 load balancer: `proxy_protocol: true` takes the
//! client's address from the PROXY header (v1 or v2) for forwarded headers,
//! `hash_key: ip` and logs; a connection without one is closed.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

fn v1(src: &str, sport: u16) -> Vec<u8> {
    let fam = if src.contains(':') { "TCP6" } else { "TCP4" };
    let dst = if src.contains(':') {
        "::1"
    } else {
        "127.0.0.1"
    };
    format!("PROXY {fam} {src} {dst} {sport} 443\r\n").into_bytes()
}

/// A v2 header: `PROXY` with `src` (with a TLV after the addresses), or
/// `LOCAL` when `src` is None.
fn v2(src: Option<SocketAddr>) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    let block = match src {
        None => {
            h.extend_from_slice(&[0x20, 0x00]);
            Vec::new()
        }
        Some(SocketAddr::V4(a)) => {
            h.extend_from_slice(&[0x21, 0x11]);
            let mut b = a.ip().octets().to_vec();
            b.extend_from_slice(&[127, 0, 0, 1]);
            b.extend_from_slice(&a.port().to_be_bytes());
            b.extend_from_slice(&443u16.to_be_bytes());
            b
        }
        Some(SocketAddr::V6(a)) => {
            h.extend_from_slice(&[0x21, 0x21]);
            let mut b = a.ip().octets().to_vec();
            b.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
            b.extend_from_slice(&a.port().to_be_bytes());
            b.extend_from_slice(&443u16.to_be_bytes());
            // PP2_TYPE_AUTHORITY, as balancers send it.
            b.extend_from_slice(&[0x02, 0x00, 0x09]);
            b.extend_from_slice(b"site.test");
            b
        }
    };
    h.extend_from_slice(&(block.len() as u16).to_be_bytes());
    h.extend_from_slice(&block);
    h
}

/// Connects and writes `header` first.
async fn behind_balancer(addr: SocketAddr, header: &[u8]) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(header).await.expect("header");
    tcp
}

/// The X-Forwarded-For the backend saw, over a WebSocket on `io`.
async fn forwarded_for<S>(io: S) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut ws = ws_over(io, "site.test", "/", &[]).await.expect("handshake");
    let who = whoami(&mut ws).await;
    who.lines()
        .find_map(|l| l.strip_prefix("x-forwarded-for: "))
        .unwrap_or_else(|| panic!("no x-forwarded-for in {who}"))
        .to_string()
}

#[tokio::test]
async fn the_client_address_comes_from_v1_and_v2_headers_over_plain_and_tls() {
    let be = echo_backends(&["a"]).await;
    let dir = TempDir::new("proxy-protocol");
    let (_, _, ca) = cert_files(&dir.0, "site", &["site.test"]);
    let gw = gateway_in(
        &dir.0,
        &format!(
            "listen:\n  - {{ addr: 127.0.0.1:0, proxy_protocol: true }}\n  - addr: 127.0.0.1:0\n    proxy_protocol: true\n    tls:\n      certs:\n        - {{ cert: site.pem, key: site-key.pem }}\npools:\n  p: {{ backends: [ws://{}] }}\nroutes:\n  - {{ name: r, path: /, pool: p }}\n",
            be.addrs[0]
        ),
    )
    .await;
    let (plain, tls) = (gw.addrs[0], gw.addrs[1]);

    let tcp = behind_balancer(plain, &v1("203.0.113.9", 40000)).await;
    assert_eq!(forwarded_for(tcp).await, "203.0.113.9");
    let tcp = behind_balancer(plain, &v1("2001:db8::7", 40000)).await;
    assert_eq!(forwarded_for(tcp).await, "2001:db8::7");
    let tcp = behind_balancer(plain, &v2(Some("198.51.100.4:5555".parse().unwrap()))).await;
    assert_eq!(forwarded_for(tcp).await, "198.51.100.4");
    // LOCAL (the balancer's own health check): the socket's address.
    let tcp = behind_balancer(plain, &v2(None)).await;
    assert_eq!(forwarded_for(tcp).await, "127.0.0.1");

    // The header arriving in pieces, with the request right behind its last one.
    let header = v2(Some("[2001:db8::5]:7".parse().unwrap()));
    let mut tcp = behind_balancer(plain, &header[..5]).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    tcp.write_all(&header[5..20]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    tcp.write_all(&header[20..]).await.unwrap();
    assert_eq!(forwarded_for(tcp).await, "2001:db8::5");

    // Before TLS: the handshake follows the header on the same connection.
    let tcp = behind_balancer(tls, &v2(Some("[2001:db8::9]:4000".parse().unwrap()))).await;
    let s = tls_over(tcp, "site.test", client_config(&[ca], &[]))
        .await
        .expect("TLS after the PROXY header");
    assert_eq!(forwarded_for(s).await, "2001:db8::9");
}

#[tokio::test]
async fn hashing_on_ip_uses_the_address_from_the_header() {
    let be = echo_backends(&["a", "b"]).await;
    let gw = gateway(&format!(
        "listen:\n  - {{ addr: 127.0.0.1:0, proxy_protocol: true }}\npools:\n  p: {{ backends: [ws://{}, ws://{}], balance: hash, hash_key: ip }}\nroutes:\n  - {{ name: r, path: /, pool: p }}\n",
        be.addrs[0], be.addrs[1]
    ))
    .await;
    let mut seen = HashSet::new();
    for i in 0..24u8 {
        let client = format!("198.51.100.{i}");
        let mut first = None;
        // The same client, from different source ports, sticks to one backend.
        for port in [1000, 2000, 3000] {
            let tcp = behind_balancer(gw.addr(), &v1(&client, port)).await;
            let mut ws = ws_over(tcp, "site.test", "/", &[]).await.unwrap();
            let b = backend_of(&whoami(&mut ws).await).to_string();
            assert_eq!(first.get_or_insert(b.clone()), &b, "{client} moved");
        }
        seen.extend(first);
    }
    // Were the balancer's own address hashed, every client would land on one backend.
    assert_eq!(seen.len(), 2, "24 clients all on {seen:?}");
}

#[tokio::test]
async fn a_connection_without_a_valid_header_is_closed_and_counted() {
    let be = echo_backends(&["a"]).await;
    let dir = TempDir::new("proxy-protocol-missing");
    let file = dir.0.join("routes.yaml");
    let y = |pp: bool| {
        format!(
            "server: {{ handshake_timeout: 300ms, watch_interval: 0s }}\nadmin: {{ addr: '127.0.0.1:0' }}\nlisten:\n  - {{ addr: 127.0.0.1:0, proxy_protocol: {pp} }}\npools:\n  p: {{ backends: [ws://{}] }}\nroutes:\n  - {{ name: r, path: /, pool: p }}\n",
            be.addrs[0]
        )
    };
    std::fs::write(&file, y(false)).unwrap();
    let gw = gateway_file(&file).await;
    let (addr, admin) = (gw.addr(), gw.admin.expect("admin"));
    // Without the setting, plain clients are served.
    let mut plain = ws(addr, "site.test", "/").await;
    assert_eq!(roundtrip(&mut plain, "x").await, "x");

    // A reload turns it on for the running listener.
    std::fs::write(&file, y(true)).unwrap();
    let r = admin_request(admin, "POST", "/reload", None).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // A request with no header, a malformed header, and one that never
    // completes: each connection is closed without a byte of answer.
    let not_a_header: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nhost: site.test\r\n\r\n",
        b"PROXY TCP4 300.1.1.1 127.0.0.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.1",
    ];
    for bytes in not_a_header {
        let mut tcp = behind_balancer(addr, bytes).await;
        let mut got = Vec::new();
        let r = tokio::time::timeout(T, tcp.read_to_end(&mut got)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "{:?}: {r:?} {:?}",
            String::from_utf8_lossy(bytes),
            String::from_utf8_lossy(&got)
        );
    }
    let m = admin_request(admin, "GET", "/metrics", None).await;
    let line = format!("upgate_proxy_protocol_errors_total{{listener=\"{addr}\"}} 3");
    assert!(m.body.contains(&line), "no `{line}` in\n{}", m.body);

    // Others are served, and the session opened before the reload goes on.
    let tcp = behind_balancer(addr, &v1("192.0.2.1", 9)).await;
    assert_eq!(forwarded_for(tcp).await, "192.0.2.1");
    assert_eq!(roundtrip(&mut plain, "still").await, "still");
}
