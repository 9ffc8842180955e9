//! Listeners, the accept loop, TLS and HTTP serving, and graceful shutdown.
//!
//! `Gateway::bind` does everything that can fail at startup (certificates,
//! pools, sockets) so `run` only serves. `run` takes its shutdown signal from
//! the caller, so tests run many gateways in one process.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::util::BoxCloneSyncService;
use tower::ServiceBuilder;
use tracing::{debug, info, warn, Instrument};

use crate::config::{Config, ServerSettings};
use crate::error::Body;
use crate::pool::{system_resolver, PoolError, Resolver};
use crate::proxy::{self, ConnInfo, Shared, Snapshot};
use crate::tls::{self, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{}:{line}: listen[{index}].tls: {source}", file.display())]
    Tls {
        file: std::path::PathBuf,
        line: usize,
        index: usize,
        #[source]
        source: TlsError,
    },
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The plain-HTTP middleware stack: request ids, tracing, a response timeout.
type HttpService = BoxCloneSyncService<Request<Incoming>, Response<Body>, Infallible>;

struct Listener {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
}

/// A gateway with its sockets bound, ready to `run`.
pub struct Gateway {
    listeners: Vec<Listener>,
    /// The admin listener and its token, when configured.
    admin: Option<(TcpListener, Option<String>)>,
    shared: Arc<Shared>,
    settings: ServerSettings,
    /// Resolves `discover: dns` backends.
    resolver: Resolver,
}

/// What shutdown found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drained {
    /// Connections and sessions that ended within the grace period.
    pub finished_in_grace: bool,
    /// Tasks still running when the grace period ended (closed by force).
    pub cut: usize,
}

impl Gateway {
    /// Loads certificates, builds pools and binds every listener.
    pub async fn bind(config: &Config) -> Result<Gateway, StartError> {
        Gateway::bind_with_resolver(config, system_resolver()).await
    }

    /// Like [`bind`](Self::bind), with the resolver used for `discover: dns`
    /// backends (tests pass one they control). Discovered backends are
    /// resolved once before this returns.
    pub async fn bind_with_resolver(
        config: &Config,
        resolver: Resolver,
    ) -> Result<Gateway, StartError> {
        let snapshot = Snapshot::new(config)?;
        for pool in snapshot.pools.iter().filter(|p| p.discovers()) {
            pool.refresh(&resolver).await;
        }
        let mut listeners = Vec::new();
        for (index, l) in config.listeners.iter().enumerate() {
            let tls = match &l.tls {
                None => None,
                Some(files) => {
                    let cfg = tls::server_config(files).map_err(|source| StartError::Tls {
                        file: config.source.clone(),
                        line: files.first().map_or(0, |f| f.line),
                        index,
                        source,
                    })?;
                    Some(TlsAcceptor::from(cfg))
                }
            };
            let listener = bind_socket(l.addr).map_err(|source| StartError::Bind {
                addr: l.addr,
                source,
            })?;
            listeners.push(Listener { listener, tls });
        }
        let admin = match &config.admin {
            None => None,
            Some(a) => Some((
                bind_socket(a.addr).map_err(|source| StartError::Bind {
                    addr: a.addr,
                    source,
                })?,
                a.token.clone(),
            )),
        };
        Ok(Gateway {
            listeners,
            admin,
            resolver,
            settings: config.server.clone(),
            shared: Arc::new(Shared {
                snapshot: ArcSwap::from_pointee(snapshot),
                tasks: TaskTracker::new(),
                hard_stop: CancellationToken::new(),
                draining: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// The admin listener's address, when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// The bound addresses, in config order (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.listener.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` completes, then drains for the grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Drained {
        let stop = CancellationToken::new();
        let limit = Arc::new(Semaphore::new(self.settings.max_connections));
        let builders = Arc::new(http_builders(&self.settings));
        let http = http_service(&self.settings);
        crate::checker::spawn(
            &self.shared.snapshot.load().pools,
            &self.shared.tasks,
            &stop,
        );
        {
            let snap = self.shared.snapshot.load_full();
            for (hub, route) in snap.hubs.iter().zip(snap.routes.routes()) {
                if let Some(hub) = hub.as_ref().filter(|h| h.cfg.eager) {
                    hub.open_eager(&self.shared, route);
                }
            }
        }
        for pool in self
            .shared
            .snapshot
            .load()
            .pools
            .iter()
            .filter(|p| p.discovers())
        {
            let (pool, resolver, stop) = (pool.clone(), self.resolver.clone(), stop.clone());
            self.shared.tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(pool.dns_refresh) => pool.refresh(&resolver).await,
                        _ = stop.cancelled() => return,
                    }
                }
            });
        }
        // The admin listener outlives the drain, so /readyz can report it.
        let admin_stop = CancellationToken::new();
        let admin_task = self.admin.map(|(l, token)| {
            tokio::spawn(crate::admin::serve(
                l,
                self.shared.clone(),
                token,
                admin_stop.clone(),
            ))
        });
        let mut accepts = tokio::task::JoinSet::new();
        for l in self.listeners {
            let cx = AcceptCx {
                shared: self.shared.clone(),
                stop: stop.clone(),
                limit: limit.clone(),
                builders: builders.clone(),
                http: http.clone(),
                handshake_timeout: self.settings.handshake_timeout,
            };
            accepts.spawn(accept_loop(l, cx));
        }
        shutdown.await;
        info!(
            "shutting down: no new connections; live ones have {:?} to finish",
            self.settings.shutdown_grace
        );
        self.shared
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        stop.cancel();
        accepts.shutdown().await;
        let tasks = &self.shared.tasks;
        tasks.close();
        let finished = tokio::time::timeout(self.settings.shutdown_grace, tasks.wait())
            .await
            .is_ok();
        let cut = tasks.len();
        if !finished {
            warn!(cut, "grace period over: closing the remaining connections");
            self.shared.hard_stop.cancel();
            if tokio::time::timeout(Duration::from_secs(5), tasks.wait())
                .await
                .is_err()
            {
                warn!(
                    left = tasks.len(),
                    "some tasks did not stop after being cancelled"
                );
            }
        }
        admin_stop.cancel();
        if let Some(t) = admin_task {
            let _ = t.await;
        }
        info!(finished_in_grace = finished, cut, "stopped");
        Drained {
            finished_in_grace: finished,
            cut,
        }
    }
}

fn bind_socket(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    TcpListener::from_std(sock.into())
}

/// The HTTP/1.1 and HTTP/2 connection builders, configured once.
///
/// We pick the protocol ourselves (ALPN on TLS, a peek at the preface on
/// plain TCP) instead of using hyper-util's auto builder: it wraps the socket
/// in a private rewind type, and a WebSocket session wants the raw
/// `TcpStream` back after the upgrade.
struct HttpBuilders {
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

fn http_builders(s: &ServerSettings) -> HttpBuilders {
    let mut h1 = hyper::server::conn::http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(s.handshake_timeout)
        .max_header_size(s.max_header_bytes)
        .max_buf_size(s.max_header_bytes.max(8192) + 8192)
        .max_headers(s.max_headers);
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(s.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    HttpBuilders { h1, h2 }
}

/// Whether a plain-TCP client opens with the HTTP/2 preface (`PRI * HTTP/2.0`).
/// No HTTP/1.1 method starts with `PRI`, so three bytes decide.
async fn is_h2_preface(tcp: &TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; 3];
    loop {
        let n = tcp.peek(&mut buf).await?;
        if n == 0 || buf[0] != b'P' || (n >= 2 && buf[1] != b'R') {
            return Ok(false);
        }
        if n >= 3 {
            return Ok(buf[2] == b'I');
        }
        // A client that trickles its first bytes: look again shortly (bounded by the caller's timeout).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn http_service(s: &ServerSettings) -> HttpService {
    use http_body_util::BodyExt;
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
    let svc = ServiceBuilder::new()
        .map_response(|r: Response<_>| {
            r.map(|b: tower_http::trace::ResponseBody<Body, _>| {
                b.map_err(Into::into).boxed_unsync()
            })
        })
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            s.request_timeout,
        ))
        .service_fn(proxy::proxy_http);
    BoxCloneSyncService::new(svc)
}

struct AcceptCx {
    shared: Arc<Shared>,
    stop: CancellationToken,
    limit: Arc<Semaphore>,
    builders: Arc<HttpBuilders>,
    http: HttpService,
    handshake_timeout: Duration,
}

async fn accept_loop(l: Listener, cx: AcceptCx) {
    let cx = Arc::new(cx);
    loop {
        let permit = tokio::select! {
            p = cx.limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = cx.stop.cancelled() => return,
        };
        let (tcp, peer) = tokio::select! {
            r = l.listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = cx.stop.cancelled() => return,
        };
        let _ = tcp.set_nodelay(true);
        let info = Arc::new(ConnInfo {
            peer,
            tls: l.tls.is_some(),
            _permit: Some(permit),
        });
        let span = tracing::debug_span!("conn", %peer);
        let tls = l.tls.clone();
        let cx2 = cx.clone();
        cx.shared.tasks.spawn(
            async move {
                match tls {
                    None => {
                        match tokio::time::timeout(cx2.handshake_timeout, is_h2_preface(&tcp)).await
                        {
                            Ok(Ok(h2)) => serve(cx2, info, tcp, h2).await,
                            Ok(Err(e)) => {
                                debug!(error = %e, "connection failed before its first request")
                            }
                            Err(_) => debug!("no request within the handshake timeout"),
                        }
                    }
                    // Boxed: the TLS state is large, and this keeps it out of
                    // the task of every connection, plain ones included.
                    Some(acceptor) => {
                        let handshake = Box::pin(acceptor.accept(tcp));
                        match tokio::time::timeout(cx2.handshake_timeout, handshake).await {
                            Ok(Ok(s)) => {
                                let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
                                Box::pin(serve(cx2, info, s, h2)).await
                            }
                            Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                            Err(_) => debug!("TLS handshake timed out"),
                        }
                    }
                }
            }
            .instrument(span),
        );
    }
}

/// Drives a hyper connection until it ends; on shutdown asks it to finish
/// gracefully and keeps polling it, until the hard stop.
macro_rules! drive {
    ($cx:expr, $conn:expr) => {{
        // Boxed: the connection's state is freed as soon as it ends (at an
        // upgrade), while the task itself may be referenced a little longer.
        let mut conn = Box::pin($conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = $cx.stop.cancelled() => {
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    r = conn.as_mut() => r,
                    _ = $cx.shared.hard_stop.cancelled() => Ok(()),
                }
            }
        }
    }};
}

async fn serve<I>(cx: Arc<AcceptCx>, info: Arc<ConnInfo>, io: I, h2: bool)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = cx.shared.clone();
    let http = cx.http.clone();
    let svc = hyper::service::service_fn(move |req| {
        proxy::handle(shared.clone(), info.clone(), http.clone(), req)
    });
    let io = TokioIo::new(io);
    let res = if h2 {
        drive!(cx, cx.builders.h2.serve_connection(io, svc))
    } else {
        drive!(cx, cx.builders.h1.serve_connection(io, svc).with_upgrades())
    };
    if let Err(e) = res {
        debug!(error = %e, "connection ended with an error");
    }
}
