//! Zero-downtime restart with the real binary: a new upgate starts on the
//! same port (SO_REUSEPORT) while the old one drains. New connections land
//! on the new process; the old process's sessions finish undisturbed.

mod support;

use std::time::Duration;

use support::process::Upgate;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_takes_the_port_while_the_old_one_drains() {
    let be = support::echo_backends(&["a"]).await;
    let dir = support::TempDir::new("restart");
    let file = dir.0.join("routes.yaml");
    let reserved = support::reserve_port();
    let port = reserved.port;
    std::fs::write(
        &file,
        format!(
            "server: {{ shutdown_grace: 20s, watch_interval: 0s }}\nlisten:\n  - addr: 127.0.0.1:{port}\npools:\n  p: {{ backends: [ws://{}] }}\nroutes:\n  - {{ name: chat, path: /chat, pool: p }}\n",
            be.addrs[0]
        ),
    )
    .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let mut old = Upgate::start(&file);
    old.wait_for("listening on").await;
    let mut session = support::ws(addr, "h", "/chat").await;
    assert_eq!(support::roundtrip(&mut session, "before").await, "before");

    // The new process binds the same port while the old one still listens.
    let mut new = Upgate::start(&file);
    new.wait_for("listening on").await;
    old.term();
    old.wait_for("listeners closed").await;

    // Every new connection now lands on the new process...
    for i in 0..20 {
        let mut ws = support::ws(addr, "h", "/chat").await;
        assert_eq!(
            support::roundtrip(&mut ws, &format!("new {i}")).await,
            format!("new {i}")
        );
    }
    // ...while the old process's session goes on undisturbed.
    for i in 0..5 {
        assert_eq!(
            support::roundtrip(&mut session, &format!("old {i}")).await,
            format!("old {i}")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(session);
    let stopped = old.wait_for("stopped").await;
    assert!(stopped.contains("finished_in_grace=true"), "{stopped}");
    let status = old.exit().await;
    assert!(status.success(), "old process: {status}");

    // The 20 sessions were logged by the new process (and no more).
    new.wait_count("upgate::access", 20).await;
    assert_eq!(new.count("upgate::access"), 0);
    new.term();
    assert!(new.exit().await.success());
}

#[tokio::test]
async fn sighup_reloads_the_config_file_and_keeps_the_session() {
    let be = support::echo_backends(&["a", "b"]).await;
    let dir = support::TempDir::new("sighup");
    let file = dir.0.join("routes.yaml");
    let reserved = support::reserve_port();
    let port = reserved.port;
    let config = |extra: &str| {
        format!(
            "server: {{ shutdown_grace: 1s, watch_interval: 0s }}\nlisten:\n  - addr: 127.0.0.1:{port}\npools:\n  p: {{ backends: [ws://{}] }}\n  q: {{ backends: [ws://{}] }}\nroutes:\n  - {{ name: chat, path: /chat, pool: p }}\n{extra}",
            be.addrs[0], be.addrs[1]
        )
    };
    std::fs::write(&file, config("")).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut gw = Upgate::start(&file);
    gw.wait_for("listening on").await;
    let mut session = support::ws(addr, "h", "/chat").await;
    assert_eq!(support::get(addr, "h", "/news").await.status, 404);

    std::fs::write(&file, config("  - { name: news, path: /news, pool: q }\n")).unwrap();
    gw.signal("-HUP");
    let line = gw.wait_for("config reloaded").await;
    assert!(line.contains("route news added"), "{line}");
    let mut news = support::ws(addr, "h", "/news").await;
    assert_eq!(support::backend_of(&support::whoami(&mut news).await), "b");
    assert_eq!(support::roundtrip(&mut session, "same").await, "same");
    gw.term();
    drop(session);
    assert!(gw.exit().await.success());
}
