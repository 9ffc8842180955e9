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
        stderr.contains("bad.yaml:3:") && stderr.contains("unknown field `tsl`"),
        "{stderr}"
    );
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
    use std::io::BufRead;
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
    let mut child = upgate()
        .args(["--config"])
        .arg(&file)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Killed if an assertion fails before the clean exit below.
    struct KillOnPanic(u32);
    impl Drop for KillOnPanic {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(self.0.to_string())
                    .status();
            }
        }
    }
    let _guard = KillOnPanic(child.id());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut next_line = async || {
        tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .ok()
            .flatten()
    };
    // The bound address is in the startup log.
    let addr: std::net::SocketAddr = loop {
        let line = next_line().await.expect("startup log");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.trim().parse().unwrap();
        }
    };
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
    let line = loop {
        let line = next_line().await.expect("access log line");
        if line.contains("upgate::access") {
            break line;
        }
    };
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
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "exit status {exit}");
}
