//! One frames session: the client's messages to the backend and back, the
//! guards, and resuming on another backend.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, Instrument};

use super::{BackendWs, Redial};
use crate::backend::pool::{Backend, BackendGuard};
use crate::backend::upstream::BackendIo;
use crate::config::FramesConfig;
use crate::lifecycle::Lifecycle;
use crate::metrics::{ResumeCause, RouteStats};
use crate::session::conn::{upgraded, Busy, Leg};
use crate::session::splice::{ReadReady, REBALANCE_REASON};
use crate::session::{expiry, Ends, Woken};
use crate::ws::frame::{self, code};
use crate::ws::reader::{Input, Reader};

/// Room made in the client's buffer before each read.
const READ: usize = 4096;
/// Backend messages written to the client in one write, at most.
const BATCH: usize = 64;
/// After a failed write to the client, how many more of its bytes are read
/// for messages it sent before it went.
const SALVAGE_MAX: usize = 1 << 20;
/// How long a client that broke the protocol right after sending a message
/// may still receive the backend's answer before its Close.
const ANSWER_GRACE: Duration = Duration::from_millis(500);

/// Spawns a frames session: the client's upgrade, the connected backend
/// leg (socket and the bytes behind its 101), how to dial again, and
/// whether the client leg negotiated permessage-deflate.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    life: &Lifecycle,
    conn: Busy,
    client: OnUpgrade,
    backend: (BackendIo, Bytes),
    guard: BackendGuard,
    ends: Ends,
    cfg: Arc<FramesConfig>,
    redial: Redial,
    deflate: bool,
) {
    let stop = life.hard_stop.clone();
    let span = tracing::Span::current();
    life.tasks.spawn(
        async move {
            let Some(client) = upgraded(client, conn.tls).await else {
                return;
            };
            let ws = super::backend_leg(backend.0, backend.1).await;
            let watch_down = cfg.resume || ends.backend_down.is_some();
            // Rebalancing moves a resuming session, and closes one with `rebalance: close`.
            let movable = cfg.resume || ends.rebalance_close;
            let started = Instant::now();
            let mut s = Session {
                cfg,
                redial: Arc::new(redial),
                stats: ends.stats.stats(),
                leg: Some(Upstream::new(ws, guard, watch_down, movable)),
                preamble: Vec::new(),
                held: VecDeque::new(),
                held_bytes: 0,
                lost: None,
                deflate,
                unflushed: false,
                stash: None,
                resumes: 0,
                up: 0,
                down: 0,
            };
            // Both boxed: inline, the plain path's state (3 KB) would size
            // the task of every TLS session too, which holds its own in a box.
            let out = match client {
                Leg::Tcp(c, pending) => Box::pin(s.run(c, pending, &ends, &stop)).await,
                Leg::Other(c, pending) => Box::pin(s.run(c, pending, &ends, &stop)).await,
            };
            if out.end == "token_expired" {
                s.stats.auth.expired_sessions.fetch_add(1, Relaxed);
            }
            let took = started.elapsed();
            s.stats.session_duration.observe(took);
            info!(
                target: "upgate::access",
                backend = s.leg.as_ref().map(|l| l.guard.backend().url.to_string()),
                duration_ms = took.as_millis() as u64,
                messages_up = s.up,
                messages_down = s.down,
                resumes = s.resumes,
                end = out.end,
                close_code = out.code,
                user = ends.who.as_deref(),
                "session"
            );
            drop(conn);
        }
        .instrument(span),
    );
}

type Waiting = Pin<Box<dyn Future<Output = FromBackend> + Send>>;

/// What ends a session besides its peers and its backend.
enum Ended {
    Shutdown,
    RouteGone,
    Expired,
}

/// The current backend leg, and what ends or moves it besides its stream.
/// The waits are made once per leg and polled in place, so the session's
/// loop registers no waker anew per message.
struct Upstream {
    ws: BackendWs,
    guard: BackendGuard,
    /// Health checks marked the backend down, a reload drained or removed
    /// it, or the rebalancer asked this session to move (`resume`) or to
    /// close (`rebalance: close`). Polled only when one of them fired.
    gone: Woken<Waiting>,
}

impl Upstream {
    /// `watch_down`: health checks marking the backend down end this leg
    /// (with `resume`, or `on_backend_down: close`); `movable`: the session
    /// takes rebalancing moves (`resume`).
    fn new(ws: BackendWs, guard: BackendGuard, watch_down: bool, movable: bool) -> Upstream {
        let b = guard.backend().clone();
        let down = watch_down.then(|| b.down_token());
        let retired = b.retired().clone();
        let gone: Waiting = Box::pin(async move {
            let down = async {
                match down {
                    Some(d) => d.cancelled_owned().await,
                    None => std::future::pending().await,
                }
            };
            let shed = async {
                match movable {
                    true => b.shed_claimed().await,
                    false => std::future::pending().await,
                }
            };
            tokio::select! {
                // A down token is a child of `retired`: both fire on a retirement.
                biased;
                _ = retired.cancelled() => FromBackend::Down("backend drained or removed by a reload".into()),
                _ = down => FromBackend::Down("backend marked down by health checks".into()),
                _ = shed => FromBackend::Shed,
            }
        });
        Upstream {
            ws,
            guard,
            gone: Woken::new(gone),
        }
    }
}

/// Why the backend leg ended, and what the client is told if no backend takes over.
struct Lost {
    code: u16,
    reason: String,
    since: Instant,
    /// The backend lost: tried last.
    from: Option<Arc<Backend>>,
    /// Why: a rebalancing move goes to the least loaded backend.
    cause: ResumeCause,
}

struct Session<'a> {
    cfg: Arc<FramesConfig>,
    redial: Arc<Redial>,
    stats: &'a RouteStats,
    leg: Option<Upstream>,
    /// The first `replay_first` client messages.
    preamble: Vec<Message>,
    /// Client messages waiting for a backend.
    held: VecDeque<Message>,
    held_bytes: usize,
    /// Set while no backend leg is open (resuming).
    lost: Option<Lost>,
    /// The client leg negotiated permessage-deflate.
    deflate: bool,
    /// Client messages fed to the backend leg but not flushed yet.
    unflushed: bool,
    /// A backend event read while batching, handled next.
    stash: Option<FromBackend>,
    resumes: u64,
    up: u64,
    down: u64,
}

/// The client's message rate: tokens left, and when they were counted.
type Bucket = Option<(f64, Instant)>;

/// Why a client message is not forwarded: the Close code and reason the
/// client gets, and the session's end for the access log.
struct Refused {
    code: u16,
    reason: std::borrow::Cow<'static, str>,
    end: &'static str,
}

/// How the session ended, for the access log.
struct Out {
    end: &'static str,
    code: Option<u16>,
}

/// A backend Close that asks the client to come back later: with `resume`,
/// the session moves instead.
fn moves(code: u16) -> bool {
    matches!(code, 1001 | 1012 | 1013 | 1014)
}

fn payload_len(m: &Message) -> usize {
    match m {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        _ => 0,
    }
}

/// What the backend leg produced, in the session's terms.
enum FromBackend {
    Message(Message),
    /// A Close with its code (1005 when it carried none) and reason.
    Close(u16, String),
    /// The connection ended without a Close, or failed.
    Gone(String),
    /// Health checks marked the backend down, or a reload drained or removed it.
    Down(String),
    /// The rebalancer asked this session to move, and it claimed the move.
    Shed,
    Nothing,
}

impl Session<'_> {
    async fn run<C>(
        &mut self,
        mut c: C,
        pending: Bytes,
        ends: &Ends,
        stop: &CancellationToken,
    ) -> Out
    where
        C: AsyncRead + AsyncWrite + ReadReady + Unpin,
    {
        let cfg = self.cfg.clone();
        let mut reader = Reader::new(pending.to_vec(), cfg.max_message, self.deflate);
        // `pending` may be a slice of hyper's whole read buffer: let it go now,
        // not when the session ends.
        drop(pending);
        let mut bucket: Bucket = cfg.client_rate.map(|r| (f64::from(r), Instant::now()));
        let mut keepalive = tokio::time::interval(cfg.ping_interval);
        keepalive.tick().await;
        let (mut client_heard, mut backend_heard) = (Instant::now(), Instant::now());
        let mut redial_at: Option<Instant> = None;
        let mut dialing: Option<Dialing> = None;
        let mut retry = Duration::ZERO;
        let mut forwarded: Option<Instant> = None;
        // Polled only when one of its waits fired (`Woken`), not every turn.
        let ended = std::pin::pin!(async {
            tokio::select! {
                _ = stop.cancelled() => Ended::Shutdown,
                _ = ends.route_retired.cancelled() => Ended::RouteGone,
                _ = expiry(ends.expires) => Ended::Expired,
            }
        });
        let mut ended = Woken::new(ended);
        // Bytes that arrived with the upgrade are read like any others.
        let mut first = !reader.inbuf.is_empty();
        loop {
            // One clock read for every input of this turn (a read costs
            // ~20 ns here; a turn's inputs arrive within microseconds).
            let mut turn: Option<Instant> = None;
            // Everything complete in the client's buffer, in order.
            while let Some(input) = if first || !reader.inbuf.is_empty() {
                first = false;
                reader.next_input()
            } else {
                None
            } {
                client_heard = *turn.get_or_insert_with(Instant::now);
                match input {
                    Input::Ping(p) => {
                        if send(&mut c, &frame::encode(frame::OP_PONG, &p))
                            .await
                            .is_err()
                        {
                            return Box::pin(self.salvage(&mut c, &mut reader, &mut bucket)).await;
                        }
                    }
                    Input::Message(op, payload, compressed) => {
                        let msg =
                            match self.admit(op, payload, compressed, &mut bucket, client_heard) {
                                Ok(msg) => msg,
                                Err(Refused { code, reason, end }) => {
                                    let _ =
                                        close_client(&mut c, &frame::close(code, &reason)).await;
                                    return self.end(end, Some(code)).await;
                                }
                            };
                        forwarded = Some(client_heard);
                        if let Some(code) = self.forward(msg).await {
                            let _ = close_client(&mut c, &frame::close(code, "resume buffer full"))
                                .await;
                            return self.end("resume_buffer_full", Some(code)).await;
                        }
                    }
                    Input::Close(code) => {
                        let echo = code.unwrap_or(code::NORMAL);
                        let _ = close_client(&mut c, &frame::close(echo, "")).await;
                        return self
                            .finish(code, "client closed", "client_close", code)
                            .await;
                    }
                    Input::Bad(e) => {
                        // Nothing more is read; the answer to what the client
                        // sent just before may still go out first.
                        if forwarded.is_some_and(|t| t.elapsed() < ANSWER_GRACE) {
                            self.answers_first(&mut c).await;
                        }
                        let _ = close_client(&mut c, &frame::close(e.code(), &e.to_string())).await;
                        return self.end("protocol", Some(e.code())).await;
                    }
                }
            }
            if reader.inbuf.is_empty() && reader.inbuf.capacity() > 0 {
                // An idle session keeps no read buffer.
                reader.inbuf = Vec::new();
            }
            if self.unflushed {
                self.unflushed = false;
                if let Some(l) = &mut self.leg {
                    if let Err(e) = l.ws.flush().await {
                        if cfg.resume {
                            self.lose(
                                code::SERVICE_RESTART,
                                format!("sending to the backend: {e}"),
                                ResumeCause::Gone,
                            );
                            redial_at = Some(Instant::now());
                        }
                    }
                }
            }
            if let (Some(lost), true) = (&self.lost, self.leg.is_none()) {
                if lost.since.elapsed() >= cfg.resume_timeout {
                    let (code, reason) = (
                        lost.code,
                        format!(
                            "{}; no backend took the session within {:?}",
                            lost.reason, cfg.resume_timeout
                        ),
                    );
                    self.stats.resume_failures.fetch_add(1, Relaxed);
                    let _ = close_client(&mut c, &frame::close(code, &reason)).await;
                    return Out {
                        end: "resume_timeout",
                        code: Some(code),
                    };
                }
            }
            let lost_deadline = self.lost.as_ref().map(|l| l.since + cfg.resume_timeout);
            // A dial, once started, runs to its end across turns of the loop.
            if let (None, Some(at)) = (&dialing, redial_at.take()) {
                let r = self.redial.clone();
                let avoid = self.lost.as_ref().and_then(|l| l.from.clone());
                let moving = self
                    .lost
                    .as_ref()
                    .is_some_and(|l| l.cause == ResumeCause::Rebalance);
                dialing = Some(Box::pin(async move {
                    tokio::time::sleep_until(at).await;
                    super::dial(&r, avoid.as_deref(), moving).await
                }));
            }
            tokio::select! {
                r = read_into(&mut c, &mut reader.inbuf) => match r {
                    Ok(0) => return self.finish(Some(code::GOING_AWAY), "client gone", "eof", None).await,
                    Ok(_) => {}
                    Err(_) => return self.finish(Some(code::GOING_AWAY), "client gone", "io_error", None).await,
                },
                b = next_from(&mut self.leg, &mut self.stash) => {
                    backend_heard = Instant::now();
                    match b {
                        FromBackend::Message(m) => {
                            // This message and any others already arrived, in one write.
                            let mut out = BytesMut::new();
                            self.push_down(&mut out, &m);
                            for _ in 1..BATCH {
                                let Some(l) = &mut self.leg else { break };
                                match l.ws.next().now_or_never() {
                                    None => break,
                                    Some(Some(Ok(m @ (Message::Text(_) | Message::Binary(_))))) => {
                                        self.push_down(&mut out, &m);
                                    }
                                    Some(other) => {
                                        self.stash = Some(classify(other));
                                        break;
                                    }
                                }
                            }
                            if send(&mut c, &out).await.is_err() {
                                return Box::pin(self.salvage(&mut c, &mut reader, &mut bucket)).await;
                            }
                        }
                        FromBackend::Nothing => {}
                        FromBackend::Shed if !cfg.resume => {
                            self.stats.rebalance_closes.fetch_add(1, Relaxed);
                            let close = frame::close(code::SERVICE_RESTART, REBALANCE_REASON);
                            let _ = close_client(&mut c, &close).await;
                            return self.finish(Some(code::GOING_AWAY), "client moved by rebalancing", "rebalanced", Some(code::SERVICE_RESTART)).await;
                        }
                        FromBackend::Shed => {
                            self.lose(code::SERVICE_RESTART, "moved by rebalancing".into(), ResumeCause::Rebalance);
                            redial_at = Some(Instant::now());
                        }
                        FromBackend::Close(code, reason) if !(cfg.resume && moves(code)) => {
                            // Passed through as the backend said it.
                            let bytes = if code == 1005 { frame::encode(frame::OP_CLOSE, b"") } else { frame::close(code, &reason) };
                            let _ = send(&mut c, &bytes).await;
                            let _ = c.shutdown().await;
                            if let Some(l) = &mut self.leg {
                                // Let tungstenite answer the Close.
                                let _ = tokio::time::timeout(Duration::from_secs(1), l.ws.flush()).await;
                            }
                            return Out { end: "backend_close", code: Some(code) };
                        }
                        FromBackend::Close(code, reason) => {
                            self.lose(code, format!("backend closed with {code} {reason}"), ResumeCause::Close);
                            redial_at = Some(Instant::now());
                        }
                        FromBackend::Gone(why) if cfg.resume => {
                            self.lose(code::SERVICE_RESTART, why, ResumeCause::Gone);
                            redial_at = Some(Instant::now());
                        }
                        FromBackend::Down(why) if cfg.resume => {
                            self.lose(code::SERVICE_RESTART, why, ResumeCause::Down);
                            redial_at = Some(Instant::now());
                        }
                        FromBackend::Gone(why) | FromBackend::Down(why) => {
                            let _ = close_client(&mut c, &frame::close(code::INTERNAL, &format!("backend lost: {why}"))).await;
                            return Out { end: "backend_lost", code: Some(code::INTERNAL) };
                        }
                    }
                }
                r = poll_dialing(&mut dialing) => {
                    dialing = None;
                    match r {
                        Ok((ws, guard)) => {
                            redial_at = None;
                            retry = Duration::ZERO;
                            backend_heard = Instant::now();
                            // Boxed: a rare wait (once per resume) whose state would size every session's task.
                            if let Err(e) = Box::pin(self.resumed(Upstream::new(ws, guard, true, true))).await {
                                self.lose(code::SERVICE_RESTART, e, ResumeCause::Gone);
                                redial_at = Some(Instant::now() + Duration::from_millis(50));
                                continue;
                            }
                            if let Some(text) = &cfg.on_resume {
                                if send(&mut c, &frame::encode(frame::OP_TEXT, text.as_bytes())).await.is_err() {
                                    return Box::pin(self.salvage(&mut c, &mut reader, &mut bucket)).await;
                                }
                            }
                        }
                        Err(e) => {
                            debug!(error = %e, "resume: no backend yet");
                            // 50 ms, doubling to 1 s, until resume_timeout.
                            retry = (retry * 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
                            redial_at = Some(Instant::now() + retry);
                        }
                    }
                }
                _ = sleep_until(lost_deadline) => {}
                _ = keepalive.tick() => {
                    let now = Instant::now();
                    if now.duration_since(client_heard) > cfg.ping_interval + cfg.pong_timeout {
                        let _ = close_client(&mut c, &frame::close(code::GOING_AWAY, "no answer to pings")).await;
                        return self.finish(Some(code::GOING_AWAY), "client silent", "pong_timeout", Some(code::GOING_AWAY)).await;
                    }
                    if send(&mut c, &frame::encode(frame::OP_PING, b"")).await.is_err() {
                        return Box::pin(self.salvage(&mut c, &mut reader, &mut bucket)).await;
                    }
                    if let Some(l) = &mut self.leg {
                        if now.duration_since(backend_heard) > cfg.ping_interval + cfg.pong_timeout {
                            if cfg.resume {
                                self.lose(code::SERVICE_RESTART, "backend silent: no answer to pings".into(), ResumeCause::Gone);
                                redial_at = Some(now);
                            } else {
                                let _ = close_client(&mut c, &frame::close(code::INTERNAL, "backend silent: no answer to pings")).await;
                                return Out { end: "backend_lost", code: Some(code::INTERNAL) };
                            }
                        } else if l.ws.send(Message::Ping(Default::default())).await.is_err() && cfg.resume {
                            self.lose(code::SERVICE_RESTART, "backend gone".into(), ResumeCause::Gone);
                            redial_at = Some(now);
                        }
                    }
                }
                e = &mut ended => match e {
                    Ended::Shutdown => {
                        let _ = close_client(&mut c, &frame::close(code::GOING_AWAY, "gateway shutting down")).await;
                        return self.finish(Some(code::GOING_AWAY), "gateway shutting down", "shutdown", Some(code::GOING_AWAY)).await;
                    }
                    Ended::RouteGone => {
                        let _ = close_client(&mut c, &frame::close(code::GOING_AWAY, "route removed or changed by a reload")).await;
                        return self.finish(Some(code::GOING_AWAY), "route removed", "drained", Some(code::GOING_AWAY)).await;
                    }
                    Ended::Expired => {
                        let _ = close_client(&mut c, &frame::close(code::POLICY, "token expired")).await;
                        return self.finish(Some(code::GOING_AWAY), "token expired", "token_expired", Some(code::POLICY)).await;
                    }
                },
            }
        }
    }

    /// A client message as the backend gets it: inflated, checked, counted
    /// against the client's rate (as of `now`) and in the stats (and kept
    /// for replay).
    #[inline(always)]
    fn admit(
        &mut self,
        op: u8,
        payload: Vec<u8>,
        compressed: bool,
        bucket: &mut Bucket,
        now: Instant,
    ) -> Result<Message, Refused> {
        let payload = if compressed {
            crate::ws::deflate::inflate(&payload, self.cfg.max_message).map_err(|e| Refused {
                code: e.code(),
                reason: e.to_string().into(),
                end: "protocol",
            })?
        } else {
            payload
        };
        if let Some((tokens, at)) = bucket {
            let rate = f64::from(self.cfg.client_rate.unwrap_or(1));
            let since = now.saturating_duration_since(*at);
            *tokens = (*tokens + since.as_secs_f64() * rate).min(rate);
            *at = now;
            if *tokens < 1.0 {
                return Err(Refused {
                    code: code::POLICY,
                    reason: "message rate limit exceeded".into(),
                    end: "rate_limited",
                });
            }
            *tokens -= 1.0;
        }
        let msg = if op == frame::OP_TEXT {
            // Plain text was checked as it arrived, inflated text is checked here.
            let text = String::from_utf8(payload).map_err(|_| Refused {
                code: code::INVALID_DATA,
                reason: "text message is not UTF-8".into(),
                end: "protocol",
            })?;
            Message::text(text)
        } else {
            Message::binary(payload)
        };
        self.up += 1;
        self.stats.messages_up.fetch_add(1, Relaxed);
        self.stats
            .bytes_up
            .fetch_add(payload_len(&msg) as u64, Relaxed);
        if self.cfg.resume && self.preamble.len() < self.cfg.replay_first {
            self.preamble.push(msg.clone());
        }
        Ok(msg)
    }

    /// Writing to the client failed (it reset, or went), but what it sent
    /// before going may wait unread behind that write, as a splice delivers
    /// it: forward the complete messages already read and those ready now
    /// (a dead connection's queue is finite; at most [`SALVAGE_MAX`] bytes
    /// more), then end. Nothing more is written to the client.
    async fn salvage<C>(&mut self, c: &mut C, reader: &mut Reader, bucket: &mut Bucket) -> Out
    where
        C: AsyncRead + ReadReady + Unpin,
    {
        let mut read = 0;
        loop {
            while let Some(input) = if reader.inbuf.is_empty() {
                None
            } else {
                reader.next_input()
            } {
                match input {
                    Input::Message(op, payload, compressed) => {
                        match self.admit(op, payload, compressed, bucket, Instant::now()) {
                            Ok(msg) => {
                                if self.forward(msg).await.is_some() {
                                    return self.end("resume_buffer_full", None).await;
                                }
                            }
                            Err(r) => return self.end(r.end, None).await,
                        }
                    }
                    Input::Ping(_) => {}
                    Input::Close(code) => {
                        return self
                            .finish(code, "client closed", "client_close", None)
                            .await
                    }
                    Input::Bad(_) => return self.end("protocol", None).await,
                }
            }
            match read_into(c, &mut reader.inbuf).now_or_never() {
                Some(Ok(n @ 1..)) if read < SALVAGE_MAX => read += n,
                _ => {
                    return self
                        .finish(Some(code::GOING_AWAY), "client gone", "io_error", None)
                        .await
                }
            }
        }
    }

    /// Relays what the backend sends within [`ANSWER_GRACE`] (the answer to
    /// the client's last message), up to the first pause of 50 ms after it.
    async fn answers_first<C: AsyncWrite + Unpin>(&mut self, c: &mut C) {
        if let Some(l) = self.leg.as_mut().filter(|_| self.unflushed) {
            let _ = l.ws.flush().await;
        }
        let mut wait = ANSWER_GRACE;
        while let Some(l) = &mut self.leg {
            let Ok(Some(Ok(m))) = tokio::time::timeout(wait, l.ws.next()).await else {
                return;
            };
            match &m {
                Message::Text(_) | Message::Binary(_) => {}
                Message::Close(_) => return,
                _ => continue,
            }
            let mut out = BytesMut::new();
            self.push_down(&mut out, &m);
            if send(c, &out).await.is_err() {
                return;
            }
            wait = Duration::from_millis(50);
        }
    }

    /// Counts a backend message and appends its frame for the client to `out`.
    fn push_down(&mut self, out: &mut BytesMut, m: &Message) {
        let (op, bytes) = match m {
            Message::Text(t) => (frame::OP_TEXT, t.as_bytes()),
            Message::Binary(b) => (frame::OP_BINARY, &b[..]),
            _ => return,
        };
        self.down += 1;
        self.stats.messages_down.fetch_add(1, Relaxed);
        self.stats.bytes_down.fetch_add(bytes.len() as u64, Relaxed);
        match self
            .deflate
            .then(|| crate::ws::deflate::compress(bytes))
            .flatten()
        {
            Some(z) => frame::append(out, op, &z, true),
            None => frame::append(out, op, bytes, false),
        }
    }

    /// Sends a client message on, or holds it while no backend is there.
    /// `Some(code)` when the hold is full.
    async fn forward(&mut self, msg: Message) -> Option<u16> {
        if let Some(l) = &mut self.leg {
            // Fed, not flushed: the batch is flushed once it is all in.
            let Err(e) = l.ws.feed(msg.clone()).await else {
                self.unflushed = true;
                return None;
            };
            if !self.cfg.resume {
                // The backend's own Close or EOF is read next and ends the session.
                debug!(error = %e, "sending to the backend failed");
                return None;
            }
            self.lose(
                code::SERVICE_RESTART,
                format!("sending to the backend: {e}"),
                ResumeCause::Gone,
            );
        }
        if !self.cfg.resume {
            return None;
        }
        let len = payload_len(&msg);
        if self.held_bytes + len > self.cfg.resume_buffer {
            return Some(code::TRY_AGAIN_LATER);
        }
        self.held_bytes += len;
        self.held.push_back(msg);
        None
    }

    /// The backend leg is gone: keep the session, remember why.
    ///
    /// Not async: a wait here would size every session's task (each client
    /// message's path can lose the leg), so a goodbye to a backend that is
    /// still there runs on its own short task.
    fn lose(&mut self, code: u16, reason: String, cause: ResumeCause) {
        let mut from = None;
        if let Some(mut l) = self.leg.take() {
            info!(backend = %l.guard.backend().url, cause = cause.label(), reason, "backend leg lost; resuming");
            from = Some(l.guard.backend().clone());
            if cause != ResumeCause::Gone {
                // Still there (it asked to go, or is being left): say goodbye,
                // for at most 200 ms; the leg (and its backend's count) goes then.
                let frame = CloseFrame {
                    code: CloseCode::Away,
                    reason: "session moved".into(),
                };
                tokio::spawn(async move {
                    let bye = l.ws.close(Some(frame));
                    let _ = tokio::time::timeout(Duration::from_millis(200), bye).await;
                });
            }
        }
        self.lost.get_or_insert(Lost {
            code,
            reason,
            since: Instant::now(),
            from,
            cause,
        });
    }

    /// A new backend leg: the preamble, then what was held, then on.
    async fn resumed(&mut self, mut up: Upstream) -> Result<(), String> {
        for m in &self.preamble {
            up.ws.feed(m.clone()).await.map_err(|e| e.to_string())?;
        }
        // Preamble messages are not held twice: the hold has only later ones.
        while let Some(m) = self.held.pop_front() {
            self.held_bytes -= payload_len(&m);
            if let Err(e) = up.ws.feed(m.clone()).await {
                self.held.push_front(m);
                self.held_bytes += payload_len(&self.held[0]);
                return Err(e.to_string());
            }
        }
        up.ws.flush().await.map_err(|e| e.to_string())?;
        let lost = self.lost.take();
        let gap = lost.as_ref().map(|l| l.since.elapsed());
        self.resumes += 1;
        if let Some(l) = &lost {
            self.stats.resumes[l.cause as usize].fetch_add(1, Relaxed);
            self.stats.resume_gap.observe(l.since.elapsed());
        }
        info!(backend = %up.guard.backend().url, gap_ms = gap.map(|g| g.as_millis() as u64), "session resumed");
        self.leg = Some(up);
        Ok(())
    }

    /// Closes the backend leg (with `code`, or 1000, saying `why`): the
    /// closing handshake, our Close and then, once the client's messages
    /// went to it, the backend's answer, reading (and dropping) what it
    /// sent before it, at most 1 s in all (not its FIN: nothing can follow
    /// its Close). Dropped with that still unread, the socket would end
    /// with a reset, and a backend busy answering could lose the client's
    /// last messages it had not yet read, and see a reset, not the Close.
    async fn close_backend(&mut self, code: Option<u16>, why: &str) {
        if let Some(l) = &mut self.leg {
            let frame = CloseFrame {
                code: CloseCode::from(code.unwrap_or(code::NORMAL)),
                reason: why.to_string().into(),
            };
            // Without a message of this client forwarded, there is
            // nothing of its the backend could lose: our Close suffices.
            let answer = self.up > 0;
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                if l.ws.close(Some(frame)).await.is_ok() && answer {
                    // Up to the backend's Close: nothing follows it but its FIN.
                    while let Some(Ok(m)) = l.ws.next().await {
                        if m.is_close() {
                            break;
                        }
                    }
                }
            })
            .await;
        }
    }

    /// Closes the backend leg and ends the session as `end`, the client
    /// having been closed with `code` (if at all).
    async fn finish(
        &mut self,
        backend_code: Option<u16>,
        why: &str,
        end: &'static str,
        code: Option<u16>,
    ) -> Out {
        self.close_backend(backend_code, why).await;
        Out { end, code }
    }

    /// Ends after a client error: the backend is told the client went away.
    async fn end(&mut self, end: &'static str, code: Option<u16>) -> Out {
        self.finish(Some(code::GOING_AWAY), "client closed", end, code)
            .await
    }
}

/// Sends the client our Close and half-closes: the connection's end is then
/// a clean FIN, whatever the client still sends (its Close reply) is not
/// answered with a reset.
async fn close_client<C: AsyncWrite + Unpin>(c: &mut C, close: &[u8]) -> io::Result<()> {
    send(c, close).await?;
    c.shutdown().await
}

/// Writes a whole frame to the client.
async fn send<C: AsyncWrite + Unpin>(c: &mut C, bytes: &[u8]) -> io::Result<()> {
    c.write_all(bytes).await?;
    c.flush().await
}

/// A dial for a new backend leg in progress.
type Dialing = Pin<
    Box<
        dyn Future<Output = Result<(BackendWs, BackendGuard), crate::backend::BackendError>> + Send,
    >,
>;

/// The dial's outcome (never without one).
async fn poll_dialing(
    d: &mut Option<Dialing>,
) -> Result<(BackendWs, BackendGuard), crate::backend::BackendError> {
    match d {
        Some(f) => f.as_mut().await,
        None => std::future::pending().await,
    }
}

/// What the backend's stream yielded, in the session's terms.
fn classify(m: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> FromBackend {
    match m {
        Some(Ok(Message::Close(f))) => match f {
            Some(f) => FromBackend::Close(u16::from(f.code), f.reason.to_string()),
            None => FromBackend::Close(1005, String::new()),
        },
        Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => FromBackend::Message(m),
        Some(Ok(_)) => FromBackend::Nothing,
        Some(Err(e)) => FromBackend::Gone(e.to_string()),
        None => FromBackend::Gone("connection closed".into()),
    }
}

thread_local! {
    /// Where a session whose buffer is released reads first (see `read_into`).
    static SCRATCH: std::cell::RefCell<Box<[u8; READ]>> = std::cell::RefCell::new(Box::new([0; READ]));
}

/// Reads what the client sent into `buf` (the reader's buffer). An idle
/// session holds no buffer: a plain socket is read only once readable, and
/// a session whose buffer was released (every TLS session at rest: TLS
/// cannot tell readiness without reading) reads into this thread's scratch
/// buffer and copies what came, so waiting costs nothing.
async fn read_into<C: AsyncRead + ReadReady + Unpin>(
    c: &mut C,
    buf: &mut Vec<u8>,
) -> io::Result<usize> {
    std::future::poll_fn(|cx| c.poll_read_ready(cx)).await?;
    if buf.capacity() > 0 {
        buf.reserve(READ);
        return c.read_buf(buf).await;
    }
    std::future::poll_fn(|cx| {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let mut rb = tokio::io::ReadBuf::new(&mut s[..]);
            match Pin::new(&mut *c).poll_read(cx, &mut rb) {
                std::task::Poll::Ready(Ok(())) => {
                    buf.extend_from_slice(rb.filled());
                    std::task::Poll::Ready(Ok(rb.filled().len()))
                }
                std::task::Poll::Ready(Err(e)) => std::task::Poll::Ready(Err(e)),
                std::task::Poll::Pending => std::task::Poll::Pending,
            }
        })
    })
    .await
}

/// The backend leg's next event: one set aside by a batch first (never
/// without a leg).
async fn next_from(leg: &mut Option<Upstream>, stash: &mut Option<FromBackend>) -> FromBackend {
    if let Some(s) = stash.take() {
        return s;
    }
    let Some(l) = leg else {
        return std::future::pending().await;
    };
    tokio::select! {
        // First: it costs nothing until one of its waits fired.
        biased;
        g = &mut l.gone => g,
        m = l.ws.next() => classify(m),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
