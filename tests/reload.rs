//! Hot reload: live sessions on unchanged routes survive, new routes are
//! served at once, removed ones drain, bad configs are refused, listeners
//! and certificates change without a restart.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::feed::raise_nofile;
use support::*;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(10);

/// The config: `main` on /ws over pool p1; with `extra`, route `extra{n}`
/// on /extra{n} over pool p2, and p1 gains a third backend.
fn yaml(b: &[std::net::SocketAddr], extra: Option<usize>) -> String {
    let mut y = format!(
        "server: {{ drain_timeout: 300ms, watch_interval: 0s, shutdown_grace: 1s }}\nadmin: {{ addr: '127.0.0.1:0' }}\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  p1:\n    backends: [ws://{}, ws://{}{}]\n  p2:\n    backends: [ws://{}]\nroutes:\n  - name: main\n    path: /ws\n    pool: p1\n",
        b[0],
        b[1],
        if extra.is_some() { format!(", ws://{}", b[2]) } else { String::new() },
        b[2]
    );
    if let Some(n) = extra {
        y.push_str(&format!(
            "  - name: extra{n}\n    path: /extra{n}\n    pool: p2\n"
        ));
    }
    y
}

async fn assert_metric(admin: std::net::SocketAddr, line: &str) {
    let m = admin_request(admin, "GET", "/metrics", None).await;
    assert!(m.body.contains(line), "no `{line}` in\n{}", m.body);
}

async fn reload(admin: std::net::SocketAddr) -> serde_json::Value {
    let r = admin_request(admin, "POST", "/reload", None).await;
    serde_json::from_str(&r.body).unwrap_or_else(|_| panic!("{} {}", r.status, r.body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_sessions_survive_twenty_reloads_and_new_routes_serve_at_once() {
    raise_nofile();
    let be = echo_backends(&["a", "b", "c"]).await;
    let dir = TempDir::new("reload");
    let file = dir.0.join("routes.yaml");
    std::fs::write(&file, yaml(&be.addrs, None)).unwrap();
    let gw = gateway_file(&file).await;
    let (addr, admin) = (gw.addr(), gw.admin.expect("admin"));

    // 500 sessions, each doing numbered round trips until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let trips = Arc::new(AtomicU64::new(0));
    let mut sessions = Vec::new();
    for i in 0..500 {
        let mut ws = ws(addr, "x", "/ws").await;
        let (stop, trips) = (stop.clone(), trips.clone());
        sessions.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let msg = format!("{i}:{n}");
                ws.send(Message::text(msg.clone()))
                    .await
                    .map_err(|e| format!("session {i} send {n}: {e}"))?;
                loop {
                    match tokio::time::timeout(T, ws.next()).await {
                        Ok(Some(Ok(Message::Text(t)))) if t.as_str() == msg => break,
                        Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                        other => return Err(format!("session {i} trip {n}: {other:?}")),
                    }
                }
                n += 1;
                trips.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<u64, String>(n)
        }));
    }

    let mut drained = None;
    for k in 0..20 {
        let extra = (k % 2 == 0).then_some(k);
        std::fs::write(&file, yaml(&be.addrs, extra)).unwrap();
        let before = trips.load(Ordering::Relaxed);
        let v = reload(admin).await;
        assert_eq!(v["reloaded"], true, "reload {k}: {v}");
        match extra {
            Some(n) => {
                // The new route is served immediately.
                let mut e = ws(addr, "x", &format!("/extra{n}")).await;
                assert_eq!(roundtrip(&mut e, "new").await, "new");
                if n == 0 {
                    drained = Some(e);
                }
            }
            None => {
                let r = get(addr, "x", &format!("/extra{}", k - 1)).await;
                assert_eq!(r.status, 404, "removed route still served");
            }
        }
        // Sessions keep moving between reloads.
        let t0 = std::time::Instant::now();
        while trips.load(Ordering::Relaxed) < before + 500 && t0.elapsed() < T {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            trips.load(Ordering::Relaxed) >= before + 500,
            "sessions stalled after reload {k}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for s in sessions {
        total += s
            .await
            .expect("session task")
            .expect("no session lost a message or its connection");
    }
    assert_eq!(total, trips.load(Ordering::Relaxed));
    assert!(total >= 500 * 20, "{total} round trips");

    // The session on extra0 was on a route removed by the next reload: drained and closed.
    let mut e = drained.expect("extra0 session");
    assert!(ends_within(&mut e, Duration::from_secs(3)).await);

    assert_metric(admin, r#"upgate_config_reloads_total{outcome="ok"} 20"#).await;
}

#[tokio::test]
async fn a_removed_route_drains_for_drain_timeout_then_closes() {
    let be = echo_backends(&["a", "b", "c"]).await;
    let dir = TempDir::new("reload-drain");
    let file = dir.0.join("routes.yaml");
    std::fs::write(&file, yaml(&be.addrs, Some(7)).replace("300ms", "800ms")).unwrap();
    let gw = gateway_file(&file).await;
    let admin = gw.admin.expect("admin");
    let mut s = ws(gw.addr(), "x", "/extra7").await;
    std::fs::write(&file, yaml(&be.addrs, None).replace("300ms", "800ms")).unwrap();
    let removed = std::time::Instant::now();
    let v = reload(admin).await;
    assert_eq!(v["reloaded"], true, "{v}");
    assert!(
        v["summary"]
            .as_str()
            .unwrap()
            .contains("route extra7 removed"),
        "{v}"
    );
    // Still working during the drain period...
    assert_eq!(roundtrip(&mut s, "still").await, "still");
    // ...and closed after it.
    assert!(ends_within(&mut s, Duration::from_secs(5)).await);
    let took = removed.elapsed();
    assert!(took >= Duration::from_millis(700), "closed after {took:?}");
}

#[tokio::test]
async fn an_invalid_config_is_refused_and_the_running_one_stays() {
    let be = echo_backends(&["a", "b", "c"]).await;
    let dir = TempDir::new("reload-bad");
    let file = dir.0.join("routes.yaml");
    std::fs::write(&file, yaml(&be.addrs, None)).unwrap();
    let gw = gateway_file(&file).await;
    let admin = gw.admin.expect("admin");
    let mut s = ws(gw.addr(), "x", "/ws").await;
    std::fs::write(&file, yaml(&be.addrs, None).replace("pool: p1", "pool: p9")).unwrap();
    let r = admin_request(admin, "POST", "/reload", None).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body
            .contains("routes.yaml:13: routes[0].pool: no pool named `p9`"),
        "{}",
        r.body
    );
    assert_eq!(roundtrip(&mut s, "alive").await, "alive");
    let mut again = ws(gw.addr(), "x", "/ws").await;
    assert_eq!(roundtrip(&mut again, "served").await, "served");
    assert_metric(admin, r#"upgate_config_reloads_total{outcome="failed"} 1"#).await;
}

#[tokio::test]
async fn listeners_and_certificates_change_without_a_restart() {
    let be = echo_backends(&["a"]).await;
    let dir = TempDir::new("reload-tls");
    let (_, _, old_ca) = cert_files(&dir.0, "site", &["site.test"]);
    let file = dir.0.join("routes.yaml");
    let reserved = reserve_port();
    let tls_port = reserved.port;
    let base = format!(
        "server: {{ watch_interval: 100ms }}\nadmin: {{ addr: '127.0.0.1:0' }}\nlisten:\n  - addr: 127.0.0.1:0\nLISTENERS\npools:\n  p: {{ backends: [ws://{}] }}\nroutes:\n  - {{ name: r, path: /, pool: p }}\n",
        be.addrs[0]
    );
    std::fs::write(&file, base.replace("LISTENERS\n", "")).unwrap();
    let gw = gateway_file(&file).await;
    let admin = gw.admin.expect("admin");
    let tls_addr: std::net::SocketAddr = format!("127.0.0.1:{tls_port}").parse().unwrap();
    assert!(
        tokio::net::TcpStream::connect(tls_addr).await.is_err(),
        "not listening yet"
    );

    // A TLS listener appears with a reload.
    let with_tls = base.replace(
        "LISTENERS\n",
        &format!("  - addr: 127.0.0.1:{tls_port}\n    tls:\n      certs:\n        - {{ cert: site.pem, key: site-key.pem }}\n"),
    );
    std::fs::write(&file, &with_tls).unwrap();
    let v = reload(admin).await;
    assert_eq!(v["reloaded"], true, "{v}");
    let tls = tls_connect(
        tls_addr,
        "site.test",
        std::slice::from_ref(&old_ca),
        &[b"http/1.1"],
    )
    .await;
    let mut s = ws_over(tls, "site.test", "/", &[])
        .await
        .expect("wss over the new listener");
    assert_eq!(roundtrip(&mut s, "tls").await, "tls");

    // Renewed certificate files are picked up by the watcher, no signal needed;
    // the session on the old certificate continues.
    let (_, _, new_ca) = cert_files(&dir.0, "site", &["site.test"]);
    let t0 = std::time::Instant::now();
    loop {
        let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
        let cfg = client_config(std::slice::from_ref(&new_ca), &[]);
        if tls_over(tcp, "site.test", cfg).await.is_ok() {
            break;
        }
        assert!(t0.elapsed() < T, "new certificate never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(roundtrip(&mut s, "still").await, "still");

    // Removing the listener stops it accepting.
    std::fs::write(&file, base.replace("LISTENERS\n", "")).unwrap();
    let v = reload(admin).await;
    assert_eq!(v["reloaded"], true, "{v}");
    let t0 = std::time::Instant::now();
    while tokio::net::TcpStream::connect(tls_addr).await.is_ok() {
        assert!(t0.elapsed() < T, "removed listener still accepts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A wss session over `cfg`: how its handshake went, after one echo (which
/// also reads the tickets the server sends after the handshake).
async fn tls_session(
    addr: std::net::SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
) -> rustls::HandshakeKind {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("site.test").unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let mut s = ws_over(tls, "site.test", "/", &[]).await.expect("wss");
    assert_eq!(roundtrip(&mut s, "hi").await, "hi");
    let kind = s
        .get_ref()
        .get_ref()
        .1
        .handshake_kind()
        .expect("handshake done");
    let _ = s.close(None).await;
    kind
}

#[tokio::test]
async fn tls_sessions_resume_across_a_reload() {
    let be = echo_backends(&["a"]).await;
    let dir = TempDir::new("reload-resume");
    let (_, _, ca) = cert_files(&dir.0, "site", &["site.test"]);
    let file = dir.0.join("routes.yaml");
    let y = |route: &str| {
        format!(
            "server: {{ watch_interval: 0s }}\nadmin: {{ addr: '127.0.0.1:0' }}\nlisten:\n  - addr: 127.0.0.1:0\n    tls:\n      certs:\n        - {{ cert: site.pem, key: site-key.pem }}\npools:\n  p: {{ backends: [ws://{}] }}\nroutes:\n  - {{ name: r, path: /, pool: p }}\n{route}",
            be.addrs[0]
        )
    };
    std::fs::write(&file, y("")).unwrap();
    let gw = gateway_file(&file).await;
    let admin = gw.admin.expect("admin");
    let addr = gw.addrs[0];
    for (version, label) in [
        (&rustls::version::TLS13, "TLS 1.3"),
        (&rustls::version::TLS12, "TLS 1.2"),
    ] {
        let mut store = rustls::RootCertStore::empty();
        store.add(ca.clone()).unwrap();
        let cfg = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth(),
        );
        use rustls::HandshakeKind::{Full, Resumed};
        assert_eq!(tls_session(addr, &cfg).await, Full, "{label}: first");
        assert_eq!(tls_session(addr, &cfg).await, Resumed, "{label}: second");
        // A reload rebuilds the listener's TLS config (as a certificate
        // renewal would); the client still resumes.
        std::fs::write(&file, y("  - { name: x, path: /x, pool: p }\n")).unwrap();
        let v = reload(admin).await;
        assert_eq!(v["reloaded"], true, "{v}");
        assert_eq!(
            tls_session(addr, &cfg).await,
            Resumed,
            "{label}: after the reload"
        );
        std::fs::write(&file, y("")).unwrap();
        let v = reload(admin).await;
        assert_eq!(v["reloaded"], true, "{v}");
    }
}

#[tokio::test]
async fn fan_out_channels_and_their_clients_survive_a_reload() {
    let feed = support::feed::Feed::start().await;
    let be = echo_backends(&["a"]).await;
    let dir = TempDir::new("reload-fanout");
    let file = dir.0.join("routes.yaml");
    let config = |extra: &str| {
        format!(
            "server: {{ watch_interval: 0s, drain_timeout: 200ms }}\nadmin: {{ addr: '127.0.0.1:0' }}\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  feed: {{ backends: ['{}'] }}\n  echo: {{ backends: [ws://{}] }}\nroutes:\n  - {{ name: ticker, path: /ticker, pool: feed, mode: fanout, strip_prefix: true }}\n{extra}",
            feed.url(),
            be.addrs[0]
        )
    };
    std::fs::write(&file, config("")).unwrap();
    let gw = gateway_file(&file).await;
    let admin = gw.admin.expect("admin");
    let mut c = ws(gw.addr(), "x", "/ticker?pair=EURUSD").await;
    feed.wait_open(1, T).await;

    std::fs::write(
        &file,
        config("  - { name: chat, path: /chat, pool: echo }\n"),
    )
    .unwrap();
    let v = reload(admin).await;
    assert_eq!(v["reloaded"], true, "{v}");
    feed.publish(Message::text("after reload"));
    let got = tokio::time::timeout(T, async {
        loop {
            match c.next().await {
                Some(Ok(Message::Text(t))) => return t.to_string(),
                Some(Ok(_)) => continue,
                other => panic!("{other:?}"),
            }
        }
    })
    .await
    .expect("in time");
    assert_eq!(got, "after reload");
    // Same channel, same upstream connection; a new client joins it.
    let _late = ws(gw.addr(), "x", "/ticker?pair=EURUSD").await;
    assert_eq!((feed.accepted(), feed.open()), (1, 1));

    // Changing the fan-out route's settings replaces its hub: the old clients drain.
    std::fs::write(
        &file,
        config("").replace("strip_prefix: true }", "strip_prefix: true, max_lag: 64 }"),
    )
    .unwrap();
    let v = reload(admin).await;
    assert_eq!(v["reloaded"], true, "{v}");
    let code = close_code(&mut c, T).await;
    assert_eq!(code, Some(1001));
}
