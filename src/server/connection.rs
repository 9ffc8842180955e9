//! Serving one connection: its first bytes read here (HTTP/2 told from
//! HTTP/1.1 without a timer, a WebSocket upgrade served directly), then
//! hyper's connection driven under a watchdog (the first head's deadline
//! for HTTP/2, the idle timeout for both), and graceful shutdown.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::accept::AcceptCx;
use super::head::{self, First};
use crate::proxy;
use crate::proxy::direct::Served;
use crate::session::conn::{ConnInfo, IntoLeg, Rewind};

/// Serves a connection from its first bytes: reads them (see `head`),
/// answers a WebSocket upgrade the direct path takes and starts its
/// session, and hands the rest to hyper with the bytes read put back.
/// `h2`: whether the HTTP/2 preface is possible (plain TCP, or ALPN said
/// so). The first head must be complete by `deadline`; waiting for it
/// costs no timer beyond that one and no CPU.
pub(super) async fn serve_first<I>(
    cx: Arc<AcceptCx>,
    info: Arc<ConnInfo>,
    io: I,
    h2: bool,
    deadline: tokio::time::Instant,
) where
    I: AsyncRead + AsyncWrite + IntoLeg + Unpin + Send + 'static,
{
    // Boxed: the first request's state is freed before hyper takes over.
    let next = Box::pin(first_request(&cx, &info, io, h2, deadline)).await;
    match next {
        Next::Session(session, client) => {
            // A task of its own, sized for the session alone: run here, the
            // session would keep this connection task's state for its life
            // (measured: 2.33 -> 2.99 KiB per idle session), to save a spawn
            // (about 700 instructions). Boxed before the spawn: the runtime
            // moves a task's future by value several times (into its cell,
            // and each stage change rewrites the whole stage), 1.2 KB each.
            let stop = cx.shared.life.hard_stop.clone();
            let session = Box::pin((*session).run(stop, client));
            cx.shared.life.tasks.spawn(session);
        }
        Next::Hyper {
            io,
            replay,
            h2,
            deadline,
        } => Box::pin(serve(cx, info, Rewind::new(replay, io), h2, deadline)).await,
        Next::Done => {}
    }
}

/// What follows a connection's first request.
enum Next<I> {
    /// A direct upgrade's session.
    Session(Box<crate::session::Pending>, crate::session::conn::Leg),
    /// hyper serves the connection: HTTP/2, a first request the direct path
    /// does not take (`replay` holds it), or the requests after a direct
    /// upgrade that was refused (`deadline` is then the next head's).
    Hyper {
        io: I,
        replay: Bytes,
        h2: bool,
        deadline: tokio::time::Instant,
    },
    /// The connection ended (timed out, failed, shut down).
    Done,
}

/// Reads the connection's first request and serves it when the direct
/// path takes it; otherwise says what hyper is to serve.
#[allow(clippy::manual_async_fn)] // on purpose: see `proxy::upgrade::upgrade`
fn first_request<'a, I>(
    cx: &'a AcceptCx,
    info: &'a Arc<ConnInfo>,
    mut io: I,
    h2: bool,
    deadline: tokio::time::Instant,
) -> impl std::future::Future<Output = Next<I>> + 'a
where
    I: AsyncRead + AsyncWrite + IntoLeg + Unpin + 'a,
{
    async move {
        let first = tokio::select! {
            r = tokio::time::timeout_at(
                deadline,
                head::read_first(&mut io, h2, cx.max_header_bytes, cx.max_headers),
            ) => r,
            _ = cx.shared.life.hard_stop.cancelled() => return Next::Done,
        };
        let hyper = |io, replay, h2| Next::Hyper {
            io,
            replay,
            h2,
            deadline,
        };
        match first {
            Err(_) => {
                info.listener
                    .handshake_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                debug!("no complete request head within the handshake timeout");
                Next::Done
            }
            Ok(Err(e)) => {
                debug!(error = %e, "connection failed before its first request");
                Next::Done
            }
            Ok(Ok(First::H2(raw))) => hyper(io, raw, true),
            Ok(Ok(First::Other(raw))) => hyper(io, raw, false),
            Ok(Ok(First::Head { req, raw, len })) => {
                let Some(ticket) = proxy::direct::takes(&cx.shared, &req) else {
                    return hyper(io, raw, false);
                };
                // A copy: the rest is usually empty, and must not keep the head's buffer.
                let rest = Bytes::copy_from_slice(raw.get(len..).unwrap_or_default());
                drop(raw);
                match proxy::direct::serve(&cx.shared, info, ticket, &req, io, rest).await {
                    Served::Session(session, client) => Next::Session(session, client),
                    Served::Answered(io, rest) => Next::Hyper {
                        io,
                        replay: rest,
                        h2: false,
                        // The next head gets a deadline of its own.
                        deadline: tokio::time::Instant::now() + cx.handshake_timeout,
                    },
                    Served::Gone => Next::Done,
                }
            }
        }
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

async fn serve<I>(
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

#[cfg(test)]
mod tests {
    fn returned_size<A, B, C, D, E, R>(_f: impl FnOnce(A, B, C, D, E) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// The first request's future is boxed and moved by value as each
    /// connection starts (and holds the whole direct upgrade, connect and
    /// backend exchange included), so its size is copied and touched once
    /// per handshake. It was 5,144 B before the eighth pass of issue 15
    /// (arguments kept twice by `async fn`s, the request passed by value
    /// down four levels, a TLS handshake and a 256-entry failover order
    /// inline); 2,408 B after. A debug build lays it out larger.
    #[test]
    fn the_first_requests_future_stays_small() {
        let limit = if cfg!(debug_assertions) {
            2560 + 64
        } else {
            2560
        };
        let size = returned_size(super::first_request::<tokio::net::TcpStream>);
        assert!(
            size <= limit,
            "the first request's future is {size} B, over {limit} B"
        );
    }
}
