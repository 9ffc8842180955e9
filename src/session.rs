//! One upgraded WebSocket session: wait for both upgrades, take the sockets
//! back from hyper (plain TCP or TLS streams, with the bytes hyper had read
//! past the HTTP head), splice, and log how it ended.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::{debug, Instrument};

use crate::pool::BackendGuard;
use crate::proxy::{ConnInfo, Shared};
use crate::splice::{self, Io};
use crate::upstream::BackendIo;

/// One side of a session after the upgrade, with the bytes hyper had
/// already read past the HTTP head.
enum Leg {
    /// A raw socket: the fast, monomorphised path.
    Tcp(TcpStream, Bytes),
    /// A TLS stream (or, should a downcast ever fail, hyper's own upgraded type).
    Other(Box<dyn Io>, Bytes),
}

impl Leg {
    fn into_io(self) -> (Box<dyn Io>, Bytes) {
        match self {
            Leg::Tcp(s, pending) => (Box::new(s), pending),
            Leg::Other(io, pending) => (io, pending),
        }
    }
}

/// The client side: the listener's socket type comes back from hyper.
fn client_leg(up: Upgraded, tls: bool) -> Leg {
    let up = if tls {
        match up.downcast::<TokioIo<tokio_rustls::server::TlsStream<TcpStream>>>() {
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

fn backend_leg(up: Upgraded) -> Leg {
    match up.downcast::<TokioIo<BackendIo>>() {
        Ok(p) => match p.io.into_inner() {
            BackendIo::Tcp(s) => Leg::Tcp(s, p.read_buf),
            tls => Leg::Other(Box::new(tls), p.read_buf),
        },
        Err(up) => Leg::Other(Box::new(TokioIo::new(up)), Bytes::new()),
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
            let client = client_leg(client, conn.tls);
            let backend = backend_leg(backend);
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
        (Leg::Tcp(mut c, cp), Leg::Tcp(mut b, bp)) => splice::splice(&mut c, cp, &mut b, bp).await,
        (c, b) => {
            let ((mut c, cp), (mut b, bp)) = (c.into_io(), b.into_io());
            // Boxed: keeps this path's state out of every plain session's task.
            Box::pin(splice::splice(&mut c, cp, &mut b, bp)).await
        }
    }
}
