//! Listeners, the accept loop, TLS and HTTP serving, reloads and graceful
//! shutdown. `accept` holds the accept loop and the HTTP stack, `connection`
//! serving one connection under its watchdog; this file binds, runs,
//! applies reloads and drains.
//!
//! `Gateway::bind` does everything that can fail at startup (certificates,
//! pools, sockets) so `run` only serves. `run` takes its shutdown signal from
//! the caller, so tests run many gateways in one process.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backend::pool::{system_resolver, Pool, Resolver};
use crate::config::{Config, ServerSettings};
use crate::state::Shared;
use crate::tls::{self, TlsError};

mod accept;
mod connection;
mod head;
pub mod proxy_protocol;
pub mod watch;

use accept::{accept_loop, http_builders, http_service, AcceptCx};

/// For the `first_head` fuzz target: reads a first request from `io` as a
/// connection does and checks what it kept against `sent`, the bytes `io`
/// yields. Panics on a difference.
#[doc(hidden)]
pub async fn fuzz_first_head<I>(io: &mut I, h2: bool, sent: &[u8])
where
    I: tokio::io::AsyncRead + Unpin,
{
    let Ok(first) = head::read_first(io, h2, 8192, 100).await else {
        return;
    };
    match first {
        head::First::Head { req, raw, len } => {
            assert!(sent.starts_with(&raw) && len <= raw.len());
            assert_eq!(req.method(), http::Method::GET);
            assert!(req.headers().len() <= 100);
        }
        head::First::H2(raw) => assert!(h2 && raw.starts_with(b"PRI") && sent.starts_with(&raw)),
        head::First::Other(raw) => assert!(sent.starts_with(&raw)),
    }
}

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
    Build(#[from] crate::reload::BuildError),
    #[error("TLS session resumption: {0}")]
    Resumption(#[source] Box<TlsError>),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A bound listener and what its connections read when accepted.
pub(super) struct Listener {
    pub(super) listener: TcpListener,
    pub(super) stats: Arc<crate::metrics::ListenerStats>,
    /// Swapped by a reload (new certificates) without touching the socket.
    pub(super) tls: Arc<arc_swap::ArcSwapOption<rustls::ServerConfig>>,
    /// `proxy_protocol:`, also changed by a reload.
    pub(super) proxy_protocol: Arc<AtomicBool>,
}

/// A listener being served: how to stop it and where its TLS settings live.
struct Live {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    tls: Arc<arc_swap::ArcSwapOption<rustls::ServerConfig>>,
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
                tls: Arc::new(arc_swap::ArcSwapOption::new(tls)),
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
            max_header_bytes: self.settings.max_header_bytes,
            max_headers: self.settings.max_headers,
        });
        let snap = self.shared.snapshot.load_full();
        for pool in &snap.pools {
            start_pool(pool, &self.shared, &self.resolver);
        }
        for (route, state) in snap.each_route() {
            if let Some(a) = &state.auth {
                a.start(&self.shared.life);
            }
            if let Some(hub) = state.hub.as_ref().filter(|h| h.cfg.eager) {
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
                move || crate::server::watch::run(shared.clone(), every, until.clone()),
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
            stats.note_reload(false, &e);
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
            .each_route()
            .filter_map(|(r, state)| {
                let h = state.hub.as_ref()?;
                let known = old
                    .each_route()
                    .filter_map(|(_, s)| s.hub.as_ref())
                    .any(|o| Arc::ptr_eq(o, h));
                (!known && h.cfg.eager).then(|| (h.clone(), r.clone()))
            })
            .collect();
        let snapshot = Arc::new(next.snapshot);
        self.shared.snapshot.store(snapshot.clone());
        for (_, state) in snapshot.each_route() {
            if let Some(a) = &state.auth {
                a.start(&self.shared.life);
            }
        }

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
        stats.note_reload(true, &next.summary);
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

/// A TLS config per listener (None for plain ones), certificates loaded.
fn tls_acceptors(
    config: &Config,
    resumption: &tls::Resumption,
) -> Result<Vec<Option<Arc<rustls::ServerConfig>>>, StartError> {
    config
        .listeners
        .iter()
        .enumerate()
        .map(|(index, l)| match &l.tls {
            None => Ok(None),
            Some(files) => tls::server_config(files, resumption)
                .map(Some)
                .map_err(|source| StartError::Tls {
                    file: config.source.clone(),
                    line: files.first().map_or(0, |f| f.line),
                    index,
                    source: Box::new(source),
                }),
        })
        .collect()
}

/// Starts a pool's health checks, rebalancer and DNS discovery,
/// supervised; they end with `pool.life`.
fn start_pool(pool: &Arc<Pool>, shared: &Shared, resolver: &Resolver) {
    crate::backend::checker::spawn(pool, &shared.life.tasks, &shared.life.panics);
    crate::backend::rebalance::spawn(pool, &shared.life.tasks, &shared.life.panics);
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

/// A listening socket. `keepalive` and `TCP_NODELAY` are set on it once:
/// Linux copies both to every accepted connection, so they cost no system
/// call per connection (`accepted_sockets_inherit_nodelay_and_keepalive`).
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
    crate::backend::upstream::keepalive((&sock).into(), keepalive);
    sock.set_tcp_nodelay(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    TcpListener::from_std(sock.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-connection system calls `bind_socket` saves rely on Linux
    /// copying the listener's options to each accepted socket.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_and_keepalive() {
        let idle = Duration::from_secs(37);
        let l = bind_socket("127.0.0.1:0".parse().expect("addr"), idle).expect("bind");
        let addr = l.local_addr().expect("local addr");
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (s, _) = l.accept().await.expect("accept");
        assert!(s.nodelay().expect("nodelay"));
        let sock = socket2::SockRef::from(&s);
        assert!(sock.keepalive().expect("keepalive"));
        assert_eq!(sock.tcp_keepalive_time().expect("keepalive idle"), idle);
    }
}
