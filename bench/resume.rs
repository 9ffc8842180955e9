//! What a backend's death costs its live sessions on a `mode: frames` route
//! with `resume: true`: two echo backends (separate processes, core 1), one
//! upgate (one runtime thread, core 0), `--sessions` sessions spread over
//! both by round robin, each having sent its preamble (`replay_first: 1`).
//! Then one backend is killed with SIGKILL and every client at once sends a
//! probe (again 20, 40, 80… ms after the kill until one is answered: a
//! probe written to the backend in the instant it died is lost, at-most-once). Measured per
//! session: from the kill to the first probe's echo. Sessions of the killed
//! backend are told apart by their preamble's echo coming again (from the
//! new backend). Reports p50/p99/max of that time for the moved sessions,
//! the unaffected sessions' for comparison, and disconnects.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::load::{self, Target};
use crate::{median, now_utc, proto, targets, Bins};

#[derive(clap::Args)]
pub struct ResumeArgs {
    /// Live sessions; half sit on the backend that is killed.
    #[arg(long, default_value_t = 2000)]
    sessions: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// upgate's runtime threads (1 pins it to core 0 like the suite; 2 lets it use both cores).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    #[command(flatten)]
    bins: Bins,
}

const PORT: u16 = 18120;
const ADMIN: u16 = 18121;
const BACKENDS: [u16; 2] = [19011, 19012];

/// The floor: `n` clients reconnecting straight to the surviving backend
/// (no proxy), at most `RESUME_DIALS` connecting at once as upgate's
/// resumes do: connect, upgrade, preamble, its echo. Time from the start to
/// each echo, in ms.
async fn reconnect_storm(addr: std::net::SocketAddr, n: usize) -> Vec<f64> {
    let t = Target {
        addr,
        host: "localhost".into(),
        path: "/".into(),
        tls: None,
        pid: None,
        paths: Default::default(),
    };
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(
        upgate::backend::pool::RESUME_DIALS,
    ));
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (t, slots) = (t.clone(), slots.clone());
        tasks.spawn(async move {
            let slot = slots.acquire_owned().await.ok()?;
            let mut buf = Vec::new();
            let mut s =
                tokio::time::timeout(Duration::from_secs(30), load::open(&t, None, &mut buf))
                    .await
                    .ok()?
                    .ok()?;
            drop(slot);
            let hello = format!("hello {i}");
            let mut frame = Vec::new();
            proto::put_frame(&mut frame, proto::OP_TEXT, hello.as_bytes(), true);
            s.write_all(&frame).await.ok()?;
            let mut chunk = vec![0u8; 4096];
            loop {
                match next_text(&mut s, &mut buf, &mut chunk, Duration::from_secs(30)).await {
                    Some(Some(x)) if x == hello => {
                        return Some((t0.elapsed().as_secs_f64() * 1e3, s))
                    }
                    Some(Some(_)) => {}
                    _ => return None,
                }
            }
        });
    }
    let mut out = Vec::new();
    let mut keep = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(Some((ms, s))) = r {
            out.push(ms);
            keep.push(s); // held until all are measured, as live sessions
        }
    }
    out
}

/// One session's story after the kill.
struct Probe {
    /// Its preamble came back again: it was moved to the other backend.
    moved: bool,
    /// From the kill to the first probe's echo; `None`: the session ended.
    took: Option<Duration>,
}

pub async fn resume_suite(a: ResumeArgs) -> Result<(), String> {
    let bin_dir = a.bins.dir()?;
    let work = std::env::temp_dir().join(format!("upgate-bench-resume-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let started = now_utc();
    let mut rows = Vec::new();
    for round in 0..a.rounds {
        let (r, floor, exit, gap) = one_round(&a, &bin_dir, &work).await?;
        let moved: Vec<f64> = r
            .iter()
            .filter(|p| p.moved)
            .filter_map(|p| p.took)
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        let stayed: Vec<f64> = r
            .iter()
            .filter(|p| !p.moved)
            .filter_map(|p| p.took)
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        let ended = r.iter().filter(|p| p.took.is_none()).count();
        let row = Row {
            gap,
            exit_ms: exit.as_secs_f64() * 1e3,
            floor: pct(&floor),
            n_floor: floor.len(),
            moved: pct(&moved),
            stayed: pct(&stayed),
            n_moved: moved.len(),
            n_stayed: stayed.len(),
            ended,
        };
        eprintln!(
            "round {}: {} moved: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} stayed: p99 {:.1} ms; {} ended; floor ({} reconnecting straight to the backend): p50 {:.1} ms, p99 {:.1} ms; the killed backend was reaped {:.1} ms after the kill; upgate's resume gaps: {} of {} within 100 ms, {} within 250 ms",
            round + 1,
            row.n_moved,
            row.moved.0,
            row.moved.1,
            row.moved.2,
            row.n_stayed,
            row.stayed.1,
            row.ended,
            row.n_floor,
            row.floor.0,
            row.floor.1,
            row.exit_ms,
            row.gap.within_100ms,
            row.gap.count,
            row.gap.within_250ms,
        );
        rows.push(row);
    }
    let mut report = format!(
        "## Resume after a backend's death (`mode: frames`, `resume: true`), {started}\n\n{}. upgate with {} runtime thread(s){}, two echo backends (separate processes) and the load generator on core 1. {} sessions by round robin over both backends, each with its preamble sent (`replay_first: 1`); one backend is killed with SIGKILL; every client then sends a probe (again 20, 40, 80… ms after the kill until answered). Time from the kill to the first probe's echo, per session, in ms; *moved*: sessions of the killed backend (their preamble came back again, from the other one). *upgate's gap*: its own `upgate_frames_resume_gap_seconds` histogram (from noticing the backend leg was lost to the new leg taking the session). *Floor*: afterwards, as many clients as were moved reconnect straight to the surviving backend (no proxy; at most {} connecting at once, as upgate paces its resumes) and send their preamble: from the start to each echo. That is the work a resume cannot avoid (a new backend connection, upgrade and preamble per session) done without upgate, on the same machine in the same round.\n\n| round | moved sessions | p50 | p99 | max | unaffected sessions, p99 | sessions ended | floor p50 | floor p99 | p99 ÷ floor p99 | killed backend reaped after | upgate's gap ≤ 100 ms / ≤ 250 ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        crate::machine_info(),
        a.threads,
        if a.threads == 1 { " pinned to core 0" } else { "" },
        a.sessions,
        upgate::backend::pool::RESUME_DIALS
    );
    for (i, r) in rows.iter().enumerate() {
        report.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {:.2} | {:.1} | {} / {} of {} |\n",
            i + 1,
            r.n_moved,
            r.moved.0,
            r.moved.1,
            r.moved.2,
            r.stayed.1,
            r.ended,
            r.floor.0,
            r.floor.1,
            r.moved.1 / r.floor.1,
            r.exit_ms,
            r.gap.within_100ms,
            r.gap.within_250ms,
            r.gap.count
        ));
    }
    report.push_str(&format!(
        "| median | | {:.1} | {:.1} | {:.1} | {:.1} | | {:.1} | {:.1} | {:.2} | {:.1} | |\n",
        median(rows.iter().map(|r| r.moved.0).collect()),
        median(rows.iter().map(|r| r.moved.1).collect()),
        median(rows.iter().map(|r| r.moved.2).collect()),
        median(rows.iter().map(|r| r.stayed.1).collect()),
        median(rows.iter().map(|r| r.floor.0).collect()),
        median(rows.iter().map(|r| r.floor.1).collect()),
        median(rows.iter().map(|r| r.moved.1 / r.floor.1).collect()),
        median(rows.iter().map(|r| r.exit_ms).collect()),
    ));
    crate::save_report(&a.out, "resume-", &started, &report)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

struct Row {
    /// upgate's own view: resume gaps within 100 and 250 ms.
    gap: Gaps,
    /// From the SIGKILL until the killed process was reaped.
    exit_ms: f64,
    /// The reconnect storm straight to the backend: p50, p99, max.
    floor: (f64, f64, f64),
    n_floor: usize,
    /// p50, p99, max.
    moved: (f64, f64, f64),
    stayed: (f64, f64, f64),
    n_moved: usize,
    n_stayed: usize,
    ended: usize,
}

fn pct(v: &[f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let at = |q: f64| s[((s.len() as f64 * q).ceil() as usize).clamp(1, s.len()) - 1];
    (at(0.5), at(0.99), s[s.len() - 1])
}

async fn one_round(
    a: &ResumeArgs,
    bin_dir: &std::path::Path,
    work: &std::path::Path,
) -> Result<(Vec<Probe>, Vec<f64>, Duration, Gaps), String> {
    let mut backends = Vec::new();
    for port in BACKENDS {
        let listen = format!("127.0.0.1:{port}");
        let child = targets::spawn(
            port,
            "1",
            &bin_dir.join("upgate-bench-backend"),
            &["--listen", &listen],
            &[],
            &work.join(format!("backend-{port}.log")),
        )?;
        let p = targets::Proc {
            name: format!("backend {port}"),
            plain: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            tls: None,
            child: Some(child),
        };
        targets::wait_port(p.plain, &p.name)?;
        backends.push(p);
    }
    let yaml = format!(
        "server: {{ max_connections: 100000, shutdown_grace: 1s }}\nadmin: {{ addr: 127.0.0.1:{ADMIN} }}\nlisten:\n  - addr: 127.0.0.1:{PORT}\npools:\n  echo: {{ backends: [ws://127.0.0.1:{}, ws://127.0.0.1:{}] }}\nroutes:\n  - {{ name: echo, pool: echo, mode: frames, resume: true, replay_first: 1 }}\n",
        BACKENDS[0], BACKENDS[1]
    );
    let cores = if a.threads == 1 { "0" } else { "0,1" };
    let proxy = targets::upgate_with(bin_dir, work, "resume", &yaml, PORT, cores, a.threads)?;
    let t = Target {
        addr: proxy.plain,
        host: "localhost".into(),
        path: "/".into(),
        tls: None,
        pid: proxy.pid(),
        paths: Default::default(),
    };

    // Every session opened and its preamble answered before the kill.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<(), String>>(a.sessions);
    let (go_tx, go_rx) = tokio::sync::watch::channel::<Option<Instant>>(None);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..a.sessions {
        let (t, ready, go) = (t.clone(), ready_tx.clone(), go_rx.clone());
        tasks.spawn(session(t, i, ready, go));
    }
    drop(ready_tx);
    for _ in 0..a.sessions {
        match tokio::time::timeout(Duration::from_secs(60), ready_rx.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => return Err(format!("opening the sessions: {e}")),
            _ => return Err("sessions did not open within 60 s".into()),
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut victim = backends[0].child.take().ok_or("no backend process")?;
    let t0 = Instant::now();
    victim.kill().map_err(|e| format!("kill: {e}"))?;
    let _ = go_tx.send(Some(t0));
    // How long the kernel takes to tear the dead process and its sockets
    // down: part of what every session waits for, on this machine's core 1.
    let exit = tokio::task::spawn_blocking(move || {
        let _ = victim.wait();
        t0.elapsed()
    });
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(p) = r {
            out.push(p);
        }
    }
    let exit = exit.await.unwrap_or_default();
    let gap = resume_gaps().await;
    let floor = reconnect_storm(backends[1].plain, a.sessions / 2).await;
    drop(proxy);
    drop(backends);
    Ok((out, floor, exit, gap))
}

/// One client: opens, sends its preamble, waits for its echo, reports
/// ready; after the kill, probes until a probe's echo arrives.
async fn session(
    t: Target,
    i: usize,
    ready: tokio::sync::mpsc::Sender<Result<(), String>>,
    mut go: tokio::sync::watch::Receiver<Option<Instant>>,
) -> Probe {
    let ended = Probe {
        moved: false,
        took: None,
    };
    let mut buf = Vec::new();
    let opened =
        tokio::time::timeout(Duration::from_secs(30), load::open(&t, None, &mut buf)).await;
    let mut s = match opened {
        Ok(Ok(s)) => s,
        other => {
            let e = match other {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".into(),
            };
            let _ = ready.send(Err(e)).await;
            return ended;
        }
    };
    let hello = format!("hello {i}");
    let mut frame = Vec::new();
    proto::put_frame(&mut frame, proto::OP_TEXT, hello.as_bytes(), true);
    if s.write_all(&frame).await.is_err() {
        let _ = ready.send(Err("preamble not sent".into())).await;
        return ended;
    }
    let mut chunk = vec![0u8; 4096];
    // Reads frames from `s` into `buf`; the texts received, or None at the end.
    loop {
        match next_text(&mut s, &mut buf, &mut chunk, Duration::from_secs(30)).await {
            Some(Some(t)) if t == hello => break,
            Some(Some(_)) => {}
            _ => {
                let _ = ready.send(Err("no preamble echo".into())).await;
                return ended;
            }
        }
    }
    let _ = ready.send(Ok(())).await;
    let t0 = loop {
        if let Some(t0) = *go.borrow_and_update() {
            break t0;
        }
        if go.changed().await.is_err() {
            return ended;
        }
    };
    let probe = format!("probe {i}");
    let mut moved = false;
    let mut sent = 0u32;
    let deadline = t0 + Duration::from_secs(20);
    loop {
        frame.clear();
        proto::put_frame(&mut frame, proto::OP_TEXT, probe.as_bytes(), true);
        if s.write_all(&frame).await.is_err() {
            return Probe { moved, took: None };
        }
        // Read until a probe's echo, or until it is time to probe again:
        // 20, 40, 80… ms after the kill. (A probe written to the backend in
        // the instant it died is lost; probes sent during the gap are held
        // and all echoed after the resume, so a steady resend would load
        // the very machine being measured.)
        let again = t0 + Duration::from_millis(20 << sent.min(8));
        sent += 1;
        loop {
            let left = again.saturating_duration_since(Instant::now());
            match next_text(&mut s, &mut buf, &mut chunk, left).await {
                Some(Some(t)) if t == probe => {
                    return Probe {
                        moved,
                        took: Some(t0.elapsed()),
                    }
                }
                Some(Some(t)) if t == hello => moved = true,
                Some(Some(_)) => {}
                Some(None) => break, // no answer yet: probe again
                None => return Probe { moved, took: None },
            }
        }
        if Instant::now() > deadline {
            return Probe { moved, took: None };
        }
    }
}

/// The next text message within `limit`: `Some(Some(text))`, `Some(None)`
/// when the time ran out, `None` when the session ended (Close, EOF, error).
async fn next_text(
    s: &mut load::Stream,
    buf: &mut Vec<u8>,
    chunk: &mut [u8],
    limit: Duration,
) -> Option<Option<String>> {
    let until = tokio::time::Instant::now() + limit;
    loop {
        while let Some(f) = proto::parse(buf) {
            let text = String::from_utf8_lossy(&buf[f.start..f.end()]).into_owned();
            let op = f.opcode;
            buf.drain(..f.end());
            match op {
                proto::OP_TEXT => return Some(Some(text)),
                proto::OP_CLOSE => return None,
                _ => {}
            }
        }
        match tokio::time::timeout_at(until, s.read(chunk)).await {
            Err(_) => return Some(None),
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            Ok(_) => return None,
        }
    }
}

/// Counts from upgate's `upgate_frames_resume_gap_seconds` histogram.
#[derive(Debug, Default, Clone, Copy)]
struct Gaps {
    count: u64,
    within_100ms: u64,
    within_250ms: u64,
}

/// Reads the resume-gap histogram from upgate's admin listener.
async fn resume_gaps() -> Gaps {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut body = String::new();
    if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", ADMIN)).await {
        let req = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        if s.write_all(req.as_bytes()).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body)).await;
        }
    }
    let value = |prefix: &str, le: Option<&str>| -> u64 {
        body.lines()
            .find(|l| {
                l.starts_with(prefix) && le.is_none_or(|le| l.contains(&format!("le=\"{le}\"")))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    Gaps {
        count: value("upgate_frames_resume_gap_seconds_count", None),
        within_100ms: value("upgate_frames_resume_gap_seconds_bucket", Some("0.1")),
        within_250ms: value("upgate_frames_resume_gap_seconds_bucket", Some("0.25")),
    }
}
