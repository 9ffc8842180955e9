//! One fan-out client: write what the channel published (already framed,
//! shared `Bytes`, up to [`BATCH`] frames per vectored write), read the
//! client's frames (close, ping, pong, messages to forward), keep it alive
//! with pings, and apply the slow-client policy.
//!
//! The client's queue is its position in the channel's broadcast ring plus
//! at most [`BATCH`] frames being written, so its memory is bounded whatever
//! it does; a client that stops reading stops being polled for messages
//! and falls behind in the ring, where the policy catches it.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{protocol::frame::Utf8Bytes, Message};
use tokio_util::sync::CancellationToken;

use super::direct::{Member, Slot};
use super::{Channel, Hub};
use crate::config::{ClientMessages, SlowClient};
use crate::session::splice::ReadReady;
use crate::ws::frame::{self, code, FrameError};
use crate::ws::reader::{Input, Reader};

/// Frames written per vectored write at most (and queued beside the ring).
const BATCH: usize = 64;
/// Delivery counts are added to the route's counters this often.
const FLUSH_STATS: u64 = 1024;
/// How long a client that broke the protocol right after forwarding a
/// message may still receive what the channel publishes (the upstream's
/// answer, for an echo or request/response feed) before its Close.
const ANSWER_GRACE: Duration = Duration::from_millis(500);

pub(super) struct Cx<'a> {
    pub hub: &'a Hub,
    pub ch: &'a Channel,
    pub stop: &'a CancellationToken,
    /// The route was removed by a reload and its drain period is over.
    pub retired: &'a CancellationToken,
    /// The client negotiated permessage-deflate.
    pub deflate: bool,
    /// When the client's token expires (`on_expiry: close`).
    pub expires: Option<std::time::SystemTime>,
}

/// How a client's session ended, for the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// The client sent a Close.
    ClientClose,
    /// The client's connection ended without a Close.
    Eof,
    IoError,
    /// Broke the protocol (bad frame, bad UTF-8, too big).
    Protocol,
    /// Fell `max_lag` behind under `slow_client: disconnect`.
    Slow,
    RateLimited,
    PongTimeout,
    Shutdown,
    /// The route was removed by a reload.
    Drained,
    /// The channel's task died.
    ChannelFailed,
    /// The client's token expired (`auth: { jwt: { on_expiry: close } }`).
    TokenExpired,
}

impl End {
    pub fn label(self) -> &'static str {
        match self {
            End::ClientClose => "client_close",
            End::Eof => "eof",
            End::IoError => "io_error",
            End::Protocol => "protocol_error",
            End::Slow => "slow_client",
            End::RateLimited => "rate_limited",
            End::PongTimeout => "pong_timeout",
            End::Shutdown => "shutdown",
            End::Drained => "drained",
            End::ChannelFailed => "channel_failed",
            End::TokenExpired => "token_expired",
        }
    }
}

pub(super) struct Outcome {
    pub end: End,
    pub delivered: u64,
    pub dropped: u64,
    /// The close code sent (or echoed) to the client.
    pub close_code: Option<u16>,
    pub error: Option<io::Error>,
}

/// What reading the client produced.
enum Event {
    /// Frames were written while the queue was full (receive more), or
    /// the queue emptied or took a pong while direct delivery is possible
    /// (the loop hands over or takes back).
    Wrote,
    /// A whole data message: opcode, payload, compressed (RSV1 on its first frame).
    Message(u8, Vec<u8>, bool),
    Close(Option<u16>),
    Eof,
    Io(io::Error),
    Bad(FrameError),
}

/// The client's socket with its write queue and read buffer.
struct Conn<S> {
    io: S,
    out: VecDeque<Bytes>,
    /// The channel's task writes to the socket (the client is direct):
    /// nothing is written here, and a pong to send ends the poll.
    hold: bool,
    /// The channel's task may write to the socket once the queue is empty:
    /// writing the last of it ends the poll, so the task can hand over.
    may_go_direct: bool,
    /// The client's frames, parsed and assembled into messages.
    reader: Reader,
}

impl<S: AsyncRead + AsyncWrite + ReadReady + Unpin> Conn<S> {
    /// Writes queued frames; `Ok(true)` once all are written.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut wrote = false;
        while !self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); BATCH];
            let n = self.out.len().min(BATCH);
            for (s, b) in slices.iter_mut().zip(self.out.iter()) {
                *s = IoSlice::new(b);
            }
            match Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..n]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(mut k)) => {
                    wrote = true;
                    while k > 0 {
                        let Some(front) = self.out.front_mut() else {
                            break;
                        };
                        if k >= front.len() {
                            k -= front.len();
                            self.out.pop_front();
                        } else {
                            front.advance(k);
                            k = 0;
                        }
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        if wrote || self.out.is_empty() {
            // TLS streams hold records until flushed; plain TCP flushes for free.
            if let Poll::Ready(Err(e)) = Pin::new(&mut self.io).poll_flush(cx) {
                return Poll::Ready(Err(e));
            }
        }
        if wrote && self.out.len() < BATCH {
            return Poll::Ready(Ok(self.out.is_empty()));
        }
        Poll::Pending
    }

    /// Drives writing and reading until something needs the task's attention.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let full = self.out.len() >= BATCH;
        if !self.hold {
            match self.poll_write_out(cx) {
                Poll::Ready(Err(e)) => return Poll::Ready(Event::Io(e)),
                Poll::Ready(Ok(_)) if full => return Poll::Ready(Event::Wrote),
                Poll::Ready(Ok(true)) if self.may_go_direct => return Poll::Ready(Event::Wrote),
                _ => {}
            }
        }
        loop {
            while let Some(input) = self.reader.next_input() {
                match input {
                    Input::Ping(p) => {
                        // Answered with the next write; a client flooding pings gets fewer pongs.
                        if self.out.len() < 2 * BATCH {
                            self.out.push_back(frame::encode(frame::OP_PONG, &p));
                            if self.hold {
                                // The task leaves direct delivery before writing it.
                                return Poll::Ready(Event::Wrote);
                            }
                        }
                    }
                    Input::Message(op, p, z) => return Poll::Ready(Event::Message(op, p, z)),
                    Input::Close(code) => return Poll::Ready(Event::Close(code)),
                    Input::Bad(e) => return Poll::Ready(Event::Bad(e)),
                }
            }
            match self.io.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Event::Io(e)),
                Poll::Pending => return Poll::Pending,
            }
            let mut tmp = [0u8; 4096];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Event::Eof),
                Poll::Ready(Ok(())) => self.reader.inbuf.extend_from_slice(rb.filled()),
                Poll::Ready(Err(e)) => return Poll::Ready(Event::Io(e)),
                Poll::Pending => return Poll::Pending,
            }
            // Pongs queued for pings go out with the next write.
            if !self.out.is_empty() && !self.hold {
                if let Poll::Ready(Err(e)) = self.poll_write_out(cx) {
                    return Poll::Ready(Event::Io(e));
                }
            }
        }
    }

    /// Queues `last`, writes what is queued (for at most `limit`), and half-closes.
    async fn finish(&mut self, last: Option<Bytes>, limit: Duration) {
        self.out.extend(last);
        let _ = tokio::time::timeout(limit, async {
            // Nothing left to send (a client that just went away): close at once.
            poll_fn(|cx| loop {
                if self.out.is_empty() {
                    return Poll::Ready(());
                }
                match self.poll_write_out(cx) {
                    Poll::Ready(Ok(true)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Ready(Ok(false)) => continue,
                    Poll::Pending => return Poll::Pending,
                }
            })
            .await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}

/// Takes the client back from direct delivery, if it is direct: what the
/// channel's task did not write goes first (before a pong queued since), the
/// ring from right after it.
fn take_back<S>(
    member: &mut Option<Member<'_>>,
    ch: &Channel,
    c: &mut Conn<S>,
    rx: &mut broadcast::Receiver<Bytes>,
    out: &mut Outcome,
    unflushed: &mut u64,
) {
    let Some(h) = member.take().and_then(|m| m.leave(&ch.tx)) else {
        return;
    };
    // Written whole by the channel's task, which counted them for the route.
    out.delivered += h.delivered;
    let queued = h.out.len() as u64;
    out.delivered += queued;
    *unflushed += queued;
    for b in h.out.into_iter().rev() {
        c.out.push_front(b);
    }
    *rx = h.rx;
}

/// Waits up to `limit` for the channel's next message and queues it with
/// whatever follows it at once; returns how many were queued.
async fn answers_first<S>(
    c: &mut Conn<S>,
    rx: &mut broadcast::Receiver<Bytes>,
    limit: Duration,
) -> u64 {
    let Ok(Ok(first)) = tokio::time::timeout(limit, rx.recv()).await else {
        return 0;
    };
    c.out.push_back(first);
    let mut n = 1;
    while c.out.len() < BATCH {
        match rx.try_recv() {
            Ok(b) => {
                c.out.push_back(b);
                n += 1;
            }
            Err(_) => break,
        }
    }
    n
}

/// A token bucket for forwarded messages: `rate` per second, burst `rate`.
struct Bucket {
    tokens: f64,
    rate: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Runs one client until it leaves, is dropped, or the gateway stops.
/// With `direct` (its plain TCP socket, which `io` reads too), the client
/// is written by the channel's task whenever it has caught up (`direct`).
pub(super) async fn run<S: AsyncRead + AsyncWrite + ReadReady + Unpin>(
    io: S,
    pending: Bytes,
    mut rx: broadcast::Receiver<Bytes>,
    replay: Vec<Bytes>,
    cx: Cx<'_>,
    direct: Option<Arc<TcpStream>>,
) -> Outcome {
    let cfg = &cx.hub.cfg;
    let stats = &cx.hub.stats;
    let mut c = Conn {
        io,
        out: replay.into(),
        hold: false,
        may_go_direct: direct.is_some(),
        reader: Reader::new(pending.to_vec(), cfg.max_message, cx.deflate),
    };
    let mut out = Outcome {
        end: End::Eof,
        delivered: c.out.len() as u64,
        dropped: 0,
        close_code: None,
        error: None,
    };
    let mut unflushed = out.delivered;
    let mut bucket = Bucket {
        tokens: f64::from(cfg.client_rate),
        rate: f64::from(cfg.client_rate),
        at: Instant::now(),
    };
    let lag_check = cfg.max_lag.min(BATCH);
    let mut last_heard = Instant::now();
    let mut pinged = false;
    // When the client last had a message forwarded upstream.
    let mut forwarded_at: Option<Instant> = None;
    let keepalive = tokio::time::sleep(cfg.ping_interval);
    tokio::pin!(keepalive);
    // What ends the client besides itself and the channel: registered once,
    // and polled only when one of its waits fired (`Woken`), not on every
    // delivery (a token's wait takes its token's lock each time it is polled).
    let ended = std::pin::pin!(async {
        tokio::select! {
            biased;
            _ = cx.stop.cancelled() => (End::Shutdown, code::GOING_AWAY, "gateway shutting down"),
            _ = cx.ch.failed.cancelled() => (End::ChannelFailed, code::INTERNAL, "the channel failed; reconnect"),
            _ = crate::session::expiry(cx.expires) => (End::TokenExpired, code::POLICY, "token expired"),
            _ = cx.retired.cancelled() => (End::Drained, code::GOING_AWAY, "route removed or changed by a reload"),
        }
    });
    let mut ended = crate::session::Woken::new(ended);
    // Set while the channel's task writes to the client.
    let mut member: Option<Member<'_>> = None;
    // The client's place in direct delivery, kept from one entry to the next.
    let direct = direct.map(|sock| (sock, Arc::new(Slot::default())));
    let mut handed_back = false;

    let last: Option<Bytes> = loop {
        if member.is_some() && (handed_back || !c.out.is_empty()) {
            // Handed back by the channel's task, or something of its own to write.
            take_back(
                &mut member,
                cx.ch,
                &mut c,
                &mut rx,
                &mut out,
                &mut unflushed,
            );
            handed_back = false;
        } else if member.is_none() && c.out.is_empty() {
            if let Some((sock, slot)) = &direct {
                member = cx.ch.direct.try_enter(sock, &rx, slot);
            }
        }
        c.hold = member.is_some();
        let room = c.out.len() < BATCH;
        tokio::select! {
            biased;
            (e, close, reason) = &mut ended => {
                out.end = e;
                out.close_code = Some(close);
                break Some(frame::close(close, reason));
            }
            () = async {
                if let Some(m) = &member {
                    m.handed_back().await;
                }
            }, if member.is_some() => handed_back = true,
            r = rx.recv(), if room && member.is_none() => {
                let mut got = 0u64;
                let mut lagged = match r {
                    Ok(b) => {
                        c.out.push_back(b);
                        got += 1;
                        0
                    }
                    Err(RecvError::Lagged(n)) => n,
                    Err(RecvError::Closed) => {
                        out.end = End::Shutdown;
                        out.close_code = Some(code::GOING_AWAY);
                        break Some(frame::close(code::GOING_AWAY, "channel closed"));
                    }
                };
                let disconnect = cfg.slow_client == SlowClient::Disconnect;
                while c.out.len() < BATCH && !(disconnect && lagged > 0) {
                    match rx.try_recv() {
                        Ok(b) => {
                            c.out.push_back(b);
                            got += 1;
                        }
                        // Under `disconnect` nothing after a gap is sent (the loop stops).
                        Err(TryRecvError::Lagged(n)) => lagged += n,
                        Err(_) => break,
                    }
                }
                out.delivered += got;
                unflushed += got;
                // Behind by a batch or more: measure the lag (it takes the ring's lock).
                if lagged == 0 && c.out.len() >= lag_check && rx.len() > cfg.max_lag {
                    lagged = (rx.len() - cfg.max_lag) as u64;
                    if cfg.slow_client == SlowClient::DropOldest {
                        for _ in 0..lagged {
                            if rx.try_recv().is_err() {
                                break;
                            }
                        }
                    }
                }
                if lagged > 0 {
                    if disconnect {
                        stats.slow_disconnects.fetch_add(1, Ordering::Relaxed);
                        cx.ch.counts.slow_disconnects.fetch_add(1, Ordering::Relaxed);
                        out.end = End::Slow;
                        out.close_code = Some(code::POLICY);
                        let reason = format!("too slow: fell more than {} messages behind", cfg.max_lag);
                        break Some(frame::close(code::POLICY, &reason));
                    }
                    out.dropped += lagged;
                    stats.dropped.fetch_add(lagged, Ordering::Relaxed);
                    cx.ch.counts.dropped.fetch_add(lagged, Ordering::Relaxed);
                }
                if unflushed >= FLUSH_STATS {
                    stats.delivered.fetch_add(unflushed, Ordering::Relaxed);
                    unflushed = 0;
                }
            }
            ev = poll_fn(|cx| c.poll_io(cx)) => {
                if c.reader.heard {
                    c.reader.heard = false;
                    last_heard = Instant::now();
                    pinged = false;
                }
                match ev {
                    Event::Wrote => {}
                    Event::Message(op, payload, compressed) => {
                        let payload = if compressed {
                            match crate::ws::deflate::inflate(&payload, cfg.max_message) {
                                Ok(p) => p,
                                Err(e) => {
                                    let code = e.code();
                                    out.end = End::Protocol;
                                    out.close_code = Some(code);
                                    break Some(frame::close(code, &e.to_string()));
                                }
                            }
                        } else {
                            payload
                        };
                        // Plain text was checked as it arrived; inflated text is checked here.
                        let msg = if op == frame::OP_TEXT {
                            match Utf8Bytes::try_from(payload) {
                                Ok(t) => Message::Text(t),
                                Err(_) => {
                                    out.end = End::Protocol;
                                    out.close_code = Some(code::INVALID_DATA);
                                    break Some(frame::close(code::INVALID_DATA, "text message is not UTF-8"));
                                }
                            }
                        } else {
                            Message::Binary(payload.into())
                        };
                        if cfg.client_messages == ClientMessages::Ignore {
                            continue;
                        }
                        if !bucket.take() {
                            out.end = End::RateLimited;
                            out.close_code = Some(code::POLICY);
                            break Some(frame::close(code::POLICY, "message rate limit exceeded"));
                        }
                        // A full upstream queue drops the message rather than stall everyone.
                        if cx.ch.to_upstream.try_send(msg).is_err() {
                            stats.forward_dropped.fetch_add(1, Ordering::Relaxed);
                        } else {
                            forwarded_at = Some(Instant::now());
                        }
                    }
                    Event::Close(code) => {
                        out.end = End::ClientClose;
                        let echo = code.unwrap_or(code::NORMAL);
                        out.close_code = Some(echo);
                        break Some(frame::close(echo, ""));
                    }
                    Event::Eof => {
                        out.end = End::Eof;
                        break None;
                    }
                    Event::Io(e) => {
                        out.end = End::IoError;
                        out.error = Some(e);
                        break None;
                    }
                    Event::Bad(e) => {
                        out.end = End::Protocol;
                        out.close_code = Some(e.code());
                        // Nothing more is read; answers to what the client
                        // forwarded just before may still go out first.
                        if forwarded_at.is_some_and(|t| t.elapsed() < ANSWER_GRACE) {
                            take_back(&mut member, cx.ch, &mut c, &mut rx, &mut out, &mut unflushed);
                            out.delivered += answers_first(&mut c, &mut rx, ANSWER_GRACE).await;
                        }
                        break Some(frame::close(e.code(), &e.to_string()));
                    }
                }
            }
            () = &mut keepalive => {
                let now = Instant::now();
                if c.reader.heard {
                    c.reader.heard = false;
                    last_heard = now;
                    pinged = false;
                }
                if now >= last_heard + cfg.ping_interval + cfg.pong_timeout {
                    out.end = End::PongTimeout;
                    break None;
                }
                if !pinged && now >= last_heard + cfg.ping_interval {
                    c.out.push_back(frame::encode(frame::OP_PING, b""));
                    pinged = true;
                }
                let next = if pinged {
                    last_heard + cfg.ping_interval + cfg.pong_timeout
                } else {
                    last_heard + cfg.ping_interval
                };
                keepalive.as_mut().reset(next);
            }
        }
    };
    // Whatever was handed back goes out before the Close.
    take_back(
        &mut member,
        cx.ch,
        &mut c,
        &mut rx,
        &mut out,
        &mut unflushed,
    );
    c.hold = false;
    stats.delivered.fetch_add(unflushed, Ordering::Relaxed);
    if out.end != End::IoError && out.end != End::PongTimeout {
        // A peer gets `pong_timeout` to take the rest and the Close (a slow one may need it).
        c.finish(last, cfg.pong_timeout).await;
    }
    out
}
