//! Moves bytes both ways between an upgraded client and its backend.
//!
//! No frame parsing: compression, subprotocols and close codes pass through
//! untouched. Each direction ends on EOF and half-closes the other side's
//! write half (a TCP FIN, or TLS close_notify then FIN), so a peer that shuts
//! down its sending side still receives until the other peer is done. A
//! failure to read ends both directions. A failure to write ends only its
//! own: the peer that cannot be written to may have sent bytes before it
//! went (an echo, a Close, its last message), and the other direction still
//! reads them from the kernel and delivers them before the session ends.
//!
//! Buffers are borrowed from a per-thread pool for one read and its write,
//! and given back as soon as a read would block: an idle session holds no
//! buffer at all, which is what keeps an idle connection's memory small.
//! It works over any `AsyncRead + AsyncWrite`, so plain TCP and TLS legs take
//! the same path (monomorphised for plain TCP on both sides).
//!
//! The route's byte and message counters are fed while the session lives:
//! a direction about to wait adds what it moved when the reporting epoch
//! ticked (once a second, see `metrics::report_epoch`), and the rest when
//! it is dropped — one relaxed load per wake-up on the hot path.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{ready, Context, Poll};

use bytes::{Buf as _, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::frame_watch::FrameWatch;
use crate::metrics::{report_epoch, RouteStats};

use crate::buffers::Buf;
pub use crate::buffers::BUF_SIZE;

/// Bytes moved by a finished splice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    /// Who closed (`client` or `backend`): the sender of the first Close
    /// frame, else the side whose direction ended first.
    pub closed_by: Option<&'static str>,
    /// The code of the first Close frame, when it carried one.
    pub close_code: Option<u16>,
    /// The pool's rebalancer asked the session to leave: upgate closed
    /// both legs at a frame boundary (1012 to the client).
    pub rebalanced: bool,
}

/// What the client is told when the rebalancer closes its session.
pub const REBALANCE_REASON: &str = "service restart: rebalancing, reconnect";
/// How long both peers get to answer the Closes of a rebalancing close.
const LEAVE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Asks a live splice to end cleanly: resolves when the session should
/// leave (the rebalancer asked); `None` where nothing does.
pub type Leave<'a> = Option<Pin<Box<dyn Future<Output = ()> + Send + 'a>>>;

/// Streams whose readiness can be checked without reading. A plain TCP
/// socket can: its leg takes a buffer only once data is there, so an idle
/// session holds none. Other streams (TLS, which may have decrypted bytes
/// waiting inside) keep the default and are simply read.
pub trait ReadReady {
    fn poll_read_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl ReadReady for tokio::net::TcpStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
}

/// A spliceable stream behind a pointer (TLS legs, hyper's upgraded type).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl ReadReady for Box<dyn Io> {}

/// A route's counters for one direction, and how much of this session's
/// traffic they already hold.
struct Report<'a> {
    bytes: &'a AtomicU64,
    messages: &'a AtomicU64,
    sent: (u64, u64),
}

/// One direction of a splice.
struct Direction<'a> {
    /// Bytes read before the upgrade finished, delivered first.
    pending: Bytes,
    /// Data read but not yet written: the buffer and the unwritten range
    /// (within `BUF_SIZE`, so `u32`: an idle session's state stays small).
    held: Option<(Buf, u32, u32)>,
    /// Written bytes that may still sit in a TLS layer's buffer.
    need_flush: bool,
    eof: bool,
    done: bool,
    /// Ended by a failed write (see [`step`]).
    failed: bool,
    total: u64,
    frames: FrameWatch,
    report: Report<'a>,
    /// The reporting epoch last reported in (its low bits are enough to
    /// see a tick).
    epoch: u32,
}

impl<'a> Direction<'a> {
    fn new(pending: Bytes, bytes: &'a AtomicU64, messages: &'a AtomicU64) -> Self {
        let mut frames = FrameWatch::default();
        frames.feed(&pending);
        Direction {
            frames,
            report: Report {
                bytes,
                messages,
                sent: (0, 0),
            },
            epoch: report_epoch() as u32,
            total: 0,
            // An empty `Bytes` split off hyper's read buffer still keeps that
            // whole buffer alive: let it go.
            pending: if pending.is_empty() {
                Bytes::new()
            } else {
                pending
            },
            held: None,
            need_flush: false,
            eof: false,
            done: false,
            failed: false,
        }
    }

    /// Adds what moved since the last report to the route's counters.
    fn report(&mut self) {
        let r = &mut self.report;
        let now = (self.total, self.frames.messages);
        if now != r.sent {
            r.bytes.fetch_add(now.0 - r.sent.0, Relaxed);
            r.messages.fetch_add(now.1 - r.sent.1, Relaxed);
            r.sent = now;
        }
    }

    /// Ends this direction on a failed write (see [`step`]): it is done,
    /// and `failed` says how.
    fn write_failed(&mut self, e: io::Error) -> Poll<io::Result<u64>> {
        self.failed = true;
        self.done = true;
        Poll::Ready(Err(e))
    }

    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ReadReady + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.done {
            return Poll::Ready(Ok(self.total));
        }
        loop {
            while !self.pending.is_empty() {
                let n = match ready!(Pin::new(&mut *w).poll_write(cx, &self.pending)) {
                    Ok(0) => return self.write_failed(io::ErrorKind::WriteZero.into()),
                    Ok(n) => n,
                    Err(e) => return self.write_failed(e),
                };
                self.pending.advance(n);
                self.total += n as u64;
                self.need_flush = true;
                if self.pending.is_empty() {
                    self.pending = Bytes::new(); // release hyper's buffer
                }
            }
            if let Some((buf, pos, len)) = &mut self.held {
                while *pos < *len {
                    let unwritten = &buf.bytes()[*pos as usize..*len as usize];
                    let n = match ready!(Pin::new(&mut *w).poll_write(cx, unwritten)) {
                        Ok(0) => return self.write_failed(io::ErrorKind::WriteZero.into()),
                        Ok(n) => n,
                        Err(e) => return self.write_failed(e),
                    };
                    // A write never takes more than it was given: n <= len - pos.
                    *pos += n.min(unwritten.len()) as u32;
                    self.total += n as u64;
                }
                self.held = None; // the buffer goes back to the pool
                self.need_flush = true;
            }
            if self.eof {
                if let Err(e) = ready!(Pin::new(&mut *w).poll_shutdown(cx)) {
                    return self.write_failed(e);
                }
                self.done = true;
                return Poll::Ready(Ok(self.total));
            }
            let read = match r.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {
                    let mut buf = Buf::take();
                    let mut rb = ReadBuf::new(buf.bytes());
                    match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(r) => {
                            Poll::Ready(r.map(|()| rb.filled().len()).map(|n| (buf, n)))
                        }
                    }
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            };
            match read {
                Poll::Pending => {
                    if self.need_flush {
                        if let Err(e) = ready!(Pin::new(&mut *w).poll_flush(cx)) {
                            return self.write_failed(e);
                        }
                        self.need_flush = false;
                    }
                    // Live counters, at most once per epoch (a second).
                    let epoch = report_epoch() as u32;
                    if epoch != self.epoch {
                        self.epoch = epoch;
                        self.report();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok((mut buf, n))) => {
                    if n == 0 {
                        self.eof = true;
                    } else {
                        self.frames.feed(&buf.bytes()[..n]);
                        // n <= BUF_SIZE (the read's buffer), which fits a u32.
                        self.held = Some((buf, 0, n as u32));
                    }
                }
            }
        }
    }
}

/// One poll of a running direction: `Ready` once it ended, at EOF or on a
/// failed write (`Direction::failed`; it is then `done`, and later polls
/// return at once), an error when it failed to read.
///
/// A failed write means the peer it writes to is gone (reset, or closed
/// with bytes unread), but what that peer sent before going may still wait
/// in the kernel for the other direction: the session goes on until that
/// direction ends too, and the error is kept in `kept` (the first one) to
/// be reported then. A failed read means the peer it reads from is gone,
/// and the other direction, which writes to it, has nowhere to deliver:
/// the session ends at once (with the kept error, if there is one).
fn step<R, W>(
    d: &mut Direction<'_>,
    kept: &mut Option<io::Error>,
    cx: &mut Context<'_>,
    r: &mut R,
    w: &mut W,
) -> io::Result<Poll<u64>>
where
    R: AsyncRead + ReadReady + Unpin,
    W: AsyncWrite + Unpin,
{
    match d.poll(cx, r, w) {
        Poll::Pending => Ok(Poll::Pending),
        Poll::Ready(Ok(n)) => Ok(Poll::Ready(n)),
        Poll::Ready(Err(e)) if d.failed => {
            kept.get_or_insert(e);
            Ok(Poll::Ready(d.total))
        }
        Poll::Ready(Err(e)) => Err(kept.take().unwrap_or(e)),
    }
}

impl Direction<'_> {
    /// Ends this direction cleanly in the middle of a session: delivers what
    /// was read, then relays exactly up to the end of the frame in flight
    /// (never a byte past it), writes `close`, and reads (and drops) what its
    /// peer still sends until that peer's own Close (its answer to the Close
    /// the other direction wrote) or EOF; then half-closes the writer.
    async fn leave<R, W>(&mut self, r: &mut R, w: &mut W, close: &[u8]) -> io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        if !self.pending.is_empty() {
            w.write_all(&self.pending).await?;
            self.total += self.pending.len() as u64;
            self.pending = Bytes::new();
        }
        if let Some((mut buf, pos, len)) = self.held.take() {
            w.write_all(&buf.bytes()[pos as usize..len as usize])
                .await?;
            self.total += u64::from(len - pos);
        }
        let mut buf = Buf::take();
        loop {
            let need = self.frames.to_boundary();
            if need == 0 {
                break;
            }
            let room = usize::try_from(need).unwrap_or(BUF_SIZE).min(BUF_SIZE);
            let n = r.read(&mut buf.bytes()[..room]).await?;
            if n == 0 {
                return Ok(()); // the peer went away inside a frame
            }
            self.frames.feed(&buf.bytes()[..n]);
            w.write_all(&buf.bytes()[..n]).await?;
            self.total += n as u64;
        }
        w.write_all(close).await?;
        w.flush().await?;
        // From the boundary on, nothing is relayed: a fresh watch finds the answer.
        let mut rest = FrameWatch::default();
        while rest.seen.is_none() {
            let n = r.read(buf.bytes()).await?;
            if n == 0 {
                break;
            }
            rest.feed(&buf.bytes()[..n]);
        }
        w.shutdown().await
    }
}

/// Ends a live session the rebalancer asked to leave: each direction is
/// taken to a frame boundary; the client gets Close 1012 (Service Restart)
/// so it reconnects and lands on a less loaded backend, the backend a
/// (masked) Close 1001 as if the client went away; both answers are awaited
/// for at most `grace`.
async fn leave<C, B>(
    up: &mut Direction<'_>,
    down: &mut Direction<'_>,
    client: &mut C,
    backend: &mut B,
    grace: std::time::Duration,
) -> Moved
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    use crate::ws::frame::{self, code};
    let to_client = frame::close(code::SERVICE_RESTART, REBALANCE_REASON);
    let mut mask = [0u8; 4];
    // A mask only needs to be unpredictable to the page that could craft the
    // frame; should the system RNG fail, a fixed one is still valid framing.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut mask);
    let to_backend = frame::close_masked(code::GOING_AWAY, "client moved by rebalancing", mask);
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut br, mut bw) = tokio::io::split(backend);
    let _ = tokio::time::timeout(grace, async {
        tokio::join!(
            up.leave(&mut cr, &mut bw, &to_backend),
            down.leave(&mut br, &mut cw, &to_client)
        )
    })
    .await;
    Moved {
        client_to_backend: up.total,
        backend_to_client: down.total,
        closed_by: Some("upgate"),
        close_code: Some(code::SERVICE_RESTART),
        rebalanced: true,
    }
}

/// However the session ends (EOF, error, or its task cancelled), the route's
/// counters get the rest.
impl Drop for Direction<'_> {
    fn drop(&mut self) {
        self.report();
    }
}

/// [`Splice::run`] in one call (the tests' shorthand).
#[cfg(test)]
pub async fn splice<C, B>(
    client: &mut C,
    client_pending: Bytes,
    backend: &mut B,
    backend_pending: Bytes,
    half_close_timeout: std::time::Duration,
    stats: &RouteStats,
    asked_to_leave: Leave<'_>,
) -> io::Result<Moved>
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin,
    B: AsyncRead + AsyncWrite + ReadReady + Unpin,
{
    Splice::new(client_pending, backend_pending, stats)
        .run(client, backend, half_close_timeout, asked_to_leave)
        .await
}

/// Both directions of a session's splice, made before it runs so that a
/// session keeps them in one place: passed by value into the running future
/// they would be stored twice (an `async fn` keeps its arguments and its
/// own copies), 200 bytes each.
pub struct Splice<'a> {
    up: Direction<'a>,
    down: Direction<'a>,
}

impl<'a> Splice<'a> {
    /// `client_pending` and `backend_pending`: bytes each side sent right
    /// behind the upgrade, delivered first.
    pub fn new(client_pending: Bytes, backend_pending: Bytes, stats: &'a RouteStats) -> Self {
        Splice {
            up: Direction::new(client_pending, &stats.bytes_up, &stats.messages_up),
            down: Direction::new(backend_pending, &stats.bytes_down, &stats.messages_down),
        }
    }

    /// Splices `client` and `backend` until both directions reach EOF (or one
    /// fails). The pending bytes given to [`Splice::new`] are delivered first.
    ///
    /// Once one direction has ended, the other gets `half_close_timeout` to end
    /// too; then the session is closed, so a peer that never finishes its side
    /// cannot hold it open forever.
    ///
    /// When `leave` resolves while both directions are open and no Close has
    /// passed, both legs are closed at a frame boundary (see [`leave`]).
    pub async fn run<C, B>(
        &mut self,
        client: &mut C,
        backend: &mut B,
        half_close_timeout: std::time::Duration,
        mut asked_to_leave: Leave<'_>,
    ) -> io::Result<Moved>
    where
        C: AsyncRead + AsyncWrite + ReadReady + Unpin,
        B: AsyncRead + AsyncWrite + ReadReady + Unpin,
    {
        let Splice { up, down } = self;
        let mut linger: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut closed_by = None;
        let mut close_code = None;
        // A failed write, reported once the other direction has delivered
        // what its peer sent before going (see `step`).
        let mut failure = None;
        let ended = poll_fn(|cx| -> Poll<io::Result<Option<Moved>>> {
            let u = step(up, &mut failure, cx, client, backend)?;
            let d = step(down, &mut failure, cx, backend, client)?;
            if let Some(l) = asked_to_leave.as_mut() {
                if u.is_pending() && d.is_pending() && l.as_mut().poll(cx).is_ready() {
                    asked_to_leave = None;
                    let open =
                        !(up.eof || down.eof || up.done || down.done || up.failed || down.failed);
                    if open && up.frames.seen.is_none() && down.frames.seen.is_none() {
                        return Poll::Ready(Ok(None));
                    }
                }
            }
            if close_code.is_none() {
                // The first Close frame decides who closed, and with what code.
                let first = match (up.frames.seen, down.frames.seen) {
                    (Some(c), _) => Some(("client", c)),
                    (None, Some(c)) => Some(("backend", c)),
                    _ => None,
                };
                if let Some((side, code)) = first {
                    closed_by = Some(side);
                    close_code = Some(code);
                }
            }
            if closed_by.is_none() {
                closed_by = match (&u, &d) {
                    (Poll::Ready(_), _) => Some("client"),
                    (_, Poll::Ready(_)) => Some("backend"),
                    _ => None,
                };
            }
            match (u, d) {
                (Poll::Ready(u), Poll::Ready(d)) => Poll::Ready(match failure.take() {
                    Some(e) => Err(e),
                    None => Ok(Some(Moved {
                        client_to_backend: u,
                        backend_to_client: d,
                        closed_by,
                        close_code: close_code.flatten(),
                        rebalanced: false,
                    })),
                }),
                (Poll::Pending, Poll::Pending) => Poll::Pending,
                _ => {
                    let timer = linger
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(half_close_timeout)));
                    ready!(timer.as_mut().poll(cx));
                    if let Some(e) = failure.take() {
                        return Poll::Ready(Err(e));
                    }
                    Poll::Ready(Ok(Some(Moved {
                        client_to_backend: up.total,
                        backend_to_client: down.total,
                        closed_by,
                        close_code: close_code.flatten(),
                        rebalanced: false,
                    })))
                }
            }
        })
        .await?;
        match ended {
            Some(moved) => Ok(moved),
            None => {
                let grace = half_close_timeout.min(LEAVE_GRACE);
                // Boxed: a rare path whose state stays out of every session's task.
                Ok(Box::pin(leave(up, down, client, backend, grace)).await)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const T: std::time::Duration = std::time::Duration::from_secs(30);

    /// An idle session's task holds its splice: both directions' state is
    /// part of every live session's memory (docs/performance.md, "Idle memory").
    #[test]
    fn splice_state_stays_small() {
        assert!(std::mem::size_of::<FrameWatch>() <= 48);
        assert!(std::mem::size_of::<Direction<'_>>() <= 160);
        assert!(std::mem::size_of::<Splice<'_>>() <= 320);
    }

    /// A connected pair of loopback TCP sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Splices two fresh loopback pairs on a task; returns (client, backend, task).
    async fn spliced(
        client_pending: &'static [u8],
        backend_pending: &'static [u8],
        half_close: std::time::Duration,
    ) -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<io::Result<Moved>>,
    ) {
        let (client, mut gw_client) = pair().await;
        let (mut gw_backend, backend) = pair().await;
        let task = tokio::spawn(async move {
            splice(
                &mut gw_client,
                Bytes::from_static(client_pending),
                &mut gw_backend,
                Bytes::from_static(backend_pending),
                half_close,
                &RouteStats::default(),
                None,
            )
            .await
        });
        (client, backend, task)
    }

    /// Runs both splice paths over the same scenario.
    async fn with_each_path<F, Fut>(f: F)
    where
        F: Fn(TcpStream, TcpStream) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        for generic in [false, true] {
            let (client, mut gw_client) = pair().await;
            let (mut gw_backend, backend) = pair().await;
            let task = tokio::spawn(async move {
                let stats = RouteStats::default();
                if generic {
                    // Through trait objects, as TLS legs are spliced.
                    let mut c: Box<dyn Io> = Box::new(gw_client);
                    let mut b: Box<dyn Io> = Box::new(gw_backend);
                    splice(&mut c, Bytes::new(), &mut b, Bytes::new(), T, &stats, None).await
                } else {
                    splice(
                        &mut gw_client,
                        Bytes::new(),
                        &mut gw_backend,
                        Bytes::new(),
                        T,
                        &stats,
                        None,
                    )
                    .await
                }
            });
            f(client, backend).await;
            task.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn moves_bytes_both_ways_and_honours_half_close() {
        with_each_path(|mut client, mut backend| async move {
            client.write_all(b"hello").await.unwrap();
            client.shutdown().await.unwrap(); // client is done sending
            let mut got = Vec::new();
            backend.read_to_end(&mut got).await.unwrap(); // EOF reaches the backend
            assert_eq!(got, b"hello");
            // The other direction still works after the client's half-close.
            backend.write_all(b"late reply").await.unwrap();
            backend.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"late reply");
        })
        .await;
    }

    #[tokio::test]
    async fn large_transfers_arrive_intact() {
        with_each_path(|mut client, mut backend| async move {
            let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
            let send = data.clone();
            let writer = tokio::spawn(async move {
                client.write_all(&send).await.unwrap();
                client.shutdown().await.unwrap();
                client
            });
            let mut got = Vec::new();
            backend.read_to_end(&mut got).await.unwrap();
            assert!(got == data, "payload corrupted");
            drop(backend);
            drop(writer.await.unwrap());
        })
        .await;
    }

    #[tokio::test]
    async fn pending_bytes_are_delivered_first() {
        let (mut client, mut backend, task) = spliced(b"early-", b"hi-", T).await;
        client.write_all(b"late").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"early-late");
        backend.write_all(b"there").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hi-there");
        let moved = task.await.unwrap().unwrap();
        assert_eq!(
            moved,
            Moved {
                client_to_backend: 10,
                backend_to_client: 8,
                closed_by: Some("client"),
                close_code: None,
                rebalanced: false,
            }
        );
    }

    /// The route's counters follow a live session (after an epoch tick),
    /// and hold every byte and message once it ended however it ended.
    #[tokio::test]
    async fn a_live_session_feeds_the_routes_counters() {
        let stats: &'static RouteStats = Box::leak(Box::default());
        let (client, mut gw_client) = pair().await;
        let (mut gw_backend, mut backend) = pair().await;
        let task = tokio::spawn(async move {
            splice(
                &mut gw_client,
                Bytes::new(),
                &mut gw_backend,
                Bytes::new(),
                T,
                stats,
                None,
            )
            .await
        });
        let mut client = client;
        // A masked text frame "hi", 8 bytes.
        let frame = [0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
        let mut sent = 0u64;
        // Other tests tick the epoch too; a few rounds make sure a tick fell
        // between two wake-ups of this session.
        for _ in 0..20 {
            crate::metrics::tick_report_epoch();
            client.write_all(&frame).await.unwrap();
            let mut got = [0u8; 8];
            backend.read_exact(&mut got).await.unwrap();
            sent += 1;
            // Current-thread runtime: the splice's poll that wrote the frame
            // also found the next read pending, and reported, before this runs.
            if stats.messages_up.load(Relaxed) == sent {
                break;
            }
        }
        assert_eq!(stats.messages_up.load(Relaxed), sent, "while live");
        assert_eq!(stats.bytes_up.load(Relaxed), 8 * sent);
        // One more message, then the task is cancelled: the rest is added too.
        client.write_all(&frame).await.unwrap();
        let mut got = [0u8; 8];
        backend.read_exact(&mut got).await.unwrap();
        task.abort();
        let _ = task.await;
        assert_eq!(stats.messages_up.load(Relaxed), sent + 1, "after the end");
        assert_eq!(stats.bytes_up.load(Relaxed), 8 * (sent + 1));
        assert_eq!(stats.messages_down.load(Relaxed), 0);
    }

    /// Asked to leave while a frame is half through each direction, the
    /// splice relays each frame to its end and not a byte further, then
    /// closes: the client gets 1012, the backend a masked 1001; bytes the
    /// peers send after the boundary are dropped, not relayed.
    #[tokio::test]
    async fn leaving_closes_both_legs_at_a_frame_boundary() {
        use crate::ws::frame;
        let (mut client, mut gw_client) = pair().await;
        let (mut gw_backend, mut backend) = pair().await;
        let (go, leave) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let leave: Leave = Some(Box::pin(async {
                let _ = leave.await;
            }));
            splice(
                &mut gw_client,
                Bytes::new(),
                &mut gw_backend,
                Bytes::new(),
                T,
                &RouteStats::default(),
                leave,
            )
            .await
        });
        // A masked 300-byte client frame and a 70,000-byte backend frame,
        // each sent up to its middle.
        let mut up = vec![0x82, 0x80 | 126, 0x01, 0x2c, 1, 2, 3, 4];
        up.extend((0..300u32).map(|i| (i as u8) ^ [1, 2, 3, 4][i as usize % 4]));
        let mut down = vec![0x82, 127];
        down.extend_from_slice(&70_000u64.to_be_bytes());
        down.extend((0..70_000u32).map(|i| i as u8));
        client.write_all(&up[..100]).await.unwrap();
        backend.write_all(&down[..30_000]).await.unwrap();
        let mut got_up = vec![0u8; 100];
        backend.read_exact(&mut got_up).await.unwrap();
        let mut got_down = vec![0u8; 30_000];
        client.read_exact(&mut got_down).await.unwrap();
        go.send(()).unwrap();
        // The rest of each frame, and a whole next frame that must not pass.
        let next = frame::close_masked(1000, "too late", [9, 9, 9, 9]);
        client.write_all(&up[100..]).await.unwrap();
        client.write_all(&next).await.unwrap();
        backend.write_all(&down[30_000..]).await.unwrap();
        backend
            .write_all(&frame::encode(frame::OP_TEXT, b"late"))
            .await
            .unwrap();
        // The backend: its frame's end, then our Close 1001, then nothing but
        // the end of the stream once it answered.
        let mut rest = vec![0u8; up.len() - 100];
        backend.read_exact(&mut rest).await.unwrap();
        got_up.extend(rest);
        assert_eq!(got_up, up);
        let mut head = [0u8; 6];
        backend.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], 0x88, "a Close");
        assert_eq!(head[1] & 0x80, 0x80, "masked, as a client's");
        let mut body = vec![0u8; usize::from(head[1] & 0x7f)];
        backend.read_exact(&mut body).await.unwrap();
        frame::unmask(&mut body, [head[2], head[3], head[4], head[5]]);
        assert_eq!(&body[..2], &1001u16.to_be_bytes());
        backend.write_all(&frame::close(1001, "")).await.unwrap(); // its answer
        let mut after = Vec::new();
        backend.read_to_end(&mut after).await.unwrap();
        assert!(after.is_empty(), "nothing past the Close: {after:?}");
        // The client: the backend frame's end, then Close 1012 and its reason.
        let mut rest = vec![0u8; down.len() - 30_000];
        client.read_exact(&mut rest).await.unwrap();
        got_down.extend(rest);
        assert!(got_down == down, "the backend's frame arrived whole");
        let expect = frame::close(1012, REBALANCE_REASON);
        let mut close = vec![0u8; expect.len()];
        client.read_exact(&mut close).await.unwrap();
        assert_eq!(close, expect);
        let mut after = Vec::new();
        client.read_to_end(&mut after).await.unwrap();
        assert!(after.is_empty(), "nothing past the Close: {after:?}");
        let moved = tokio::time::timeout(std::time::Duration::from_secs(10), task)
            .await
            .expect("ended")
            .unwrap()
            .unwrap();
        assert!(moved.rebalanced);
        assert_eq!(moved.client_to_backend, up.len() as u64);
        assert_eq!(moved.backend_to_client, down.len() as u64);
        assert_eq!(moved.close_code, Some(1012));
    }

    #[tokio::test]
    async fn an_idle_session_holds_no_buffer() {
        let (mut client, mut backend, task) = spliced(b"", b"", T).await;
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        backend.read_exact(&mut got).await.unwrap();
        // The session is idle now: its buffer went back to the pool of the
        // runtime thread (this test runs on a current-thread runtime).
        tokio::task::yield_now().await;
        let pooled = crate::buffers::pooled();
        assert!(pooled >= 1, "the buffer was not returned while idle");
        drop((client, backend));
        let _ = task.await;
    }

    #[tokio::test]
    async fn a_half_closed_session_ends_after_the_timeout() {
        let limit = std::time::Duration::from_millis(200);
        let (mut client, _backend, task) = spliced(b"", b"", limit).await;
        client.shutdown().await.unwrap(); // the client is done; the backend never answers or closes
        let t0 = std::time::Instant::now();
        let moved = tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the session must end")
            .unwrap()
            .unwrap();
        assert_eq!(
            moved,
            Moved {
                closed_by: Some("client"),
                ..Moved::default()
            }
        );
        assert!(t0.elapsed() >= limit);
        let mut buf = [0u8; 1];
        assert_eq!(
            client.read(&mut buf).await.unwrap(),
            0,
            "the client sees the end"
        );
    }

    /// A peer that sends its last bytes and then resets (a server failing
    /// the connection: it closes with the client's next frame unread, so
    /// the kernel answers with a reset) must still have those bytes
    /// delivered, even when writing to it fails before they are read.
    #[tokio::test]
    async fn the_last_bytes_of_a_peer_that_reset_are_delivered() {
        for generic in [false, true] {
            for backend_resets in [true, false] {
                let (mut client, mut gw_client) = pair().await;
                let (mut gw_backend, mut backend) = pair().await;
                // Both legs have something to deliver before the splice runs;
                // then one peer resets, so the splice's first write towards it
                // fails while its last bytes wait unread in the other leg.
                let (gone, other, last): (TcpStream, &mut TcpStream, &[u8]) = if backend_resets {
                    client.write_all(b"more from the client").await.unwrap();
                    backend
                        .write_all(b"the backend's last words")
                        .await
                        .unwrap();
                    (backend, &mut client, b"the backend's last words")
                } else {
                    backend.write_all(b"more from the backend").await.unwrap();
                    client.write_all(b"the client's last words").await.unwrap();
                    (client, &mut backend, b"the client's last words")
                };
                socket2::SockRef::from(&gone)
                    .set_linger(Some(std::time::Duration::ZERO))
                    .unwrap();
                drop(gone);
                let task = tokio::spawn(async move {
                    let stats = RouteStats::default();
                    if generic {
                        let mut c: Box<dyn Io> = Box::new(gw_client);
                        let mut b: Box<dyn Io> = Box::new(gw_backend);
                        splice(&mut c, Bytes::new(), &mut b, Bytes::new(), T, &stats, None).await
                    } else {
                        splice(
                            &mut gw_client,
                            Bytes::new(),
                            &mut gw_backend,
                            Bytes::new(),
                            T,
                            &stats,
                            None,
                        )
                        .await
                    }
                });
                let mut got = Vec::new();
                let mut buf = [0u8; 64];
                // Until the end of the stream (EOF, or the reset passed on).
                while let Ok(Ok(n @ 1..)) =
                    tokio::time::timeout(std::time::Duration::from_secs(5), other.read(&mut buf))
                        .await
                {
                    got.extend_from_slice(&buf[..n]);
                }
                assert_eq!(
                    got, last,
                    "generic {generic}, backend resets {backend_resets}"
                );
                // The session ends promptly, reporting the reset.
                let r = tokio::time::timeout(std::time::Duration::from_secs(5), task)
                    .await
                    .expect("splice ended")
                    .unwrap();
                assert!(r.is_err(), "{r:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_reset_ends_both_directions() {
        let (client, mut backend, task) = spliced(b"", b"", T).await;
        // The client vanishes with a reset.
        socket2::SockRef::from(&client)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(client);
        let mut buf = [0u8; 8];
        // The backend sees its connection end (EOF or reset) promptly.
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), backend.read(&mut buf))
            .await
            .expect("ended");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("splice ended");
    }
}
