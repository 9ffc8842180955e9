//! Serving one connection: telling HTTP/2 from HTTP/1.1 without a timer,
//! driving hyper's connection under a watchdog (the first head's deadline
//! for HTTP/2, the idle timeout for both), and graceful shutdown.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;

use super::accept::AcceptCx;
use crate::proxy;
use crate::session::conn::ConnInfo;

/// Whether a plain-TCP client opens with the HTTP/2 preface (`PRI * HTTP/2.0`).
/// No HTTP/1.1 method starts with `PRI`, so three bytes decide.
///
/// Waits on readiness only: when fewer bytes are there than it takes to
/// decide, the peek runs inside `try_io` and answers `WouldBlock`, which
/// clears the readiness seen before the peek, so the next `readable()`
/// waits for new bytes instead of returning at once (no timer, no spin; a
/// byte arriving after the peek sets readiness again and is not missed;
/// the end of the stream stays ready, and decides).
pub(super) async fn is_h2_preface(tcp: &TcpStream) -> std::io::Result<bool> {
    use futures_util::FutureExt;
    use std::io::ErrorKind::WouldBlock;
    let mut buf = [0u8; 3];
    // Usually the request is there already: one peek decides.
    let n = tcp.peek(&mut buf).await?;
    if let Some(h2) = preface_decided(&buf[..n]) {
        return Ok(h2);
    }
    loop {
        let ready = tcp.ready(tokio::io::Interest::READABLE).await?;
        let peeked = tcp.try_io(tokio::io::Interest::READABLE, || {
            let n = tcp
                .peek(&mut buf)
                .now_or_never()
                .unwrap_or(Err(WouldBlock.into()))?;
            preface_decided(&buf[..n]).ok_or_else(|| WouldBlock.into())
        });
        match peeked {
            Ok(h2) => return Ok(h2),
            // The peer closed after a partial `PR`: not HTTP/2; hyper reads the rest.
            Err(e) if e.kind() == WouldBlock && ready.is_read_closed() => return Ok(false),
            Err(e) if e.kind() == WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `Some(true)` for the start of `PRI`, `Some(false)` for anything else
/// (end of stream included: hyper will see it), `None` until it is clear.
fn preface_decided(b: &[u8]) -> Option<bool> {
    match b {
        [] => Some(false),
        [b'P'] | [b'P', b'R'] => None,
        [b'P', b'R', c, ..] => Some(*c == b'I'),
        _ => Some(false),
    }
}

/// Why a connection's watchdog fired.
enum Watch {
    /// No complete first request head by the deadline.
    Deadline,
    /// Nothing in flight for `idle_timeout`.
    Idle,
}

/// Watches one connection. With `deadline` (HTTP/2, where hyper has no
/// head timeout) its first request must arrive by then; HTTP/1.1 gets the
/// same deadline from hyper's own head timer. After its first request a
/// connection may stay idle (no request in flight, no session) for at most
/// `idle` (zero: forever), checked four times per `idle`, so it is closed
/// between 1 and 1.25 × `idle` after its last activity.
///
/// No timer is armed while a request is in flight: the watchdog is polled
/// with its connection (after it, in the same task), so it sees the moment
/// the connection turns idle; a connection that upgrades never arms one.
async fn watchdog(
    info: &ConnInfo,
    deadline: Option<tokio::time::Instant>,
    idle: Duration,
) -> Watch {
    if let Some(deadline) = deadline {
        while info.requests.load(Ordering::Relaxed) == 0 {
            if tokio::time::Instant::now() >= deadline {
                return Watch::Deadline;
            }
            let check = tokio::time::Instant::now() + (idle / 4).max(Duration::from_millis(100));
            tokio::time::sleep_until(deadline.min(check)).await;
        }
    }
    if idle.is_zero() {
        return std::future::pending().await;
    }
    let (mut seen, mut quiet) = (u64::MAX, 0);
    loop {
        // Idle now? (No waker: the connection's own progress polls us again.)
        std::future::poll_fn(|_| {
            let idle_now =
                info.requests.load(Ordering::Relaxed) > 0 && info.busy.load(Ordering::Relaxed) == 0;
            if idle_now {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
        let n = info.requests.load(Ordering::Relaxed);
        if n == seen {
            quiet += 1;
            if quiet >= 4 {
                return Watch::Idle;
            }
        } else {
            (seen, quiet) = (n, 0);
        }
        tokio::time::sleep(idle / 4).await;
        if info.busy.load(Ordering::Relaxed) > 0 {
            (seen, quiet) = (u64::MAX, 0);
        }
    }
}

/// Drives a hyper connection until it ends, under its watchdog; on
/// shutdown (or idleness) asks it to finish gracefully and keeps polling
/// it, until the hard stop.
macro_rules! drive {
    ($cx:expr, $info:expr, $deadline:expr, $first:expr, $conn:expr) => {
        async {
            // Boxed: the connection's state is freed as soon as it ends (at an
            // upgrade), while the task itself may be referenced a little longer.
            let mut conn = Box::pin($conn);
            let watch = watchdog(&$info, $deadline, $cx.idle_timeout);
            tokio::pin!(watch);
            tokio::select! {
                // The connection first: the watchdog then sees what it did.
                biased;
                r = conn.as_mut() => return r,
                w = &mut watch => match w {
                    Watch::Deadline => {
                        $info.listener.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                        debug!("no complete request head within the handshake timeout");
                        return Ok(());
                    }
                    Watch::Idle => {
                        $info.listener.idle_closed.fetch_add(1, Ordering::Relaxed);
                        debug!("idle connection closed");
                    }
                },
                _ = $cx.stop.cancelled() => {
                    // HTTP/1.1: shut down only once idle. One with a request
                    // in flight would have its 101 answered `Connection: close`
                    // (the client refuses it), and one accepted just before
                    // shutdown whose first request has not started would be
                    // taken for idle and reset (its client, often a balancer,
                    // already sent the request). Both are driven on: the first
                    // until its request is done (an upgrade ends the connection
                    // here and goes on as a session, drained like the others),
                    // the second until its first-head deadline at most.
                    if let Some(first) = $first {
                        let idle = async {
                            loop {
                                let started = $info.requests.load(Ordering::Relaxed) > 0;
                                let busy = $info.busy.load(Ordering::Relaxed) > 0;
                                if !busy && (started || tokio::time::Instant::now() >= first) {
                                    break;
                                }
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        };
                        tokio::select! {
                            r = conn.as_mut() => return r,
                            _ = idle => {}
                            _ = $cx.shared.life.hard_stop.cancelled() => return Ok(()),
                        }
                    }
                }
            }
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => r,
                _ = $cx.shared.life.hard_stop.cancelled() => Ok(()),
            }
        }
        .await
    };
}

pub(super) async fn serve<I>(
    cx: Arc<AcceptCx>,
    info: Arc<ConnInfo>,
    io: I,
    h2: bool,
    deadline: tokio::time::Instant,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = cx.shared.clone();
    let http = cx.http.clone();
    let conn_info = info.clone();
    let svc = hyper::service::service_fn(move |req| {
        proxy::handle(shared.clone(), conn_info.clone(), http.clone(), req)
    });
    let io = TokioIo::new(io);
    let res = if h2 {
        drive!(
            cx,
            info,
            Some(deadline),
            None::<tokio::time::Instant>,
            cx.builders.h2.serve_connection(io, svc)
        )
    } else {
        // hyper's head timer, set to what is left of the deadline, bounds
        // the first head (and later ones on this connection alike).
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut h1 = cx.builders.h1.clone();
        h1.header_read_timeout(left.max(Duration::from_millis(1)));
        drive!(
            cx,
            info,
            None,
            Some(deadline),
            h1.serve_connection(io, svc).with_upgrades()
        )
    };
    if let Err(e) = res {
        if e.is_timeout() && info.requests.load(Ordering::Relaxed) == 0 {
            info.listener
                .handshake_timeouts
                .fetch_add(1, Ordering::Relaxed);
        }
        debug!(error = %e, "connection ended with an error");
    }
}
