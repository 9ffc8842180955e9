//! The real `upgate` binary as a child process, with its log lines.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

/// A running `upgate` and its log lines.
pub struct Upgate {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    /// Every line so far, also those already taken from `lines`.
    all: Arc<Mutex<Vec<String>>>,
}

impl Upgate {
    /// `upgate --config CONFIG`, logging at info.
    pub fn start(config: &std::path::Path) -> Upgate {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_upgate"));
        cmd.arg("--config").arg(config);
        Upgate::spawn(cmd)
    }

    /// The same with extra arguments.
    pub fn start_with_args(config: &std::path::Path, args: &[&str]) -> Upgate {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_upgate"));
        cmd.arg("--config").arg(config).args(args);
        Upgate::spawn(cmd)
    }

    /// The same with extra environment variables.
    pub fn start_with_env(config: &std::path::Path, env: &[(&str, &str)]) -> Upgate {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_upgate"));
        cmd.arg("--config").arg(config);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Upgate::spawn(cmd)
    }

    /// The same with at most `nofile` open file descriptors (`ulimit -n`).
    pub fn start_with_nofile(config: &std::path::Path, nofile: u32) -> Upgate {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "ulimit -n {nofile} && exec '{}' --config '{}'",
            env!("CARGO_BIN_EXE_upgate"),
            config.display()
        ));
        Upgate::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Upgate {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start upgate");
        let (tx, lines) = mpsc::unbounded_channel();
        let all = Arc::new(Mutex::new(Vec::new()));
        let all2 = all.clone();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                all2.lock().expect("log").push(line.clone());
                let _ = tx.send(line);
            }
        });
        Upgate { child, lines, all }
    }

    /// The process id (for reading its memory from `/proc`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every log line so far, joined.
    pub fn log(&self) -> String {
        self.all.lock().expect("log").join("\n")
    }

    /// Waits for the startup line and returns the first plain listener's address.
    pub async fn listening_addr(&mut self) -> std::net::SocketAddr {
        let line = self.wait_for("listening on http://").await;
        line.split("listening on http://")
            .nth(1)
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("no address in {line}"))
    }

    /// Waits for a log line containing `what`; returns it.
    pub async fn wait_for(&mut self, what: &str) -> String {
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

    /// Waits (on new lines, up to 10 s) until the whole log so far contains every one of `all`.
    pub async fn wait_all(&mut self, all: &[&str]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !all.iter().all(|w| self.log().contains(w)) {
            let _ = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("not all of {all:?} in the log:\n{}", self.log()));
        }
    }

    /// Waits until `n` more log lines contain `what`.
    pub async fn wait_count(&mut self, what: &str, n: usize) {
        for _ in 0..n {
            self.wait_for(what).await;
        }
    }

    /// Log lines so far containing `what`.
    pub fn count(&mut self, what: &str) -> usize {
        let mut n = 0;
        while let Ok(l) = self.lines.try_recv() {
            n += usize::from(l.contains(what));
        }
        n
    }

    pub fn term(&self) {
        self.signal("-TERM");
    }

    /// Sends a signal (`-HUP`, `-TERM`) to this process, by its PID.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(sig)
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    pub async fn exit(mut self) -> std::process::ExitStatus {
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
