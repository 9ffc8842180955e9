//! One client connection: who it is (address, TLS, its connection-limit
//! slot), how busy it is (for the idle watchdog), and, after an upgrade,
//! taking its socket back from hyper for a session.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::metrics::ListenerStats;
use crate::session::splice::Io;
use crate::tls::stream::TlsStream;

/// One client connection, shared by its requests and the sessions they start.
#[derive(Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// The connection-limit slot, released when the last request or session of this connection ends.
    pub _permit: Option<OwnedSemaphorePermit>,
    /// The listener's counters; `active` counts this connection until it drops.
    pub listener: Arc<ListenerStats>,
    /// Requests started on this connection (read by its idle watchdog).
    pub requests: std::sync::atomic::AtomicU64,
    /// Requests in flight plus live sessions on this connection.
    pub busy: std::sync::atomic::AtomicU32,
}

impl ConnInfo {
    pub fn new(
        peer: SocketAddr,
        tls: bool,
        permit: Option<OwnedSemaphorePermit>,
        listener: Arc<ListenerStats>,
    ) -> ConnInfo {
        ConnInfo {
            peer,
            tls,
            _permit: permit,
            listener,
            requests: Default::default(),
            busy: Default::default(),
        }
    }

    /// Marks the connection busy until the guard drops.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }
}

/// Keeps a connection from counting as idle: held by each request being
/// handled and by each WebSocket session (an HTTP/2 stream keeps its
/// connection open).
#[derive(Debug)]
pub struct Busy(Arc<ConnInfo>);

impl std::ops::Deref for Busy {
    type Target = Arc<ConnInfo>;
    fn deref(&self) -> &Arc<ConnInfo> {
        &self.0
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for ConnInfo {
    fn drop(&mut self) {
        self.listener.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One side of a session after the upgrade, with the bytes hyper had
/// already read past the HTTP head.
pub enum Leg {
    /// A raw socket: the fast, monomorphised path.
    Tcp(TcpStream, Bytes),
    /// A TLS stream (or, should a downcast ever fail, hyper's own upgraded type).
    Other(Box<dyn Io>, Bytes),
}

impl Leg {
    pub fn into_io(self) -> (Box<dyn Io>, Bytes) {
        match self {
            Leg::Tcp(s, pending) => (Box::new(s), pending),
            Leg::Other(io, pending) => (io, pending),
        }
    }
}

/// The client's leg once hyper has finished its upgrade (`None`, logged, if
/// the client went away before).
pub async fn upgraded(client: hyper::upgrade::OnUpgrade, tls: bool) -> Option<Leg> {
    match client.await {
        Ok(up) => Some(client_leg(up, tls)),
        Err(e) => {
            tracing::debug!(error = %e, "client upgrade did not complete");
            None
        }
    }
}

/// The client side: the listener's socket type comes back from hyper.
pub fn client_leg(up: Upgraded, tls: bool) -> Leg {
    let up = if tls {
        match up.downcast::<TokioIo<Rewind<Box<TlsStream>>>>() {
            Ok(p) => {
                let (pre, io) = p.io.into_inner().into_parts();
                return Leg::Other(io, joined(pre, p.read_buf));
            }
            Err(up) => up,
        }
    } else {
        match up.downcast::<TokioIo<Rewind<TcpStream>>>() {
            Ok(p) => {
                let (pre, io) = p.io.into_inner().into_parts();
                return Leg::Tcp(io, joined(pre, p.read_buf));
            }
            Err(up) => up,
        }
    };
    Leg::Other(Box::new(TokioIo::new(up)), Bytes::new())
}

/// Bytes still to be read before the socket's own: what was put back and
/// not read yet, then what hyper read past the head.
fn joined(pre: Bytes, read: Bytes) -> Bytes {
    match (pre.is_empty(), read.is_empty()) {
        (true, _) => read,
        (false, true) => pre,
        (false, false) => {
            let mut b = bytes::BytesMut::with_capacity(pre.len() + read.len());
            b.extend_from_slice(&pre);
            b.extend_from_slice(&read);
            b.freeze()
        }
    }
}

/// A client socket the direct upgrade path owns, as a session's leg.
pub trait IntoLeg {
    /// `rest`: bytes read from the client past the request head.
    fn into_leg(self, rest: Bytes) -> Leg;
}

impl IntoLeg for TcpStream {
    fn into_leg(self, rest: Bytes) -> Leg {
        Leg::Tcp(self, rest)
    }
}

impl IntoLeg for Box<TlsStream> {
    fn into_leg(self, rest: Bytes) -> Leg {
        Leg::Other(self, rest)
    }
}

/// A socket with bytes already read from it put back in front: what the
/// server read of a connection's first request before it handed the
/// connection to hyper. Writes go straight through.
pub struct Rewind<T> {
    pre: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(pre: Bytes, inner: T) -> Rewind<T> {
        Rewind { pre, inner }
    }

    /// The bytes not read yet, and the socket.
    pub fn into_parts(self) -> (Bytes, T) {
        (self.pre, self.inner)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pre.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.pre.len().min(buf.remaining());
        let pre = self.pre.split_to(n);
        buf.put_slice(&pre);
        if self.pre.is_empty() {
            // An empty slice would still hold the whole read buffer.
            self.pre = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn rewind_reads_the_put_back_bytes_first_in_pieces_then_the_socket() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut r = Rewind::new(Bytes::from_static(b"GET / HTTP/1.1\r\n"), a);
        b.write_all(b"host: x\r\n\r\n").await.unwrap();
        let mut small = [0u8; 5];
        r.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"GET /");
        let mut rest = vec![0u8; 11 + 11];
        r.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b" HTTP/1.1\r\nhost: x\r\n\r\n");
        r.write_all(b"ok").await.unwrap();
        let mut back = [0u8; 2];
        b.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ok");
        let (pre, _) = r.into_parts();
        assert!(pre.is_empty());
    }

    #[test]
    fn joined_keeps_order_and_avoids_copies_when_one_side_is_empty() {
        let read = Bytes::from_static(b"def");
        assert_eq!(joined(Bytes::new(), read.clone()).as_ptr(), read.as_ptr());
        assert_eq!(&joined(Bytes::from_static(b"abc"), read)[..], b"abcdef");
        assert_eq!(
            &joined(Bytes::from_static(b"abc"), Bytes::new())[..],
            b"abc"
        );
    }
}
