//! Moves bytes both ways between an upgraded client and its backend.
//!
//! No frame parsing: compression, subprotocols and close codes pass through
//! untouched. Each direction ends on EOF and half-closes the other side's
//! write half, so a peer that shuts down its sending side still receives
//! until the other peer is done. An error in either direction ends both.
//!
//! Two paths:
//! - [`splice_tcp`], when both legs are plain TCP: waits for readiness and
//!   only then borrows a copy buffer from a per-thread pool, returning it as
//!   soon as the bytes are written. An idle session holds no buffer at all,
//!   which is what keeps an idle connection's memory small.
//! - [`splice`], for anything else (TLS legs): `copy_bidirectional` with
//!   small buffers.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Copy buffer of the plain-TCP path, borrowed per read.
pub const BUF_SIZE: usize = 32 * 1024;
/// Copy buffer per direction of the generic path.
pub const GENERIC_BUF_SIZE: usize = 8 * 1024;
/// Buffers kept for reuse per runtime thread; beyond this they are freed.
const POOL_MAX: usize = 64;

/// Bytes moved by a finished splice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
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
    fn as_mut(&mut self) -> &mut [u8] {
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

// Readiness goes through `poll_*_ready`, not `readable()`/`writable()`: the
// poll form replaces the single waker slot of the socket, which still holds
// the waker of the hyper connection task that owned the socket before the
// upgrade. Left there, that stale waker would keep the finished connection
// task's memory alive for the whole session.
async fn readable(s: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| s.poll_read_ready(cx)).await
}

async fn writable(s: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| s.poll_write_ready(cx)).await
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => writable(to).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One direction: `pending` first (bytes read before the upgrade), then
/// whatever `from` sends, until EOF; then half-closes `to`.
async fn pump(from: &TcpStream, to: &TcpStream, pending: Bytes) -> io::Result<u64> {
    let mut total = pending.len() as u64;
    if !pending.is_empty() {
        write_all(to, &pending).await?;
    }
    drop(pending);
    loop {
        readable(from).await?;
        let mut buf = Buf::take();
        match from.try_read(buf.as_mut()) {
            Ok(0) => {
                // Half-close: the other direction keeps going. Ignore ENOTCONN from a peer already gone.
                let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                return Ok(total);
            }
            Ok(n) => {
                write_all(to, &buf.as_mut()[..n]).await?;
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Splices two plain TCP streams. `*_pending` are bytes each side sent that
/// were read before the upgrade finished; they are delivered first.
pub async fn splice_tcp(
    client: &TcpStream,
    client_pending: Bytes,
    backend: &TcpStream,
    backend_pending: Bytes,
) -> io::Result<Moved> {
    let (up, down) = tokio::try_join!(
        pump(client, backend, client_pending),
        pump(backend, client, backend_pending)
    )?;
    Ok(Moved {
        client_to_backend: up,
        backend_to_client: down,
    })
}

/// Runs until both directions have reached EOF (or one fails).
pub async fn splice<C, B>(client: &mut C, backend: &mut B) -> io::Result<Moved>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (up, down) = tokio::io::copy_bidirectional_with_sizes(
        client,
        backend,
        GENERIC_BUF_SIZE,
        GENERIC_BUF_SIZE,
    )
    .await?;
    Ok(Moved {
        client_to_backend: up,
        backend_to_client: down,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of loopback TCP sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
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
                if generic {
                    splice(&mut gw_client, &mut gw_backend).await
                } else {
                    splice_tcp(&gw_client, Bytes::new(), &gw_backend, Bytes::new()).await
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
        let (mut client, gw_client) = pair().await;
        let (gw_backend, mut backend) = pair().await;
        let task = tokio::spawn(async move {
            splice_tcp(
                &gw_client,
                Bytes::from_static(b"early-"),
                &gw_backend,
                Bytes::from_static(b"hi-"),
            )
            .await
        });
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
                backend_to_client: 8
            }
        );
    }

    #[tokio::test]
    async fn a_reset_ends_both_directions() {
        let (client, gw_client) = pair().await;
        let (gw_backend, mut backend) = pair().await;
        let task = tokio::spawn(async move {
            splice_tcp(&gw_client, Bytes::new(), &gw_backend, Bytes::new()).await
        });
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
