//! Moves bytes both ways between an upgraded client and its backend.
//!
//! No frame parsing: compression, subprotocols and close codes pass through
//! untouched. Each direction ends on EOF and half-closes the other side's
//! write half (a TCP FIN, or TLS close_notify then FIN), so a peer that shuts
//! down its sending side still receives until the other peer is done. An
//! error in either direction ends both.
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

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{ready, Context, Poll};

use bytes::{Buf as _, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::frame_watch::FrameWatch;
use crate::metrics::{report_epoch, RouteStats};

/// Size of a pooled copy buffer.
pub const BUF_SIZE: usize = 32 * 1024;
/// Buffers kept for reuse per runtime thread; beyond this they are freed.
const POOL_MAX: usize = 64;

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
}

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A pooled buffer, returned to this thread's pool on drop.
struct Buf(Option<Box<[u8]>>);

impl Buf {
    fn take() -> Buf {
        let b = POOL.with(|p| p.borrow_mut().pop());
        Buf(Some(
            b.unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice()),
        ))
    }
    fn bytes(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or_default()
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            POOL.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_MAX {
                    p.push(b);
                }
            });
        }
    }
}

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
    epoch: u64,
}

/// One direction of a splice.
struct Direction<'a> {
    /// Bytes read before the upgrade finished, delivered first.
    pending: Bytes,
    /// Data read but not yet written: the buffer and the unwritten range.
    held: Option<(Buf, usize, usize)>,
    /// Written bytes that may still sit in a TLS layer's buffer.
    need_flush: bool,
    eof: bool,
    done: bool,
    total: u64,
    frames: FrameWatch,
    report: Report<'a>,
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
                epoch: report_epoch(),
            },
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
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.pending))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pending.advance(n);
                self.total += n as u64;
                self.need_flush = true;
                if self.pending.is_empty() {
                    self.pending = Bytes::new(); // release hyper's buffer
                }
            }
            if let Some((buf, pos, len)) = &mut self.held {
                while *pos < *len {
                    let n = ready!(Pin::new(&mut *w).poll_write(cx, &buf.bytes()[*pos..*len]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    *pos += n;
                    self.total += n as u64;
                }
                self.held = None; // the buffer goes back to the pool
                self.need_flush = true;
            }
            if self.eof {
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
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
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    // Live counters, at most once per epoch (a second).
                    let epoch = report_epoch();
                    if epoch != self.report.epoch {
                        self.report.epoch = epoch;
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
                        self.held = Some((buf, 0, n));
                    }
                }
            }
        }
    }
}

/// However the session ends (EOF, error, or its task cancelled), the route's
/// counters get the rest.
impl Drop for Direction<'_> {
    fn drop(&mut self) {
        self.report();
    }
}

/// Splices `client` and `backend` until both directions reach EOF (or one
/// fails). `*_pending` are bytes each side sent that were read before the
/// upgrade finished; they are delivered first.
///
/// Once one direction has ended, the other gets `half_close_timeout` to end
/// too; then the session is closed, so a peer that never finishes its side
/// cannot hold it open forever.
pub async fn splice<C, B>(
    client: &mut C,
    client_pending: Bytes,
    backend: &mut B,
    backend_pending: Bytes,
    half_close_timeout: std::time::Duration,
    stats: &RouteStats,
) -> io::Result<Moved>
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin,
    B: AsyncRead + AsyncWrite + ReadReady + Unpin,
{
    let mut up = Direction::new(client_pending, &stats.bytes_up, &stats.messages_up);
    let mut down = Direction::new(backend_pending, &stats.bytes_down, &stats.messages_down);
    let mut linger: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut closed_by = None;
    let mut close_code = None;
    poll_fn(|cx| {
        let u = up.poll(cx, client, backend)?;
        let d = down.poll(cx, backend, client)?;
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
            (Poll::Ready(u), Poll::Ready(d)) => Poll::Ready(Ok(Moved {
                client_to_backend: u,
                backend_to_client: d,
                closed_by,
                close_code: close_code.flatten(),
            })),
            (Poll::Pending, Poll::Pending) => Poll::Pending,
            _ => {
                let timer =
                    linger.get_or_insert_with(|| Box::pin(tokio::time::sleep(half_close_timeout)));
                ready!(timer.as_mut().poll(cx));
                Poll::Ready(Ok(Moved {
                    client_to_backend: up.total,
                    backend_to_client: down.total,
                    closed_by,
                    close_code: close_code.flatten(),
                }))
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const T: std::time::Duration = std::time::Duration::from_secs(30);

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
                    splice(&mut c, Bytes::new(), &mut b, Bytes::new(), T, &stats).await
                } else {
                    splice(
                        &mut gw_client,
                        Bytes::new(),
                        &mut gw_backend,
                        Bytes::new(),
                        T,
                        &stats,
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

    #[tokio::test]
    async fn an_idle_session_holds_no_buffer() {
        let (mut client, mut backend, task) = spliced(b"", b"", T).await;
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        backend.read_exact(&mut got).await.unwrap();
        // The session is idle now: its buffer went back to the pool of the
        // runtime thread (this test runs on a current-thread runtime).
        tokio::task::yield_now().await;
        let pooled = POOL.with(|p| p.borrow().len());
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
