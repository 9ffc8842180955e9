//! Connecting to a backend: resolve, TCP (with `TCP_NODELAY`), then TLS for
//! `wss://` backends, all within the pool's connect timeout.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connected, Connection};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Why a connection to a backend could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("{host} resolved to no address")]
    NoAddress { host: String },
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Tcp(#[source] io::Error),
    /// The gateway itself is out of descriptors, ports or memory: says
    /// nothing about the backend, so it never counts against its health.
    #[error("the gateway is out of local resources: {0}")]
    Local(#[source] io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] io::Error),
    #[error("`{0}` is not a valid TLS server name")]
    ServerName(String),
}

impl ConnectError {
    /// Whether the failure is the gateway's own (see [`is_local`]).
    pub fn is_local(&self) -> bool {
        matches!(self, ConnectError::Local(_))
    }
}

/// Errors that come from this machine running out of something (file
/// descriptors, ephemeral ports, buffer or kernel memory), not from the peer.
pub fn is_local(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// Whether anything in an error's source chain is a local resource error.
pub fn chain_is_local(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(c) = e.downcast_ref::<ConnectError>() {
            return c.is_local();
        }
        if e.downcast_ref::<io::Error>().is_some_and(is_local) {
            return true;
        }
        cur = e.source();
    }
    false
}

fn tcp_error(e: io::Error) -> ConnectError {
    if is_local(&e) {
        ConnectError::Local(e)
    } else {
        ConnectError::Tcp(e)
    }
}

/// A connected backend stream, plain or TLS.
#[derive(Debug)]
pub enum BackendIo {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl BackendIo {
    /// The TCP socket under the stream.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            BackendIo::Tcp(s) => s,
            BackendIo::Tls(s) => s.get_ref().0,
        }
    }
}

/// Turns on TCP keepalive (`server.tcp_keepalive`): the first probe after
/// `idle` without traffic, then every quarter of it (1–30 s), 3 probes, so a
/// peer that vanished without a FIN is noticed within about `idle` + 3
/// intervals instead of never. Zero leaves the socket as it is.
pub fn keepalive(sock: socket2::SockRef<'_>, idle: Duration) {
    if idle.is_zero() {
        return;
    }
    let every = (idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
    let ka = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(every)
        .with_retries(3);
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "setting TCP keepalive failed");
    }
}

/// What `connect` needs to reach one backend.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub host: &'a str,
    /// The TLS server name (the DNS name of a discovered backend whose `host` is an address).
    pub sni: &'a str,
    pub port: u16,
    /// TLS connector for `wss://`/`https://`; `None` for plain TCP.
    pub tls: Option<&'a TlsConnector>,
}

pub async fn connect(t: Target<'_>, timeout: Duration) -> Result<BackendIo, ConnectError> {
    Ok(connect_sending(t, &[], timeout).await?.0)
}

/// Connects as [`connect`] and, where the connection is up as soon as
/// `connect(2)` returns (see [`connect_tcp`]), writes `first` at once.
/// Returns the stream and how much of `first` was written (0 for TLS).
pub async fn connect_sending(
    t: Target<'_>,
    first: &[u8],
    timeout: Duration,
) -> Result<(BackendIo, usize), ConnectError> {
    tokio::time::timeout(timeout, connect_inner(t, first))
        .await
        .map_err(|_| ConnectError::Timeout(timeout))?
}

async fn connect_inner(t: Target<'_>, first: &[u8]) -> Result<(BackendIo, usize), ConnectError> {
    // Nothing is written ahead of a TLS handshake.
    let first = if t.tls.is_some() { &[][..] } else { first };
    let (tcp, sent) = match t.host.parse::<std::net::IpAddr>() {
        Ok(ip) => connect_tcp((ip, t.port).into(), first)
            .await
            .map_err(tcp_error)?,
        // Boxed, as the TLS handshake below: a name to resolve is the rarer
        // case and costs a thread hop anyway.
        Err(_) => Box::pin(connect_named(t.host, t.port, first)).await?,
    };
    match t.tls {
        None => Ok((BackendIo::Tcp(tcp), sent)),
        Some(connector) => {
            let name = ServerName::try_from(t.sni.to_string())
                .map_err(|_| ConnectError::ServerName(t.sni.into()))?;
            // Boxed: inline, the TLS handshake's state would be part of
            // every upgrade's future (plain ones too), which is moved by
            // value as it is built (~1 KB more copied per handshake).
            let tls = Box::pin(connector.connect(name, tcp))
                .await
                .map_err(ConnectError::Tls)?;
            Ok((BackendIo::Tls(Box::new(tls)), 0))
        }
    }
}

/// Resolves `host` and connects to its addresses in turn (see
/// [`connect_tcp`]); the first that answers wins.
async fn connect_named(
    host: &str,
    port: u16,
    first: &[u8],
) -> Result<(TcpStream, usize), ConnectError> {
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| ConnectError::Resolve {
            host: host.into(),
            source,
        })?;
    let mut last = None;
    for a in addrs {
        match connect_tcp(a, first).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => tcp_error(e),
        None => ConnectError::NoAddress { host: host.into() },
    })
}

/// A TCP connection to `addr` with `TCP_NODELAY` (latency matters more than
/// packet count for interactive messages), and how much of `first` it wrote.
///
/// To a loopback address the kernel runs the whole TCP handshake inside
/// `connect(2)` (the SYN, SYN-ACK and ACK are processed before it returns
/// `EINPROGRESS`), so `first` is written right away: no wait for the
/// socket to turn writable, no `SO_ERROR` read, one wake-up less per
/// backend connection. Should the handshake not be done, the write says
/// `EAGAIN` and the ordinary wait follows; a refused connection says so
/// on the write. Other addresses take the ordinary path: there the
/// handshake is a round trip away and the early write would only fail.
async fn connect_tcp(addr: std::net::SocketAddr, first: &[u8]) -> io::Result<(TcpStream, usize)> {
    if first.is_empty() || !addr.ip().is_loopback() {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        return Ok((tcp, 0));
    }
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.nonblocking().cloexec(),
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_tcp_nodelay(true)?;
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // MSG_NOSIGNAL: a reset peer is an error here, never a SIGPIPE.
    let sent = match sock.send_with_flags(first, libc::MSG_NOSIGNAL) {
        Ok(n) => Some(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(e) => return Err(e),
    };
    let tcp = TcpStream::from_std(std::net::TcpStream::from(sock))?;
    match sent {
        Some(n) => Ok((tcp, n)),
        None => {
            tcp.writable().await?;
            match tcp.take_error()? {
                Some(e) => Err(e),
                None => Ok((tcp, 0)),
            }
        }
    }
}

/// Builds a connector for a pool's TLS client config.
pub fn tls_connector(cfg: Arc<rustls::ClientConfig>) -> TlsConnector {
    TlsConnector::from(cfg)
}

impl AsyncRead for BackendIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            BackendIo::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            BackendIo::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendIo::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            BackendIo::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            BackendIo::Tcp(s) => s.is_write_vectored(),
            BackendIo::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            BackendIo::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            BackendIo::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl Connection for BackendIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_loopback_backend_gets_the_first_bytes_with_the_connect() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (tcp, sent) = connect_tcp(addr, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("connect");
        assert_eq!(sent, 18, "written with the connect");
        assert!(tcp.nodelay().expect("nodelay"));
        let (mut s, _) = l.accept().await.expect("accept");
        let mut got = [0u8; 18];
        s.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"GET / HTTP/1.1\r\n\r\n");
        // Nothing to write: the ordinary connect.
        let (_tcp, sent) = connect_tcp(addr, b"").await.expect("connect");
        assert_eq!(sent, 0);
    }

    #[tokio::test]
    async fn a_refused_loopback_connect_fails_on_the_early_write() {
        // A port nobody listens on: bind, note the port, close.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let e = connect_tcp(addr, b"hello").await.expect_err("refused");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }

    /// A backend whose accept queue is full drops the SYN: `connect(2)`
    /// returns with the handshake not done, the early write says `EAGAIN`,
    /// and the ordinary wait for writability follows (the SYN is resent
    /// about a second later, once the queue has room).
    #[tokio::test]
    async fn a_handshake_not_done_at_once_falls_back_to_waiting() {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        sock.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        sock.listen(0).expect("listen");
        sock.set_nonblocking(true).expect("nonblocking");
        let l = tokio::net::TcpListener::from_std(sock.into()).expect("listener");
        let addr = l.local_addr().expect("addr");
        // Fill the accept queue (a backlog of 0 holds one connection, some
        // kernels one more): until a connect no longer completes.
        let mut held = Vec::new();
        for _ in 0..8 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
                Ok(c) => held.push(c.expect("fill")),
                Err(_) => break,
            }
        }
        assert!(held.len() < 8, "the accept queue never filled");
        let mut connecting = tokio::spawn(async move { connect_tcp(addr, b"hello").await });
        // Make room only after the early write had its chance.
        tokio::time::sleep(Duration::from_millis(200)).await;
        // (The dropped SYN is resent after the initial retransmission timeout, 1 s.)
        assert!(!connecting.is_finished(), "it waits for the handshake");
        let mut accepted = Vec::new();
        let (mut tcp, sent) = loop {
            tokio::select! {
                a = l.accept() => accepted.push(a.expect("accept")),
                r = &mut connecting => break r.expect("task").expect("connect"),
            }
        };
        assert_eq!(sent, 0, "nothing written before the handshake was done");
        tcp.write_all(b"hello").await.expect("write");
        let ours = tcp.local_addr().expect("addr");
        let mut s = loop {
            if let Some(i) = accepted.iter().position(|(_, peer)| *peer == ours) {
                break accepted.swap_remove(i).0;
            }
            accepted.push(l.accept().await.expect("accept"));
        };
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"hello");
        drop(held);
    }
}
