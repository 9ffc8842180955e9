//! Moves bytes both ways between an upgraded client and its backend.
//!
//! No frame parsing: compression, subprotocols and close codes pass through
//! untouched. Each direction ends on EOF and half-closes the other side's
//! write half, so a peer that shuts down its sending side still receives
//! until the other peer is done.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite};

/// Copy buffer per direction.
pub const BUF_SIZE: usize = 16 * 1024;

/// Bytes moved by a finished splice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

/// Runs until both directions have reached EOF (or one fails).
pub async fn splice<C, B>(client: &mut C, backend: &mut B) -> io::Result<Moved>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (up, down) =
        tokio::io::copy_bidirectional_with_sizes(client, backend, BUF_SIZE, BUF_SIZE).await?;
    Ok(Moved {
        client_to_backend: up,
        backend_to_client: down,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair of loopback TCP sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn moves_bytes_both_ways_and_honours_half_close() {
        let (mut client, mut gw_client) = pair().await;
        let (mut gw_backend, mut backend) = pair().await;
        let task = tokio::spawn(async move { splice(&mut gw_client, &mut gw_backend).await });

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

        let moved = task.await.unwrap().unwrap();
        assert_eq!(
            moved,
            Moved {
                client_to_backend: 5,
                backend_to_client: 10
            }
        );
    }

    #[tokio::test]
    async fn large_transfers_arrive_intact() {
        let (mut client, mut gw_client) = pair().await;
        let (mut gw_backend, mut backend) = pair().await;
        tokio::spawn(async move { splice(&mut gw_client, &mut gw_backend).await });
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
        writer.await.unwrap();
    }
}
