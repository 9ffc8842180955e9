//! Listeners, the accept loop, TLS and HTTP serving, and graceful shutdown.
//!
//! `Gateway::bind` does everything that can fail at startup (certificates,
//! pools, sockets) so `run` only serves. `run` takes its shutdown signal from
//! the caller, so tests run many gateways in one process.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
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
use tower::util::BoxCloneSyncService;
use tower::ServiceBuilder;
use tracing::{debug, error, info, warn, Instrument};

use crate::config::{Config, ServerSettings};
use crate::conn::ConnInfo;
use crate::error::Body;
use crate::pool::{system_resolver, Pool, PoolError, Resolver};
use crate::proxy;
use crate::state::Shared;
use crate::tls::{self, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{}:{line}: listen[{index}].tls: {source}", file.display())]
    Tls {
        file: std::path::PathBuf,
        line: usize,
        index: usize,
        #[source]
        source: Box<TlsError>,
    },
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("TLS session resumption: {0}")]
    Resumption(#[source] Box<TlsError>),
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
    stats: Arc<crate::metrics::ListenerStats>,
    /// Swapped by a reload (new certificates) without touching the socket.
    tls: Arc<arc_swap::ArcSwapOption<TlsAcceptor>>,
    /// `proxy_protocol:`, also changed by a reload.
    proxy_protocol: Arc<AtomicBool>,
}

/// A listener being served: how to stop it and where its TLS settings live.
struct Live {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    tls: Arc<arc_swap::ArcSwapOption<TlsAcceptor>>,
    proxy_protocol: Arc<AtomicBool>,
    stats: Arc<crate::metrics::ListenerStats>,
}

/// A gateway with its sockets bound, ready to `run`.
pub struct Gateway {
    listeners: Vec<Listener>,
    /// The admin listener and its settings, when configured.
    admin: Option<(TcpListener, crate::config::AdminConfig)>,
    pub(crate) shared: Arc<Shared>,
    settings: ServerSettings,
    /// Resolves `discover: dns` backends.
    resolver: Resolver,
    /// Reload requests (SIGHUP, `POST /reload`, the file watcher).
    reloads: tokio::sync::mpsc::Receiver<crate::state::ReloadRequest>,
    /// Ticket keys and session cache, kept across reloads.
    resumption: tls::Resumption,
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
        let snapshot = crate::reload::initial(config)?;
        for pool in snapshot.pools.iter().filter(|p| p.discovers()) {
            pool.refresh(&resolver).await;
        }
        let resumption = tls::Resumption::new().map_err(|e| StartError::Resumption(Box::new(e)))?;
        let tls = tls_acceptors(config, &resumption)?;
        let mut listeners = Vec::new();
        for (l, tls) in config.listeners.iter().zip(tls) {
            let listener = bind_socket(l.addr, config.server.tcp_keepalive).map_err(|source| {
                StartError::Bind {
                    addr: l.addr,
                    source,
                }
            })?;
            listeners.push(Listener {
                stats: Arc::new(crate::metrics::ListenerStats::new(
                    listener.local_addr().unwrap_or(l.addr),
                )),
                listener,
                tls: Arc::new(arc_swap::ArcSwapOption::new(tls.map(Arc::new))),
                proxy_protocol: Arc::new(AtomicBool::new(l.proxy_protocol)),
            });
        }
        let admin = match &config.admin {
            None => None,
            Some(a) => Some((
                bind_socket(a.addr, config.server.tcp_keepalive).map_err(|source| {
                    StartError::Bind {
                        addr: a.addr,
                        source,
                    }
                })?,
                a.clone(),
            )),
        };
        let (reload_tx, reloads) = tokio::sync::mpsc::channel(8);
        Ok(Gateway {
            listeners,
            admin,
            resolver,
            settings: config.server.clone(),
            reloads,
            resumption,
            shared: Arc::new(Shared {
                snapshot: ArcSwap::from_pointee(snapshot),
                life: crate::lifecycle::Lifecycle::default(),
                draining: std::sync::atomic::AtomicBool::new(false),
                reload: reload_tx,
                stats: Default::default(),
                listeners: Default::default(),
            }),
        })
    }

    /// A handle that asks the running gateway to reload its config file.
    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle(self.shared.reload.clone())
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
    /// Reload requests are applied in between, one at a time.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Drained {
        let stop = CancellationToken::new();
        let limit = Arc::new(Semaphore::new(self.settings.max_connections));
        let cx = Arc::new(AcceptCx {
            shared: self.shared.clone(),
            stop: stop.clone(),
            limit,
            builders: Arc::new(http_builders(&self.settings)),
            http: http_service(&self.settings),
            handshake_timeout: self.settings.handshake_timeout,
            idle_timeout: self.settings.idle_timeout,
        });
        let snap = self.shared.snapshot.load_full();
        for pool in &snap.pools {
            start_pool(pool, &self.shared, &self.resolver);
        }
        for (hub, route) in snap.hubs.iter().zip(snap.routes.routes()) {
            if let Some(hub) = hub.as_ref().filter(|h| h.cfg.eager) {
                hub.open_eager(&self.shared.life, route);
            }
        }
        // The admin listener outlives the drain, so /readyz can report it.
        let admin_stop = CancellationToken::new();
        let admin_task = self.admin.take().map(|(l, settings)| {
            tokio::spawn(crate::admin::serve(
                l,
                self.shared.clone(),
                settings,
                admin_stop.clone(),
            ))
        });
        let mut live = std::collections::HashMap::new();
        for (l, lc) in std::mem::take(&mut self.listeners)
            .into_iter()
            .zip(&snap.config.listeners)
        {
            live.insert(lc.addr, serve_listener(l, &cx));
        }
        drop(snap);
        if !self.settings.watch_interval.is_zero() {
            let (shared, every, until) = (
                self.shared.clone(),
                self.settings.watch_interval,
                stop.clone(),
            );
            crate::supervise::spawn(
                &self.shared.life.tasks,
                self.shared.life.panics.clone(),
                crate::supervise::Kind::ConfigWatch,
                "config file".into(),
                stop.clone(),
                move || crate::watch::run(shared.clone(), every, until.clone()),
            );
        }

        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(req) = self.reloads.recv() => {
                    let r = self.reload(&mut live, &cx).await;
                    let _ = req.reply.send(r);
                }
            }
        }

        info!(
            "shutting down: no new connections; live ones have {:?} to finish",
            self.settings.shutdown_grace
        );
        self.shared
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.life.shutdown.cancel();
        stop.cancel();
        // The sockets close once their accept loops are gone: from then on a
        // new process sharing the ports (SO_REUSEPORT) gets every connection.
        for (_, l) in live.drain() {
            l.stop.cancel();
            let _ = l.task.await;
        }
        info!("listeners closed; draining");
        for pool in &self.shared.snapshot.load().pools {
            pool.life.cancel();
        }
        let tasks = &self.shared.life.tasks;
        tasks.close();
        let finished = tokio::time::timeout(self.settings.shutdown_grace, tasks.wait())
            .await
            .is_ok();
        let cut = tasks.len();
        if !finished {
            warn!(cut, "grace period over: closing the remaining connections");
            self.shared.life.hard_stop.cancel();
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

    /// Loads the config file again and swaps it in, or keeps the running one
    /// and says why. Everything that can fail (parsing, certificates, new
    /// sockets, pools) happens before anything changes.
    async fn reload(
        &self,
        live: &mut std::collections::HashMap<SocketAddr, Live>,
        cx: &Arc<AcceptCx>,
    ) -> Result<String, String> {
        let stats = &self.shared.stats;
        let old = self.shared.snapshot.load_full();
        let refused = |e: String| {
            stats
                .reloads_failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            error!(error = %e, "reload refused; the running config stays");
            Err(e)
        };
        let cfg = match Config::load(&old.config.source) {
            Ok(c) => c,
            Err(e) => return refused(e.to_string()),
        };
        let tls = match tls_acceptors(&cfg, &self.resumption) {
            Ok(t) => t,
            Err(e) => return refused(e.to_string()),
        };
        let mut fresh = Vec::new();
        for l in cfg.listeners.iter().filter(|l| !live.contains_key(&l.addr)) {
            match bind_socket(l.addr, self.settings.tcp_keepalive) {
                Ok(s) => fresh.push((l.addr, s)),
                Err(e) => return refused(format!("cannot listen on {}: {e}", l.addr)),
            }
        }
        let next = match crate::reload::build(Some(&old), &cfg) {
            Ok(n) => n,
            Err(e) => return refused(e.to_string()),
        };
        for p in next.started.iter().filter(|p| p.discovers()) {
            p.refresh(&self.resolver).await;
        }
        let new_hubs: Vec<_> = next
            .snapshot
            .hubs
            .iter()
            .zip(next.snapshot.routes.routes())
            .filter_map(|(h, r)| {
                let h = h.as_ref()?;
                let known = old.hubs.iter().flatten().any(|o| Arc::ptr_eq(o, h));
                (!known && h.cfg.eager).then(|| (h.clone(), r.clone()))
            })
            .collect();
        self.shared.snapshot.store(Arc::new(next.snapshot));

        for p in &next.stopped {
            p.life.cancel();
        }
        for p in &next.started {
            start_pool(p, &self.shared, &self.resolver);
        }
        for (h, r) in new_hubs {
            h.open_eager(&self.shared.life, &r);
        }
        next.retire.schedule(cfg.server.drain_timeout);
        // Listeners: close the removed ones, swap certificates, open the new ones.
        live.retain(|addr, l| {
            let keep = cfg.listeners.iter().any(|c| c.addr == *addr);
            if !keep {
                info!(%addr, "listener removed");
                l.stop.cancel();
                if let Ok(mut v) = self.shared.listeners.lock() {
                    v.retain(|s| !Arc::ptr_eq(s, &l.stats));
                }
            }
            keep
        });
        for (lc, acceptor) in cfg.listeners.iter().zip(tls) {
            let acceptor = acceptor.map(Arc::new);
            if let Some(l) = live.get(&lc.addr) {
                l.tls.store(acceptor);
                l.proxy_protocol.store(lc.proxy_protocol, Ordering::Relaxed);
            } else if let Some(i) = fresh.iter().position(|(a, _)| *a == lc.addr) {
                let (addr, listener) = fresh.swap_remove(i);
                info!(%addr, "listener added");
                let l = Listener {
                    stats: Arc::new(crate::metrics::ListenerStats::new(
                        listener.local_addr().unwrap_or(addr),
                    )),
                    listener,
                    tls: Arc::new(arc_swap::ArcSwapOption::new(acceptor)),
                    proxy_protocol: Arc::new(AtomicBool::new(lc.proxy_protocol)),
                };
                live.insert(addr, serve_listener(l, cx));
            }
        }
        if self.shared.snapshot.load().settings != cfg.server {
            warn!("`server:` settings other than drain_timeout changed; they take effect at the next restart");
        }
        stats
            .reloads_ok
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info!(summary = %next.summary, "config reloaded");
        Ok(next.summary)
    }
}

/// Asks a running gateway to reload its config file.
#[derive(Clone)]
pub struct ReloadHandle(tokio::sync::mpsc::Sender<crate::state::ReloadRequest>);

impl ReloadHandle {
    /// Reloads; `Ok` with a summary of what changed, or why nothing did.
    pub async fn reload(&self) -> Result<String, String> {
        crate::state::request_reload(&self.0).await
    }
}

/// A TLS acceptor per listener (None for plain ones), certificates loaded.
fn tls_acceptors(
    config: &Config,
    resumption: &tls::Resumption,
) -> Result<Vec<Option<TlsAcceptor>>, StartError> {
    config
        .listeners
        .iter()
        .enumerate()
        .map(|(index, l)| match &l.tls {
            None => Ok(None),
            Some(files) => tls::server_config(files, resumption)
                .map(|c| Some(TlsAcceptor::from(c)))
                .map_err(|source| StartError::Tls {
                    file: config.source.clone(),
                    line: files.first().map_or(0, |f| f.line),
                    index,
                    source: Box::new(source),
                }),
        })
        .collect()
}

/// Starts a pool's health checks and DNS discovery, supervised; they end
/// with `pool.life`.
fn start_pool(pool: &Arc<Pool>, shared: &Shared, resolver: &Resolver) {
    crate::checker::spawn(pool, &shared.life.tasks, &shared.life.panics);
    if pool.discovers() {
        let (pool, resolver) = (pool.clone(), resolver.clone());
        let life = pool.life.clone();
        crate::supervise::spawn(
            &shared.life.tasks,
            shared.life.panics.clone(),
            crate::supervise::Kind::DnsDiscovery,
            format!("pool {}", pool.name),
            life,
            move || {
                let (pool, resolver) = (pool.clone(), resolver.clone());
                async move {
                    loop {
                        tokio::time::sleep(pool.dns_refresh).await;
                        pool.refresh(&resolver).await;
                    }
                }
            },
        );
    }
}

/// Spawns the accept loop of one listener.
fn serve_listener(l: Listener, cx: &Arc<AcceptCx>) -> Live {
    let stop = cx.stop.child_token();
    if let Ok(mut v) = cx.shared.listeners.lock() {
        v.push(l.stats.clone());
    }
    Live {
        stop: stop.clone(),
        tls: l.tls.clone(),
        proxy_protocol: l.proxy_protocol.clone(),
        stats: l.stats.clone(),
        task: tokio::spawn(accept_loop(l, cx.clone(), stop)),
    }
}

/// A listening socket. `keepalive` is set on it once: Linux copies it to
/// every accepted connection, so it costs nothing per connection.
fn bind_socket(addr: SocketAddr, keepalive: Duration) -> std::io::Result<TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    sock.set_reuse_address(true)?;
    // A new upgate can bind the same port while this one drains (zero-downtime
    // restart); the kernel spreads new connections over both until this one
    // stops accepting.
    #[cfg(unix)]
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    crate::upstream::keepalive((&sock).into(), keepalive);
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
        .keep_alive_timeout(Duration::from_secs(20))
        // WebSockets over HTTP/2 (RFC 8441).
        .enable_connect_protocol();
    HttpBuilders { h1, h2 }
}

/// Whether a plain-TCP client opens with the HTTP/2 preface (`PRI * HTTP/2.0`).
/// No HTTP/1.1 method starts with `PRI`, so three bytes decide.
///
/// Waits on readiness only: when fewer bytes are there than it takes to
/// decide, the peek runs inside `try_io` and answers `WouldBlock`, which
/// clears the readiness seen before the peek, so the next `readable()`
/// waits for new bytes instead of returning at once (no timer, no spin; a
/// byte arriving after the peek sets readiness again and is not missed;
/// the end of the stream stays ready, and decides).
async fn is_h2_preface(tcp: &TcpStream) -> std::io::Result<bool> {
    use futures_util::FutureExt;
    use std::io::ErrorKind::WouldBlock;
    let mut buf = [0u8; 3];
    // Usually the request is there already: one peek decides.
    let n = tcp.peek(&mut buf).await?;
    if let Some(h2) = preface_decided(&buf[..n]) {
        return Ok(h2);
    }
    loop {
        let ready = tcp.ready(tokio::io::Interest::READABLE).await?;
        let peeked = tcp.try_io(tokio::io::Interest::READABLE, || {
            let n = tcp
                .peek(&mut buf)
                .now_or_never()
                .unwrap_or(Err(WouldBlock.into()))?;
            preface_decided(&buf[..n]).ok_or_else(|| WouldBlock.into())
        });
        match peeked {
            Ok(h2) => return Ok(h2),
            // The peer closed after a partial `PR`: not HTTP/2; hyper reads the rest.
            Err(e) if e.kind() == WouldBlock && ready.is_read_closed() => return Ok(false),
            Err(e) if e.kind() == WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `Some(true)` for the start of `PRI`, `Some(false)` for anything else
/// (end of stream included: hyper will see it), `None` until it is clear.
fn preface_decided(b: &[u8]) -> Option<bool> {
    match b {
        [] => Some(false),
        [b'P'] | [b'P', b'R'] => None,
        [b'P', b'R', c, ..] => Some(*c == b'I'),
        _ => Some(false),
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
    idle_timeout: Duration,
}

async fn accept_loop(l: Listener, cx: Arc<AcceptCx>, stop: CancellationToken) {
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
        let _ = tcp.set_nodelay(true);
        let tls = l.tls.load_full();
        let proxy_protocol = l.proxy_protocol.load(Ordering::Relaxed);
        l.stats.accepted.fetch_add(1, Ordering::Relaxed);
        l.stats.active.fetch_add(1, Ordering::Relaxed);
        let mut info = ConnInfo::new(peer, tls.is_some(), Some(permit), l.stats.clone());
        let span = tracing::debug_span!("conn", %peer, client = tracing::field::Empty);
        let cx2 = cx.clone();
        cx.shared.life.tasks.spawn(
            async move {
                let mut tcp = tcp;
                let timed_out = |info: &ConnInfo, what: &str| {
                    info.listener
                        .handshake_timeouts
                        .fetch_add(1, Ordering::Relaxed);
                    debug!("{what} within the handshake timeout");
                };
                if proxy_protocol {
                    let header =
                        tokio::time::timeout_at(deadline, crate::proxy_protocol::read(&mut tcp))
                            .await;
                    match header {
                        Ok(Ok(h)) => {
                            if let Some(client) = h.source {
                                info.peer = client;
                                tracing::Span::current()
                                    .record("client", tracing::field::display(client));
                            }
                        }
                        Ok(Err(e)) => {
                            info.listener
                                .proxy_header_failed
                                .fetch_add(1, Ordering::Relaxed);
                            debug!(error = %e, "connection closed");
                            return;
                        }
                        Err(_) => {
                            info.listener
                                .proxy_header_failed
                                .fetch_add(1, Ordering::Relaxed);
                            debug!("no PROXY header within the handshake timeout");
                            return;
                        }
                    }
                }
                let info = Arc::new(info);
                match tls {
                    None => match tokio::time::timeout_at(deadline, is_h2_preface(&tcp)).await {
                        Ok(Ok(h2)) => serve(cx2, info, tcp, h2, deadline).await,
                        Ok(Err(e)) => {
                            debug!(error = %e, "connection failed before its first request")
                        }
                        Err(_) => timed_out(&info, "no request"),
                    },
                    // Boxed: the TLS state is large, and this keeps it out of
                    // the task of every connection, plain ones included.
                    Some(acceptor) => {
                        let handshake = Box::pin(acceptor.accept(tcp));
                        let r = tokio::time::timeout_at(deadline, handshake).await;
                        let counter = if matches!(r, Ok(Ok(_))) {
                            &info.listener.tls_ok
                        } else {
                            &info.listener.tls_failed
                        };
                        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        match r {
                            Ok(Ok(s)) => {
                                let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
                                Box::pin(serve(cx2, info, s, h2, deadline)).await
                            }
                            Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                            Err(_) => timed_out(&info, "no TLS handshake"),
                        }
                    }
                }
            }
            .instrument(span),
        );
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

/// Why a connection's watchdog fired.
enum Watch {
    /// No complete first request head by the deadline.
    Deadline,
    /// Nothing in flight for `idle_timeout`.
    Idle,
}

/// Watches one connection. With `deadline` (HTTP/2, where hyper has no
/// head timeout) its first request must arrive by then; HTTP/1.1 gets the
/// same deadline from hyper's own head timer. After its first request a
/// connection may stay idle (no request in flight, no session) for at most
/// `idle` (zero: forever), checked four times per `idle`, so it is closed
/// between 1 and 1.25 × `idle` after its last activity.
///
/// No timer is armed while a request is in flight: the watchdog is polled
/// with its connection (after it, in the same task), so it sees the moment
/// the connection turns idle; a connection that upgrades never arms one.
async fn watchdog(
    info: &ConnInfo,
    deadline: Option<tokio::time::Instant>,
    idle: Duration,
) -> Watch {
    if let Some(deadline) = deadline {
        while info.requests.load(Ordering::Relaxed) == 0 {
            if tokio::time::Instant::now() >= deadline {
                return Watch::Deadline;
            }
            let check = tokio::time::Instant::now() + (idle / 4).max(Duration::from_millis(100));
            tokio::time::sleep_until(deadline.min(check)).await;
        }
    }
    if idle.is_zero() {
        return std::future::pending().await;
    }
    let (mut seen, mut quiet) = (u64::MAX, 0);
    loop {
        // Idle now? (No waker: the connection's own progress polls us again.)
        std::future::poll_fn(|_| {
            let idle_now =
                info.requests.load(Ordering::Relaxed) > 0 && info.busy.load(Ordering::Relaxed) == 0;
            if idle_now {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
        let n = info.requests.load(Ordering::Relaxed);
        if n == seen {
            quiet += 1;
            if quiet >= 4 {
                return Watch::Idle;
            }
        } else {
            (seen, quiet) = (n, 0);
        }
        tokio::time::sleep(idle / 4).await;
        if info.busy.load(Ordering::Relaxed) > 0 {
            (seen, quiet) = (u64::MAX, 0);
        }
    }
}

/// Drives a hyper connection until it ends, under its watchdog; on
/// shutdown (or idleness) asks it to finish gracefully and keeps polling
/// it, until the hard stop.
macro_rules! drive {
    ($cx:expr, $info:expr, $deadline:expr, $conn:expr) => {
        async {
            // Boxed: the connection's state is freed as soon as it ends (at an
            // upgrade), while the task itself may be referenced a little longer.
            let mut conn = Box::pin($conn);
            let watch = watchdog(&$info, $deadline, $cx.idle_timeout);
            tokio::pin!(watch);
            tokio::select! {
                // The connection first: the watchdog then sees what it did.
                biased;
                r = conn.as_mut() => return r,
                w = &mut watch => match w {
                    Watch::Deadline => {
                        $info.listener.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                        debug!("no complete request head within the handshake timeout");
                        return Ok(());
                    }
                    Watch::Idle => {
                        $info.listener.idle_closed.fetch_add(1, Ordering::Relaxed);
                        debug!("idle connection closed");
                    }
                },
                _ = $cx.stop.cancelled() => {}
            }
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => r,
                _ = $cx.shared.life.hard_stop.cancelled() => Ok(()),
            }
        }
        .await
    };
}

async fn serve<I>(
    cx: Arc<AcceptCx>,
    info: Arc<ConnInfo>,
    io: I,
    h2: bool,
    deadline: tokio::time::Instant,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = cx.shared.clone();
    let http = cx.http.clone();
    let conn_info = info.clone();
    let svc = hyper::service::service_fn(move |req| {
        proxy::handle(shared.clone(), conn_info.clone(), http.clone(), req)
    });
    let io = TokioIo::new(io);
    let res = if h2 {
        drive!(
            cx,
            info,
            Some(deadline),
            cx.builders.h2.serve_connection(io, svc)
        )
    } else {
        // hyper's head timer, set to what is left of the deadline, bounds
        // the first head (and later ones on this connection alike).
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut h1 = cx.builders.h1.clone();
        h1.header_read_timeout(left.max(Duration::from_millis(1)));
        drive!(cx, info, None, h1.serve_connection(io, svc).with_upgrades())
    };
    if let Err(e) = res {
        if e.is_timeout() && info.requests.load(Ordering::Relaxed) == 0 {
            info.listener
                .handshake_timeouts
                .fetch_add(1, Ordering::Relaxed);
        }
        debug!(error = %e, "connection ended with an error");
    }
}
