//! `mode: frames`: a 1:1 session where upgate speaks WebSocket on both legs.
//!
//! The client leg is upgate's own endpoint (the `ws::reader` that fan-out
//! clients use: masking, control frames, UTF-8 as it arrives, close codes,
//! `max_message`); the backend leg is a tokio-tungstenite client. Messages
//! move one at a time, in order, text as text; close codes and reasons
//! pass through both ways. Because upgate holds whole messages, it can do
//! what a splice cannot: with `resume: true`, when the backend leg ends
//! without the client asking (EOF or reset without a Close; Close 1001,
//! 1012, 1013 or 1014; the backend marked down by health checks, drained
//! or removed by a reload), it dials the next backend the balancer offers,
//! replays the session's preamble (its first `replay_first` client
//! messages), sends what the client said meanwhile, and goes on. The
//! client sees no close.
//!
//! Delivery: the preamble is at-least-once (each new backend gets it
//! again); other client messages are delivered once, or held during a gap
//! (up to `resume_buffer` bytes, then 1013) and sent after the preamble;
//! what a backend sent that had not reached upgate when it died is lost
//! (at-most-once) unless the application replays it.

mod session;

pub use session::spawn;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use crate::backend::pool::{Backend, BackendGuard, Pool};
use crate::backend::upstream::BackendIo;
use crate::backend::BackendError;

/// The backend leg of a frames session.
pub type BackendWs = WebSocketStream<Gulp<BackendIo>>;

/// The backend socket as the backend leg's WebSocket reads it. tungstenite
/// reads at most its read buffer (512 B here, kept small: every idle
/// session holds one) per call; this reads the socket in `BUF_SIZE` gulps
/// into a buffer borrowed from the splice's per-thread pool and hands it
/// out, giving the buffer back once drained (or when the socket has
/// nothing). So a 64 KiB message costs two or three reads, not 64, and a
/// quiet session holds no gulp buffer. Writes pass through.
pub struct Gulp<S> {
    io: S,
    /// A gulp not yet handed out: the buffer and the unread range.
    held: Option<(crate::buffers::Buf, usize, usize)>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Gulp<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.held.is_none() {
            let mut buf = crate::buffers::Buf::take();
            let mut rb = ReadBuf::new(buf.bytes());
            // Pending or an error: the buffer goes back to the pool here.
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(())); // EOF
            }
            this.held = Some((buf, 0, n));
        }
        if let Some((buf, pos, len)) = &mut this.held {
            let k = (*len - *pos).min(out.remaining());
            out.put_slice(&buf.bytes()[*pos..*pos + k]);
            *pos += k;
            if *pos == *len {
                this.held = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gulp<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, b)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, b)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Builds the upgrade request head for a backend with a given key.
pub type HeadFor = Box<dyn Fn(&Backend, &str) -> Option<Vec<u8>> + Send + Sync>;

/// How to open a new backend leg for a session (its route, its request).
pub struct Redial {
    pub pool: Arc<Pool>,
    /// The upgrade request head for `backend`, with the given
    /// `Sec-WebSocket-Key`; `None` when no path can be built for it.
    pub head: HeadFor,
    /// The request's hash key (`balance: hash`): a resumed session goes
    /// where any upgate instance would send it.
    pub hash_key: Option<u64>,
    /// The subprotocol the first backend selected; a new backend must select the same.
    pub protocol: Option<HeaderValue>,
    pub handshake_timeout: Duration,
    pub max_header_bytes: usize,
    pub tcp_keepalive: Duration,
}

/// The backend leg's WebSocket settings: a small read buffer (most sessions
/// are idle, and the socket is read in large gulps by [`Gulp`]); writes collect up to 64 KiB until the session flushes a whole
/// batch of client messages at once; messages up to 64 MiB.
pub fn backend_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(512)
        .write_buffer_size(64 << 10)
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

/// Wraps a backend socket that answered 101 (`rest`: bytes it sent right
/// behind its head) as the backend leg.
pub async fn backend_leg(io: BackendIo, rest: Bytes) -> BackendWs {
    let io = Gulp { io, held: None };
    WebSocketStream::from_partially_read(io, rest.to_vec(), Role::Client, Some(backend_config()))
        .await
}

/// Opens a new backend leg: the balancer's order (or, for a rebalancing
/// move, the least loaded first), `avoid` (the backend just left) last,
/// each tried once.
pub async fn dial(
    r: &Redial,
    avoid: Option<&Backend>,
    least_loaded: bool,
) -> Result<(BackendWs, BackendGuard), BackendError> {
    let mut order: Vec<Arc<Backend>> = r.pool.try_order(r.hash_key).collect();
    if order.is_empty() {
        // Every backend is down or ejected (by the very failures that
        // started this resume, often): a live session tries them anyway.
        order = r
            .pool
            .backends()
            .backends
            .iter()
            .filter(|b| !b.drain)
            .cloned()
            .collect();
    }
    if least_loaded {
        order.sort_by_key(|b| b.active());
    }
    if let Some(a) = avoid {
        order.sort_by_key(|b| std::ptr::eq(&**b, a));
    }
    let mut last = BackendError::Protocol("no backend is available");
    for b in order.into_iter().take(r.pool.max_attempts.max(2)) {
        let key = crate::ws::new_key();
        let Some(head) = (r.head)(&b, &key) else {
            continue;
        };
        let attempt = async {
            // Paced: see `Pool::resume_dials` (never closed, so never an error).
            let _slot = r.pool.resume_dials.acquire().await;
            let mut io = r.pool.connect(&b).await?;
            let answer = crate::backend::upgrade::exchange(
                &mut io,
                &head,
                r.handshake_timeout,
                r.max_header_bytes,
            )
            .await?;
            Ok::<_, BackendError>((io, answer))
        };
        match attempt.await {
            Ok((io, answer)) => {
                let accept =
                    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                let h = &answer.headers;
                let why = if answer.status != StatusCode::SWITCHING_PROTOCOLS {
                    Some("the backend refused the upgrade")
                } else if h
                    .get(header::SEC_WEBSOCKET_ACCEPT)
                    .is_none_or(|a| a.as_bytes() != accept.as_bytes())
                {
                    Some("the backend's Sec-WebSocket-Accept does not match")
                } else if h.get(header::SEC_WEBSOCKET_PROTOCOL) != r.protocol.as_ref() {
                    Some("the backend selected another subprotocol")
                } else {
                    None
                };
                if let Some(why) = why {
                    r.pool.note_outcome(&b, !answer.status.is_server_error());
                    last = BackendError::Protocol(why);
                    continue;
                }
                crate::backend::upstream::keepalive(io.tcp().into(), r.tcp_keepalive);
                r.pool.note_outcome(&b, true);
                return Ok((backend_leg(io, answer.rest).await, BackendGuard::new(b)));
            }
            Err(e) => {
                if !e.is_local() {
                    r.pool.note_outcome(&b, false);
                }
                last = e;
            }
        }
    }
    Err(last)
}
