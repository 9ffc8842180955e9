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
//!
//! In the same round, the same storm without upgate: the clients connect
//! straight to the backends and, when theirs dies, reconnect to the other by
//! themselves (paced as upgate paces its resumes) and send their preamble
//! again: the same event with no proxy on the machine, the yardstick.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use upgate::backend::pool::RESUME_DIALS;

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

/// One session's story after the kill.
struct Probe {
    /// Its preamble came back again: it was moved to the other backend.
    moved: bool,
    /// From the kill to the first probe's echo; `None`: the session ended.
    took: Option<Duration>,
    /// The session, held open until every session is measured: one that
    /// ended as soon as it was measured would load upgate and the backend
    /// with its teardown while others are still resuming.
    held: Option<load::Stream>,
}

pub async fn resume_suite(a: ResumeArgs) -> Result<(), String> {
    let bin_dir = a.bins.dir()?;
    let work = std::env::temp_dir().join(format!("upgate-bench-resume-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let started = now_utc();
    let mut rows = Vec::new();
    for round in 0..a.rounds {
        let (through, direct, exit, gap) = one_round(&a, &bin_dir, &work).await?;
        let (u, d) = (Side::of(&through), Side::of(&direct));
        eprintln!(
            "round {}: through upgate, {} moved: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} stayed: p99 {:.1} ms; {} ended; \
             without upgate (clients reconnect themselves), {} moved: p50 {:.1} ms, p99 {:.1} ms; {} stayed: p99 {:.1} ms; {} ended; \
             the killed backend was reaped {:.1} ms after the kill; upgate's resume gaps: {} of {} within 100 ms, {} within 250 ms",
            round + 1,
            u.n_moved, u.moved.0, u.moved.1, u.moved.2, u.n_stayed, u.stayed.1, u.ended,
            d.n_moved, d.moved.0, d.moved.1, d.n_stayed, d.stayed.1, d.ended,
            exit.as_secs_f64() * 1e3,
            gap.within_100ms, gap.count, gap.within_250ms,
        );
        rows.push(Row {
            gap,
            exit_ms: exit.as_secs_f64() * 1e3,
            u,
            d,
        });
    }
    let mut report = format!(
        "## Resume after a backend's death (`mode: frames`, `resume: true`), {started}\n\n{}. upgate with {} runtime thread(s){}, two echo backends (separate processes) and the load generator on core 1. {} sessions by round robin over both backends, each with its preamble sent (`replay_first: 1`); one backend is killed with SIGKILL; every client then sends a probe (again 20, 40, 80… ms after the kill until answered). Time from the kill to the first probe's echo, per session, in ms; *moved*: sessions of the killed backend (their preamble came back again, from the other one). *upgate's gap*: its own `upgate_frames_resume_gap_seconds` histogram (from noticing the backend leg was lost to the new leg taking the session).\n\n*Without upgate*, in the same round: the same storm with the clients connected straight to the backends (half on the one killed) and reconnecting by themselves: a client whose connection ends connects to the other backend (at most {} connecting at once, as upgate paces its resumes), sends its preamble again and probes. That is the same event handled by the clients, with no proxy's work on the machine: a resume through upgate adds a hop but saves each client its reconnect.\n\n| round | moved sessions | p50 | p99 | max | unaffected, p99 | ended | without upgate: moved p50 | p99 | unaffected, p99 | ended | p99 ÷ without | killed backend reaped after | upgate's gap ≤ 100 ms / ≤ 250 ms / all |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        crate::machine_info(),
        a.threads,
        if a.threads == 1 { " pinned to core 0" } else { "" },
        a.sessions,
        RESUME_DIALS
    );
    for (i, r) in rows.iter().enumerate() {
        let (u, d) = (&r.u, &r.d);
        report.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {:.1} | {} | {:.2} | {:.1} | {} / {} / {} |\n",
            i + 1,
            u.n_moved,
            u.moved.0,
            u.moved.1,
            u.moved.2,
            u.stayed.1,
            u.ended,
            d.moved.0,
            d.moved.1,
            d.stayed.1,
            d.ended,
            u.moved.1 / d.moved.1,
            r.exit_ms,
            r.gap.within_100ms,
            r.gap.within_250ms,
            r.gap.count
        ));
    }
    let med = |f: &dyn Fn(&Row) -> f64| median(rows.iter().map(f).collect());
    report.push_str(&format!(
        "| median | | {:.1} | {:.1} | {:.1} | {:.1} | | {:.1} | {:.1} | {:.1} | | {:.2} | {:.1} | |\n",
        med(&|r| r.u.moved.0),
        med(&|r| r.u.moved.1),
        med(&|r| r.u.moved.2),
        med(&|r| r.u.stayed.1),
        med(&|r| r.d.moved.0),
        med(&|r| r.d.moved.1),
        med(&|r| r.d.stayed.1),
        med(&|r| r.u.moved.1 / r.d.moved.1),
        med(&|r| r.exit_ms),
    ));
    crate::save_report(&a.out, "resume-", &started, &report)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

struct Row {
    /// upgate's own view: resume gaps within 100 and 250 ms.
    gap: Gaps,
    /// From the SIGKILL until the killed process was reaped (through upgate).
    exit_ms: f64,
    /// Through upgate.
    u: Side,
    /// Without upgate: the clients reconnect themselves.
    d: Side,
}

/// One storm's figures, in ms.
struct Side {
    /// p50, p99, max of the moved sessions.
    moved: (f64, f64, f64),
    stayed: (f64, f64, f64),
    n_moved: usize,
    n_stayed: usize,
    ended: usize,
}

impl Side {
    fn of(probes: &[Probe]) -> Side {
        let ms = |moved: bool| -> Vec<f64> {
            probes
                .iter()
                .filter(|p| p.moved == moved)
                .filter_map(|p| p.took)
                .map(|d| d.as_secs_f64() * 1e3)
                .collect()
        };
        let (moved, stayed) = (ms(true), ms(false));
        Side {
            moved: pct(&moved),
            stayed: pct(&stayed),
            n_moved: moved.len(),
            n_stayed: stayed.len(),
            ended: probes.iter().filter(|p| p.took.is_none()).count(),
        }
    }
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

fn echo_backend(
    bin_dir: &std::path::Path,
    work: &std::path::Path,
    port: u16,
) -> Result<targets::Proc, String> {
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
    Ok(p)
}

fn plain_target(addr: std::net::SocketAddr, pid: Option<u32>) -> Target {
    Target {
        addr,
        host: "localhost".into(),
        path: "/".into(),
        tls: None,
        pid,
        paths: Default::default(),
    }
}

/// Where a client connects, and (without upgate) where it reconnects by
/// itself when its backend is gone, at most [`RESUME_DIALS`] at once.
#[derive(Clone)]
struct Plan {
    first: Target,
    fallback: Option<(Target, Arc<Semaphore>)>,
}

/// Opens one session per plan, kills `victim` once all have their
/// preamble's echo, and follows every session to its first probe's echo.
/// Returns the probes and the time the killed process took to be reaped.
async fn storm(
    plans: Vec<Plan>,
    victim: &mut targets::Proc,
) -> Result<(Vec<Probe>, Duration), String> {
    let n = plans.len();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<(), String>>(n);
    let (go_tx, go_rx) = tokio::sync::watch::channel::<Option<Instant>>(None);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, plan) in plans.into_iter().enumerate() {
        tasks.spawn(session(plan, i, ready_tx.clone(), go_rx.clone()));
    }
    drop(ready_tx);
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_secs(60), ready_rx.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => return Err(format!("opening the sessions: {e}")),
            _ => return Err("sessions did not open within 60 s".into()),
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut child = victim.child.take().ok_or("no backend process")?;
    let t0 = Instant::now();
    child.kill().map_err(|e| format!("kill: {e}"))?;
    let _ = go_tx.send(Some(t0));
    // How long the kernel takes to tear the dead process and its sockets
    // down: part of what every session waits for, on this machine's core 1.
    let exit = tokio::task::spawn_blocking(move || {
        let _ = child.wait();
        t0.elapsed()
    });
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(p) = r {
            out.push(p);
        }
    }
    let exit = exit.await.unwrap_or_default();
    // Every session measured: close them, and let the teardown pass.
    for p in &mut out {
        p.held = None;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok((out, exit))
}

/// One round: the storm through upgate, then the same storm without it.
async fn one_round(
    a: &ResumeArgs,
    bin_dir: &std::path::Path,
    work: &std::path::Path,
) -> Result<(Vec<Probe>, Vec<Probe>, Duration, Gaps), String> {
    let mut backends = Vec::new();
    for port in BACKENDS {
        backends.push(echo_backend(bin_dir, work, port)?);
    }
    let yaml = format!(
        "server: {{ max_connections: 100000, shutdown_grace: 1s }}\nadmin: {{ addr: 127.0.0.1:{ADMIN} }}\nlisten:\n  - addr: 127.0.0.1:{PORT}\npools:\n  echo: {{ backends: [ws://127.0.0.1:{}, ws://127.0.0.1:{}] }}\nroutes:\n  - {{ name: echo, pool: echo, mode: frames, resume: true, replay_first: 1 }}\n",
        BACKENDS[0], BACKENDS[1]
    );
    let cores = if a.threads == 1 { "0" } else { "0,1" };
    let proxy = targets::upgate_with(bin_dir, work, "resume", &yaml, PORT, cores, a.threads)?;
    let via = plain_target(proxy.plain, proxy.pid());
    let plans = (0..a.sessions)
        .map(|_| Plan {
            first: via.clone(),
            fallback: None,
        })
        .collect();
    let (through, exit) = storm(plans, &mut backends[0]).await?;
    let gap = resume_gaps().await;
    drop(proxy);

    // Without upgate: the killed backend back on its port, half the
    // clients on it; they notice its death themselves and reconnect to
    // the other one, paced as upgate paces its resumes.
    drop(backends.remove(0));
    backends.insert(0, echo_backend(bin_dir, work, BACKENDS[0])?);
    let slots = Arc::new(Semaphore::new(RESUME_DIALS));
    let survivor = plain_target(backends[1].plain, None);
    let plans = (0..a.sessions)
        .map(|i| {
            if i % 2 == 0 {
                Plan {
                    first: plain_target(backends[0].plain, None),
                    fallback: Some((survivor.clone(), slots.clone())),
                }
            } else {
                Plan {
                    first: survivor.clone(),
                    fallback: None,
                }
            }
        })
        .collect();
    let (direct, _) = storm(plans, &mut backends[0]).await?;
    drop(backends);
    Ok((through, direct, exit, gap))
}

/// One client: opens, sends its preamble, waits for its echo, reports
/// ready; after the kill, probes until a probe's echo arrives. With a
/// fallback (no upgate), a session that ends reconnects there once, sends
/// its preamble again and goes on probing.
async fn session(
    plan: Plan,
    i: usize,
    ready: tokio::sync::mpsc::Sender<Result<(), String>>,
    mut go: tokio::sync::watch::Receiver<Option<Instant>>,
) -> Probe {
    let ended = |moved| Probe {
        moved,
        took: None,
        held: None,
    };
    let mut buf = Vec::new();
    let opened = tokio::time::timeout(
        Duration::from_secs(30),
        load::open(&plan.first, None, &mut buf),
    )
    .await;
    let mut s = match opened {
        Ok(Ok(s)) => s,
        other => {
            let e = match other {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".into(),
            };
            let _ = ready.send(Err(e)).await;
            return ended(false);
        }
    };
    let hello = format!("hello {i}");
    let mut frame = Vec::new();
    proto::put_frame(&mut frame, proto::OP_TEXT, hello.as_bytes(), true);
    if s.write_all(&frame).await.is_err() {
        let _ = ready.send(Err("preamble not sent".into())).await;
        return ended(false);
    }
    let mut chunk = vec![0u8; 4096];
    loop {
        match next_text(&mut s, &mut buf, &mut chunk, Duration::from_secs(30)).await {
            Some(Some(t)) if t == hello => break,
            Some(Some(_)) => {}
            _ => {
                let _ = ready.send(Err("no preamble echo".into())).await;
                return ended(false);
            }
        }
    }
    let _ = ready.send(Ok(())).await;
    let t0 = loop {
        if let Some(t0) = *go.borrow_and_update() {
            break t0;
        }
        if go.changed().await.is_err() {
            return ended(false);
        }
    };
    let probe = format!("probe {i}");
    let mut fallback = plan.fallback;
    let mut moved = false;
    let mut sent = 0u32;
    let deadline = t0 + Duration::from_secs(20);
    loop {
        let mut frame = Vec::new();
        proto::put_frame(&mut frame, proto::OP_TEXT, probe.as_bytes(), true);
        let mut gone = s.write_all(&frame).await.is_err();
        // Read until a probe's echo, or until it is time to probe again:
        // 20, 40, 80… ms after the kill. (A probe written to the backend in
        // the instant it died is lost; probes sent during the gap are held
        // and all echoed after the resume, so a steady resend would load
        // the very machine being measured.)
        let again = t0 + Duration::from_millis(20 << sent.min(8));
        sent += 1;
        while !gone {
            let left = again.saturating_duration_since(Instant::now());
            match next_text(&mut s, &mut buf, &mut chunk, left).await {
                Some(Some(t)) if t == probe => {
                    return Probe {
                        moved,
                        took: Some(t0.elapsed()),
                        held: Some(s),
                    }
                }
                Some(Some(t)) if t == hello => moved = true,
                Some(Some(_)) => {}
                Some(None) => break, // no answer yet: probe again
                None => gone = true,
            }
        }
        if gone {
            // Without upgate, the client's own reconnect.
            let Some((t, slots)) = fallback.take() else {
                return ended(moved);
            };
            let Ok(slot) = slots.acquire_owned().await else {
                return ended(moved);
            };
            buf.clear();
            s = match tokio::time::timeout(Duration::from_secs(30), load::open(&t, None, &mut buf))
                .await
            {
                Ok(Ok(s)) => s,
                _ => return ended(moved),
            };
            drop(slot);
            moved = true;
            let mut frame = Vec::new();
            proto::put_frame(&mut frame, proto::OP_TEXT, hello.as_bytes(), true);
            if s.write_all(&frame).await.is_err() {
                return ended(moved);
            }
            continue; // and probe at once
        }
        if Instant::now() > deadline {
            return ended(moved);
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
