//! One client connection: who it is (address, TLS, its connection-limit
//! slot), how busy it is (for the idle watchdog), and, after an upgrade,
//! taking its socket back from hyper for a session.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::metrics::ListenerStats;
use crate::session::splice::Io;

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
        match up.downcast::<TokioIo<crate::tls::stream::TlsStream>>() {
            Ok(p) => return Leg::Other(Box::new(p.io.into_inner()), p.read_buf),
            Err(up) => up,
        }
    } else {
        match up.downcast::<TokioIo<TcpStream>>() {
            Ok(p) => return Leg::Tcp(p.io.into_inner(), p.read_buf),
            Err(up) => up,
        }
    };
    Leg::Other(Box::new(TokioIo::new(up)), Bytes::new())
}
