//! The gateway out of file descriptors: a real `upgate` process started
//! with a small `ulimit -n`, filled up one descriptor at a time.

mod support;

use std::time::Duration;

use support::feed::raise_nofile;
use support::process::Upgate;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A keep-alive connection that got its answer (so the gateway holds one
/// descriptor for it); `None` if the gateway did not answer in time.
async fn held_connection(addr: std::net::SocketAddr) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /none HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .ok()?;
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf[..n].starts_with(b"HTTP/1.1 404").then_some(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_is_a_503_that_never_blames_the_backend() {
    raise_nofile();
    let be = echo_backends(&["a"]).await;
    let dir = TempDir::new("emfile");
    let file = dir.0.join("routes.yaml");
    // One failure would eject the only backend for a minute, were it blamed.
    std::fs::write(
        &file,
        format!(
            "server: {{ watch_interval: 0s }}\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: ['ws://{}'], eject_after: 1, eject_for: 60s }}\nroutes:\n  - {{ name: chat, path: /chat, pool: p }}\n",
            be.addrs[0]
        ),
    )
    .expect("write config");
    let mut gw = Upgate::start_with_nofile(&file, 40);
    let addr = gw.listening_addr().await;
    let mut ws = ws(addr, "h", "/chat").await;
    assert_eq!(roundtrip(&mut ws, "before").await, "before");
    drop(ws);

    // Fill the descriptor table one connection at a time, until the gateway
    // can no longer accept.
    let mut held = Vec::new();
    loop {
        assert!(held.len() < 100, "never ran out of descriptors");
        match held_connection(addr).await {
            Some(s) => held.push(s),
            None => break,
        }
    }
    // Give one back: the connection left in the accept queue takes it and
    // closes, then exactly one is free. An upgrade gets accepted on it, and
    // its backend connect fails with EMFILE.
    held.pop();
    let refused = loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        match tokio::time::timeout(Duration::from_secs(3), ws_with(addr, "h", "/chat", &[])).await {
            Ok(Err(e)) => break refusal(e),
            // Accepted with a descriptor to spare: hold it and try again.
            Ok(Ok(ws)) => {
                held.push(TcpStream::connect(addr).await.expect("connect"));
                drop(ws);
            }
            Err(_) => panic!("no answer while one descriptor was free"),
        }
    };
    let (status, retry, body) = refused;
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry, "1");
    assert!(
        body.contains("short of local resources"),
        "{status} {retry} {body:?}"
    );

    // Descriptors back: the very next upgrade works (the backend was not ejected).
    drop(held);
    let t0 = std::time::Instant::now();
    let mut ws = loop {
        match tokio::time::timeout(Duration::from_secs(3), ws_with(addr, "h", "/chat", &[])).await {
            Ok(Ok(ws)) => break ws,
            Ok(Err(e)) => panic!("refused after descriptors were freed: {:?}", refusal(e)),
            Err(_) => assert!(
                t0.elapsed() < Duration::from_secs(10),
                "not accepting again"
            ),
        }
    };
    assert_eq!(roundtrip(&mut ws, "after").await, "after");
    let log = gw.log();
    assert!(!log.contains("backend ejected"), "{log}");
    assert!(log.contains("out of local resources"), "{log}");
    // Accept failures are reported with a count, not once per attempt.
    let reports = log.matches("accept failed").count();
    assert!(
        (1..=4).contains(&reports),
        "{reports} accept-failure lines:\n{log}"
    );
}

/// `n` sessions open at once, each echoing, opened 100 at a time.
async fn open_sessions(addr: std::net::SocketAddr, n: usize) -> Vec<Ws<TcpStream>> {
    let mut open = Vec::new();
    while open.len() < n {
        let batch = (0..100).map(|i| async move {
            let mut s = ws(addr, "h", "/chat").await;
            assert_eq!(roundtrip(&mut s, &i.to_string()).await, i.to_string());
            s
        });
        open.extend(futures_util::future::join_all(batch).await);
    }
    open
}

/// The process's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A burst of sessions closes and the gateway goes quiet: the memory they
/// used goes back to the system at once, not at the next burst (a runtime
/// thread gives its free pages back when it parks, and one that parked too
/// soon after its last time is woken to do it). On one runtime thread, so
/// that what is measured is that thread's pages; its buffer pool (up to
/// 2 MiB, refilled by the last reads) stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_of_closed_sessions_goes_back_to_the_system() {
    closed_sessions_give_memory_back(1).await;
}

/// The same on two runtime threads, where the sessions' blocks are freed
/// by whichever thread runs them and each thread must collect its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_of_closed_sessions_goes_back_on_every_runtime_thread() {
    closed_sessions_give_memory_back(2).await;
}

async fn closed_sessions_give_memory_back(threads: u64) {
    const SESSIONS: usize = 2000;
    raise_nofile();
    let be = echo_backends(&["a"]).await;
    let dir = TempDir::new("rss");
    let file = dir.0.join("routes.yaml");
    std::fs::write(
        &file,
        format!(
            "server: {{ watch_interval: 0s }}\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: ['ws://{}'] }}\nroutes:\n  - {{ name: chat, path: /chat, pool: p }}\n",
            be.addrs[0]
        ),
    )
    .expect("write config");
    let mut gw = Upgate::start_with_args(&file, &["--threads", &threads.to_string()]);
    let addr = gw.listening_addr().await;
    let pid = gw.pid();
    let before = rss_kib(pid);

    let open = open_sessions(addr, SESSIONS).await;
    let held = rss_kib(pid);
    assert!(
        held > before + 3072,
        "{SESSIONS} sessions grew RSS only {before} -> {held} KiB"
    );
    drop(open);

    // Within 5 s, RSS is back to what the buffer pools may keep (up to
    // 64 buffers of 32 KiB per runtime thread, see src/buffers.rs) and a
    // quarter of the growth (what the runtime and the allocator keep).
    let pools = threads * 2048;
    let target = before + pools + (held - before) / 4;
    let t0 = std::time::Instant::now();
    let mut low = rss_kib(pid);
    while low > target {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{threads} thread(s): RSS {before} KiB before, {held} with {SESSIONS} sessions, at least {low} in the 5 s after they closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        low = low.min(rss_kib(pid));
    }
    eprintln!(
        "{threads} thread(s): RSS {before} KiB before, {held} with {SESSIONS} sessions, {low} {:?} after they closed",
        t0.elapsed()
    );
}
