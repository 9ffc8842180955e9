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
    tokio::time::timeout(timeout, connect_inner(t))
        .await
        .map_err(|_| ConnectError::Timeout(timeout))?
}

async fn connect_inner(t: Target<'_>) -> Result<BackendIo, ConnectError> {
    let tcp = match t.host.parse::<std::net::IpAddr>() {
        Ok(ip) => TcpStream::connect((ip, t.port)).await.map_err(tcp_error)?,
        Err(_) => {
            let addrs = tokio::net::lookup_host((t.host, t.port))
                .await
                .map_err(|source| ConnectError::Resolve {
                    host: t.host.into(),
                    source,
                })?;
            let mut last = None;
            let mut stream = None;
            for a in addrs {
                match TcpStream::connect(a).await {
                    Ok(s) => {
                        stream = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            match (stream, last) {
                (Some(s), _) => s,
                (None, Some(e)) => return Err(tcp_error(e)),
                (None, None) => {
                    return Err(ConnectError::NoAddress {
                        host: t.host.into(),
                    })
                }
            }
        }
    };
    // Latency matters more than packet count for interactive messages.
    tcp.set_nodelay(true).map_err(ConnectError::Tcp)?;
    match t.tls {
        None => Ok(BackendIo::Tcp(tcp)),
        Some(connector) => {
            let name = ServerName::try_from(t.sni.to_string())
                .map_err(|_| ConnectError::ServerName(t.sni.into()))?;
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(ConnectError::Tls)?;
            Ok(BackendIo::Tls(Box::new(tls)))
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
