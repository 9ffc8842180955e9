//! The `upgate` binary: `check` and `--help`.

use std::process::Command;

mod support;

fn upgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_upgate"))
}

#[test]
fn check_prints_the_route_table_of_the_repository_config() {
    let out = upgate().args(["check", "routes.yaml"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("routes.yaml: OK"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("ticker")
            && l.contains("/ticker")
            && l.contains("strip_prefix")),
        "{stdout}"
    );
}

#[test]
fn check_shows_listener_and_route_settings() {
    let dir = support::TempDir::new("cli-settings");
    let file = dir.0.join("routes.yaml");
    std::fs::write(
        &file,
        "listen:\n  - { addr: 127.0.0.1:8080, proxy_protocol: true }\npools:\n  p: { backends: [ws://127.0.0.1:9001] }\nroutes:\n  - { name: chat, path: /chat, pool: p, origins: ['https://*.example.com'], max_sessions: 1000, max_sessions_per_ip: 20 }\n  - { name: feed, path: /feed, pool: p, mode: fanout, compression: true, max_channels: 7, channels: ['EUR*'] }\n",
    )
    .unwrap();
    let out = upgate().arg("check").arg(&file).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for want in [
        "listen  http://127.0.0.1:8080  (PROXY protocol)",
        "origins https://*.example.com, max_sessions 1000, max_sessions_per_ip 20",
        "fanout from p, compression, max_channels 7, channel_opens_per_ip 30/min, channels EUR*",
    ] {
        assert!(stdout.contains(want), "`{want}` not in\n{stdout}");
    }
}

#[test]
fn check_reports_a_config_error_with_file_line_and_key() {
    let dir = support::TempDir::new("cli");
    let file = dir.0.join("bad.yaml");
    std::fs::write(
        &file,
        "listen:\n  - addr: 127.0.0.1:8080\npools:\n  chat:\n    backends: [ws://127.0.0.1:9001]\nroutes:\n  - name: chat\n    path: /chat\n    pool: chta\n",
    )
    .unwrap();
    let out = upgate().arg("check").arg(&file).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "{}:9: routes[0].pool: no pool named `chta`; defined pools: chat",
        file.display()
    );
    assert!(stderr.contains(&want), "{stderr}");

    std::fs::write(
        &file,
        "listen:\n  - addr: 127.0.0.1:8080\n    tsl: {}\npools: {}\nroutes: []\n",
    )
    .unwrap();
    let out = upgate().arg("check").arg(&file).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.yaml:3:") && stderr.contains("unknown key `tsl`; did you mean `tls`?"),
        "{stderr}"
    );
}

/// Three mistakes in three places, one run: each on its own line in file order, then a count.
#[test]
fn check_reports_every_mistake_at_once() {
    let dir = support::TempDir::new("cli-many");
    let file = dir.0.join("bad.yaml");
    std::fs::write(
        &file,
        "listen:\n  - addr: 127.0.0.1:8080\npools:\n  chat:\n    backends: [ws://127.0.0.1:9001]\n    conect_timeout: 2s\nroutes:\n  - name: chat\n    pool: chta\n  - name: feed\n    pool: chat\n    mode: fanot\n",
    )
    .unwrap();
    let out = upgate().arg("check").arg(&file).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let f = file.display();
    let want = [
        format!(
            "{f}:6:5: pools.chat: unknown key `conect_timeout`; did you mean `connect_timeout`?"
        ),
        format!("{f}:9: routes[0].pool: no pool named `chta`; defined pools: chat"),
        format!("{f}:12:11: routes[1].mode: unknown value `fanot`; did you mean `fanout`?"),
        "3 errors".to_string(),
    ];
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), want.len(), "{stderr}");
    for (got, want) in lines.iter().zip(&want) {
        assert!(got.ends_with(want.as_str()), "{got}\nwanted …{want}");
    }
}

#[test]
fn help_explains_the_commands() {
    let out = upgate().arg("--help").output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    for w in ["check", "demo", "--config"] {
        assert!(s.contains(w), "{s}");
    }
}

#[tokio::test]
async fn the_binary_serves_logs_each_session_and_exits_cleanly_on_sigterm() {
    let be = support::echo_backends(&["a"]).await;
    let dir = support::TempDir::new("bin");
    let file = dir.0.join("routes.yaml");
    std::fs::write(
        &file,
        format!(
            "server: {{ shutdown_grace: 2s }}\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://{}] }}\nroutes:\n  - {{ name: chat, path: /chat, pool: p }}\n",
            be.addrs[0]
        ),
    )
    .unwrap();
    let mut gw = support::process::Upgate::start(&file);
    let addr = gw.listening_addr().await;
    let mut ws = support::ws(addr, "h", "/chat").await;
    assert_eq!(support::roundtrip(&mut ws, "hello").await, "hello");
    {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
        ws.send(tokio_tungstenite::tungstenite::Message::Close(Some(
            CloseFrame {
                code: CloseCode::Library(4001),
                reason: "done".into(),
            },
        )))
        .await
        .unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }
    drop(ws);
    // One access-log line for the session, with its route and how it ended.
    let line = gw.wait_for("upgate::access").await;
    for want in [
        "route=chat",
        "http=\"1.1\"",
        "path=\"/chat\"",
        "end=\"closed\"",
        "closed_by=\"client\"",
        "close_code=4001",
        "bytes_up=",
        "duration_ms=",
    ] {
        assert!(
            line.contains(want) || line.contains(&want.replace('"', "")),
            "missing {want} in {line}"
        );
    }
    gw.term();
    let exit = gw.exit().await;
    assert!(exit.success(), "exit status {exit}");
}
