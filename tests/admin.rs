//! The admin listener: probes, bearer token, pool state, readiness while draining.

mod support;

use std::time::Duration;

use support::*;

fn yaml(backend: std::net::SocketAddr) -> String {
    format!(
        "server: {{ shutdown_grace: 10s }}\nadmin: {{ addr: '127.0.0.1:0', token: s3cret }}\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://{backend}] }}\nroutes:\n  - {{ name: r, path: /ws, pool: p }}\n"
    )
}

async fn admin_get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> Reply {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = http::Request::get(path).header("host", "admin");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    http1(tcp, req.body(String::new()).unwrap()).await
}

#[tokio::test]
async fn probes_token_and_pool_state() {
    let be = echo_backends(&["a"]).await;
    let cfg =
        upgate::Config::parse(std::path::Path::new("routes.yaml"), &yaml(be.addrs[0])).unwrap();
    let gw = upgate::Gateway::bind(&cfg).await.unwrap();
    let (addr, admin) = (
        gw.local_addrs()[0],
        gw.admin_addr().expect("admin listener"),
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(gw.run(async {
        let _ = rx.await;
    }));

    assert_eq!(admin_get(admin, "/healthz", None).await.status, 200);
    assert_eq!(admin_get(admin, "/readyz", None).await.status, 200);
    let r = admin_get(admin, "/pools", None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    assert_eq!(admin_get(admin, "/pools", Some("wrong")).await.status, 401);

    let mut ws = ws(addr, "h", "/ws").await;
    assert_eq!(roundtrip(&mut ws, "hi").await, "hi");
    let r = admin_get(admin, "/pools", Some("s3cret")).await;
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let b = &v["pools"][0]["backends"][0];
    assert_eq!(v["pools"][0]["name"], "p");
    assert_eq!(b["live_sessions"], 1, "{}", r.body);
    assert_eq!(b["healthy"], true);
    let r = admin_get(admin, "/routes", Some("s3cret")).await;
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["routes"][0]["path"], "/ws");

    // Shutdown: the session keeps the drain going; /readyz says so meanwhile.
    let _ = tx.send(());
    let mut draining = false;
    for _ in 0..100 {
        if admin_get(admin, "/readyz", None).await.status == 503 {
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(draining, "/readyz never reported the drain");
    drop(ws);
    let drained = tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .unwrap()
        .unwrap();
    assert!(drained.finished_in_grace);
}
