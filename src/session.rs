//! One upgraded WebSocket session: wait for both upgrades, take the raw
//! sockets back from hyper when both legs are plain TCP (so the splice can
//! hold no buffers while idle), splice, and log how it ended.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf as _, Bytes};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::{debug, Instrument};

use crate::pool::BackendGuard;
use crate::proxy::{ConnInfo, Shared};
use crate::splice;
use crate::upstream::BackendIo;

/// One side of a session after the upgrade.
enum Leg {
    /// The raw socket and the bytes hyper had read past the HTTP head.
    Tcp(TcpStream, Bytes),
    Other(Box<dyn Io>),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

fn client_leg(up: Upgraded, plain: bool) -> Leg {
    if !plain {
        return Leg::Other(Box::new(TokioIo::new(up)));
    }
    match up.downcast::<TokioIo<TcpStream>>() {
        Ok(p) => Leg::Tcp(p.io.into_inner(), p.read_buf),
        Err(up) => Leg::Other(Box::new(TokioIo::new(up))),
    }
}

fn backend_leg(up: Upgraded, plain: bool) -> Leg {
    if !plain {
        return Leg::Other(Box::new(TokioIo::new(up)));
    }
    match up.downcast::<TokioIo<BackendIo>>() {
        Ok(p) => match p.io.into_inner() {
            BackendIo::Tcp(s) => Leg::Tcp(s, p.read_buf),
            tls => Leg::Other(Box::new(Prefixed {
                prefix: p.read_buf,
                inner: tls,
            })),
        },
        Err(up) => Leg::Other(Box::new(TokioIo::new(up))),
    }
}

impl Leg {
    fn into_io(self) -> Box<dyn Io> {
        match self {
            Leg::Tcp(s, prefix) => Box::new(Prefixed { prefix, inner: s }),
            Leg::Other(io) => io,
        }
    }
}

/// Spawns the session on the gateway's task tracker.
pub fn spawn(
    shared: &Arc<Shared>,
    conn: Arc<ConnInfo>,
    client: OnUpgrade,
    backend: OnUpgrade,
    guard: BackendGuard,
) {
    let stop = shared.hard_stop.clone();
    let span = tracing::Span::current();
    shared.tasks.spawn(
        async move {
            let (client, backend) = match tokio::try_join!(client, backend) {
                Ok(pair) => pair,
                Err(e) => {
                    debug!(error = %e, "upgrade did not complete");
                    return;
                }
            };
            let client = client_leg(client, !conn.tls);
            let backend = backend_leg(backend, !guard.backend().url.tls);
            let result = tokio::select! {
                r = run(client, backend) => r,
                _ = stop.cancelled() => {
                    debug!("session closed at shutdown");
                    return;
                }
            };
            match result {
                Ok(m) => debug!(up = m.client_to_backend, down = m.backend_to_client, backend = %guard.backend().url, "session ended"),
                Err(e) => debug!(error = %e, backend = %guard.backend().url, "session ended by an I/O error"),
            }
            // `conn` (the connection-limit slot) and `guard` (the backend's live count) drop here.
            drop(conn);
        }
        .instrument(span),
    );
}

async fn run(client: Leg, backend: Leg) -> io::Result<splice::Moved> {
    match (client, backend) {
        (Leg::Tcp(c, cp), Leg::Tcp(b, bp)) => splice::splice_tcp(&c, cp, &b, bp).await,
        (c, b) => splice::splice(&mut c.into_io(), &mut b.into_io()).await,
    }
}

/// Serves `prefix` before reading from `inner`; writes go straight through.
struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
