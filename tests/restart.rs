//! Zero-downtime restart with the real binary: a new upgate starts on the
//! same port (SO_REUSEPORT) while the old one drains. New connections land
//! on the new process; the old process's sessions finish undisturbed.

mod support;

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::sync::mpsc;

/// A running `upgate` and its log lines.
struct Upgate {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Upgate {
    fn start(config: &std::path::Path) -> Upgate {
        let mut child = Command::new(env!("CARGO_BIN_EXE_upgate"))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start upgate");
        let (tx, lines) = mpsc::unbounded_channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        Upgate { child, lines }
    }

    /// Waits for a log line containing `what`; returns it.
    async fn wait_for(&mut self, what: &str) -> String {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(10), self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no `{what}` in the log"))
                .unwrap_or_else(|| panic!("exited before `{what}`"));
            if line.contains(what) {
                return line;
            }
        }
    }

    /// Log lines so far containing `what`.
    fn count(&mut self, what: &str) -> usize {
        let mut n = 0;
        while let Ok(l) = self.lines.try_recv() {
            n += usize::from(l.contains(what));
        }
        n
    }

    fn term(&self) {
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    async fn exit(mut self) -> std::process::ExitStatus {
        tokio::task::spawn_blocking(move || self.child.wait())
            .await
            .expect("join")
            .expect("wait")
    }
}

impl Drop for Upgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_takes_the_port_while_the_old_one_drains() {
    let be = support::echo_backends(&["a"]).await;
    let dir = support::TempDir::new("restart");
    let file = dir.0.join("routes.yaml");
    let port = support::free_port();
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

    // The 20 sessions were logged by the new process.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(new.count("upgate::access"), 20);
    new.term();
    assert!(new.exit().await.success());
}

#[tokio::test]
async fn sighup_reloads_the_config_file_and_keeps_the_session() {
    let be = support::echo_backends(&["a", "b"]).await;
    let dir = support::TempDir::new("sighup");
    let file = dir.0.join("routes.yaml");
    let port = support::free_port();
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
    let ok = Command::new("kill")
        .arg("-HUP")
        .arg(gw.child.id().to_string())
        .status()
        .unwrap();
    assert!(ok.success());
    let line = gw.wait_for("config reloaded").await;
    assert!(line.contains("route news added"), "{line}");
    let mut news = support::ws(addr, "h", "/news").await;
    assert_eq!(support::backend_of(&support::whoami(&mut news).await), "b");
    assert_eq!(support::roundtrip(&mut session, "same").await, "same");
    gw.term();
    drop(session);
    assert!(gw.exit().await.success());
}
