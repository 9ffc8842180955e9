//! Accepting connections: the accept loop of one listener (connection-limit
//! permit, one deadline to a complete first head, PROXY header, TLS), the
//! back-off on failed accepts, and the HTTP builders and middleware every
//! connection is served with.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::util::BoxCloneSyncService;
use tower::ServiceBuilder;
use tracing::{debug, info, warn, Instrument};

use super::connection::serve_first;
use super::Listener;
use crate::config::ServerSettings;
use crate::error::Body;
use crate::proxy;
use crate::session::conn::ConnInfo;
use crate::state::Shared;

/// The plain-HTTP middleware stack's service type.
pub(super) type HttpService = BoxCloneSyncService<Request<Incoming>, Response<Body>, Infallible>;

/// The HTTP/1.1 and HTTP/2 connection builders, configured once.
///
/// We pick the protocol ourselves (ALPN on TLS, a peek at the preface on
/// plain TCP) instead of using hyper-util's auto builder: it wraps the socket
/// in a private rewind type, and a WebSocket session wants the raw
/// `TcpStream` back after the upgrade.
pub(super) struct HttpBuilders {
    pub(super) h1: hyper::server::conn::http1::Builder,
    pub(super) h2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

pub(super) fn http_builders(s: &ServerSettings) -> HttpBuilders {
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
        .keep_alive_timeout(Duration::from_secs(20))
        // WebSockets over HTTP/2 (RFC 8441).
        .enable_connect_protocol();
    HttpBuilders { h1, h2 }
}

/// The plain-HTTP middleware stack: request ids, tracing, a response timeout.
pub(super) fn http_service(s: &ServerSettings) -> HttpService {
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

/// What every accepted connection of a gateway shares.
pub(super) struct AcceptCx {
    pub(super) shared: Arc<Shared>,
    pub(super) stop: CancellationToken,
    pub(super) limit: Arc<Semaphore>,
    pub(super) builders: Arc<HttpBuilders>,
    pub(super) http: HttpService,
    pub(super) handshake_timeout: Duration,
    pub(super) idle_timeout: Duration,
    /// The first head's limits, as hyper's (past them, hyper answers).
    pub(super) max_header_bytes: usize,
    pub(super) max_headers: usize,
}

pub(super) async fn accept_loop(l: Listener, cx: Arc<AcceptCx>, stop: CancellationToken) {
    let mut failing = AcceptErrors::default();
    loop {
        let permit = tokio::select! {
            p = cx.limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.cancelled() => return,
        };
        let (tcp, peer) = tokio::select! {
            r = l.listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    l.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    let pause = failing.note(&e, l.stats.addr);
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.cancelled() => return,
                    }
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        failing.recovered(l.stats.addr);
        // One deadline from here to a complete first request head: PROXY
        // header, TLS handshake and the head share `handshake_timeout`.
        let deadline = tokio::time::Instant::now() + cx.handshake_timeout;
        let tls = l.tls.load_full();
        let proxy_protocol = l.proxy_protocol.load(Ordering::Relaxed);
        l.stats.accepted.fetch_add(1, Ordering::Relaxed);
        l.stats.active.fetch_add(1, Ordering::Relaxed);
        let mut info = ConnInfo::new(peer, tls.is_some(), Some(permit), l.stats.clone());
        let span = tracing::debug_span!("conn", %peer, client = tracing::field::Empty);
        let cx2 = cx.clone();
        // Boxed before the spawn, as a session's (see `serve_first`).
        let conn = Box::pin(
            async move {
                // Boxed: the PROXY header and the TLS handshake are done
                // before the first request, and their state must not size
                // the task that may hold a session for its life. (Bound
                // first: a temporary of the `let else` would live on.)
                let ready = Box::pin(ready(tcp, &mut info, tls, proxy_protocol, deadline)).await;
                let Some(stream) = ready else { return };
                let info = Arc::new(info);
                match stream {
                    Stream::Plain(tcp) => serve_first(cx2, info, tcp, true, deadline).await,
                    Stream::Tls(s, h2) => serve_first(cx2, info, s, h2, deadline).await,
                }
            }
            .instrument(span),
        );
        cx.shared.life.tasks.spawn(conn);
    }
}

/// A connection ready for its first request.
enum Stream {
    Plain(TcpStream),
    /// Boxed: a session keeps it as its `Box<dyn Io>` leg. `bool`: ALPN chose HTTP/2.
    Tls(Box<crate::tls::stream::TlsStream>, bool),
}

/// The PROXY header (`proxy_protocol`: its source becomes the peer) and the
/// TLS handshake, by `deadline`; `None` once the connection is over.
async fn ready(
    mut tcp: TcpStream,
    info: &mut ConnInfo,
    tls: Option<Arc<rustls::ServerConfig>>,
    proxy_protocol: bool,
    deadline: tokio::time::Instant,
) -> Option<Stream> {
    if proxy_protocol {
        let header =
            tokio::time::timeout_at(deadline, crate::server::proxy_protocol::read(&mut tcp)).await;
        match header {
            Ok(Ok(h)) => {
                if let Some(client) = h.source {
                    info.peer = client;
                    tracing::Span::current().record("client", tracing::field::display(client));
                }
            }
            Ok(Err(e)) => {
                info.listener
                    .proxy_header_failed
                    .fetch_add(1, Ordering::Relaxed);
                debug!(error = %e, "connection closed");
                return None;
            }
            Err(_) => {
                info.listener
                    .proxy_header_failed
                    .fetch_add(1, Ordering::Relaxed);
                debug!("no PROXY header within the handshake timeout");
                return None;
            }
        }
    }
    let Some(config) = tls else {
        return Some(Stream::Plain(tcp));
    };
    let r =
        tokio::time::timeout_at(deadline, crate::tls::stream::TlsStream::accept(tcp, config)).await;
    let counter = if matches!(r, Ok(Ok(_))) {
        &info.listener.tls_ok
    } else {
        &info.listener.tls_failed
    };
    counter.fetch_add(1, Ordering::Relaxed);
    match r {
        Ok(Ok(s)) => {
            let h2 = s.alpn_protocol() == Some(b"h2");
            Some(Stream::Tls(Box::new(s), h2))
        }
        Ok(Err(e)) => {
            debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            info.listener
                .handshake_timeouts
                .fetch_add(1, Ordering::Relaxed);
            debug!("no TLS handshake within the handshake timeout");
            None
        }
    }
}

/// Failed accepts: out of file descriptors (EMFILE/ENFILE) or kernel memory,
/// or a connection reset before it was taken. The loop backs off (doubling,
/// up to a second) and logs once per interval with a count, instead of
/// spinning and logging every attempt.
#[derive(Default)]
struct AcceptErrors {
    /// Failures since the last log line.
    unlogged: u64,
    last_log: Option<tokio::time::Instant>,
    pause: Duration,
}

impl AcceptErrors {
    const LOG_EVERY: Duration = Duration::from_secs(5);

    /// Records a failure; returns how long to pause before the next accept.
    fn note(&mut self, e: &std::io::Error, addr: SocketAddr) -> Duration {
        self.unlogged += 1;
        let now = tokio::time::Instant::now();
        if self.last_log.is_none_or(|t| now - t >= Self::LOG_EVERY) {
            warn!(listener = %addr, error = %e, failures = self.unlogged, "accept failed; backing off");
            self.unlogged = 0;
            self.last_log = Some(now);
        }
        self.pause = (self.pause * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        self.pause
    }

    fn recovered(&mut self, addr: SocketAddr) {
        if self.pause.is_zero() {
            return;
        }
        if self.unlogged > 0 {
            warn!(listener = %addr, failures = self.unlogged, "accept failed (since the last report)");
        }
        info!(listener = %addr, "accepting again");
        *self = AcceptErrors::default();
    }
}
