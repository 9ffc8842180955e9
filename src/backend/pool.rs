//! Backend pools: the backends of one service, how the next one is picked,
//! and the live-connection count each carries.
//!
//! Picking takes no lock and allocates nothing: counters and per-backend
//! counts are atomics, and the failover order is built on the stack. A
//! request walks the backends in [`Pool::try_order`], the balancer's pick
//! first (arithmetic in [`crate::backend::balance`]). `discovery` resolves
//! `discover: dns` backends; `connector` opens the pooled plain-HTTP
//! client's connections.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_rustls::TlsConnector;

use crate::backend::balance::{self, Rng};
use crate::backend::health::{Health, PassivePolicy};
use crate::backend::upstream::{self, BackendIo, ConnectError, Target};
use crate::config::{BackendUrl, Balance, HashKey, HealthCheck, PoolConfig, MAX_BACKENDS};
use crate::tls::{self, TlsError};
use tracing::warn;

pub use super::connector::{http_scheme, PoolConnector};
pub use super::discovery::{system_resolver, Resolver};

/// One backend instance.
#[derive(Debug)]
pub struct Backend {
    pub url: BackendUrl,
    /// TLS server name: the URL's host, or the DNS name a discovered address came from.
    pub tls_name: String,
    /// `host:port` as sent in `Host` when the route does not preserve the client's.
    pub authority: Authority,
    /// Relative share for `round_robin` and `hash`.
    pub weight: u32,
    /// Hash of the URL: this backend's identity for consistent hashing, the
    /// same on every gateway instance.
    id: u64,
    /// Out of rotation for new sessions (`drain: true`); live ones continue.
    pub drain: bool,
    pub health: Health,
    /// Cancelled (and replaced) when active checks mark this backend down:
    /// sessions that hold the current token close. Each is a child of
    /// `retired`, so a session that watches both waits on this one only
    /// (and tells the two apart by `retired.is_cancelled()`).
    down: arc_swap::ArcSwap<tokio_util::sync::CancellationToken>,
    /// Live upgraded sessions; `least_conn` and `p2c` read it.
    active: AtomicUsize,
    /// Cancelled when a reload removed this backend and the drain period is
    /// over: its remaining sessions close.
    retired: tokio_util::sync::CancellationToken,
    /// Failed attempts and passive ejections, for `/metrics`.
    pub failures: std::sync::atomic::AtomicU64,
    pub ejections: std::sync::atomic::AtomicU64,
    /// Sessions the rebalancer asks to leave this backend (claimed one by one).
    shed: AtomicUsize,
    shed_wake: tokio::sync::Notify,
}

impl Backend {
    /// Claims one of the moves asked of this backend.
    fn take_shed(&self) -> bool {
        self.shed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Resolves once the rebalancer asks sessions to leave this backend and
    /// the caller claimed one of those moves.
    pub async fn shed_claimed(&self) {
        loop {
            let wake = self.shed_wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if self.take_shed() {
                return;
            }
            wake.await;
        }
    }

    /// Asks `n` sessions to leave (replacing any unclaimed request).
    pub fn request_shed(&self, n: usize) {
        self.shed.store(n, Ordering::Release);
        if n > 0 {
            self.shed_wake.notify_waiters();
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// A token cancelled when this backend, removed by a reload, has drained.
    pub fn retired(&self) -> &tokio_util::sync::CancellationToken {
        &self.retired
    }

    /// A token cancelled when this backend is next marked down, or retired.
    pub fn down_token(&self) -> tokio_util::sync::CancellationToken {
        (**self.down.load()).clone()
    }

    /// Closes the sessions holding the current token; later sessions get a new one.
    pub fn signal_down(&self) {
        let old = self.down.swap(Arc::new(self.retired.child_token()));
        old.cancel();
    }
}

/// Counts one live session on a backend for as long as it is held.
#[derive(Debug)]
pub struct BackendGuard(Arc<Backend>);

impl BackendGuard {
    pub fn new(b: Arc<Backend>) -> Self {
        b.active.fetch_add(1, Ordering::Relaxed);
        BackendGuard(b)
    }
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for BackendGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

pub type HttpClient = Client<PoolConnector, super::Body>;

pub struct Pool {
    pub name: String,
    pub balance: Balance,
    pub connect_timeout: Duration,
    pub hash_key: Option<HashKey>,
    pub health: Option<HealthCheck>,
    pub passive: PassivePolicy,
    /// Try every backend when none is available, instead of answering 503.
    pub fail_open: bool,
    pub on_backend_down: crate::config::OnBackendDown,
    /// Backends tried per request at most: failover never multiplies load beyond this.
    pub max_attempts: usize,
    slow_start: Duration,
    /// The current backends; swapped whole when DNS discovery changes them.
    pub(super) members: arc_swap::ArcSwap<Members>,
    /// The configured backends (discovered ones expand into one per address).
    pub(super) specs: Vec<crate::config::BackendSpec>,
    pub dns_refresh: Duration,
    pub rebalance: Option<crate::config::Rebalance>,
    /// Round-robin position; also rotates where `least_conn` starts scanning.
    next: AtomicUsize,
    /// Random picks for `p2c`.
    rng: Rng,
    tls: Option<TlsConnector>,
    /// Plain-HTTP requests reuse connections through this client.
    pub http: HttpClient,
    /// The config it was built from: a reload keeps the pool when it is unchanged.
    pub cfg: PoolConfig,
    /// Cancelled when the pool leaves the config (or the gateway stops): its
    /// health-check and discovery tasks end.
    pub life: tokio_util::sync::CancellationToken,
    /// Backend dials of resuming sessions in flight at once: a backend's
    /// death moves all its sessions in the same instant, and a thousand
    /// SYNs at once overflow an ordinary accept queue (128 for a Rust std
    /// listener, 511 for nginx); each one dropped costs its session the
    /// kernel's 1 s SYN retry. Measured (bench/run.sh resume, 1,000 sessions
    /// moving to a backend with a 128 backlog): unpaced, p99 1.17 s; 256 at
    /// once still drops SYNs; 64 none.
    pub resume_dials: tokio::sync::Semaphore,
}

/// Resuming sessions' backend dials in flight per pool.
pub const RESUME_DIALS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("pool `{pool}`: backend {backend}: {source}")]
    BadBackend {
        pool: String,
        backend: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("pool `{pool}`: {source}")]
    Tls {
        pool: String,
        #[source]
        source: TlsError,
    },
}

impl Pool {
    pub fn new(cfg: &PoolConfig) -> Result<Pool, PoolError> {
        let tls = if cfg.backends.iter().any(|b| b.url.tls) {
            let cc =
                tls::client_config(cfg.ca_file.as_deref()).map_err(|source| PoolError::Tls {
                    pool: cfg.name.clone(),
                    source,
                })?;
            Some(upstream::tls_connector(cc))
        } else {
            None
        };
        let born = tokio::time::Instant::now();
        let mut backends = Vec::new();
        for spec in cfg.backends.iter().filter(|b| !b.discover) {
            backends.push(Arc::new(new_backend(
                &cfg.name,
                &spec.url,
                &spec.url.host,
                spec,
                born,
            )?));
        }
        let connector = PoolConnector {
            tls: tls.clone(),
            timeout: cfg.connect_timeout,
        };
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .build(connector);
        Ok(Pool {
            name: cfg.name.clone(),
            balance: cfg.balance,
            hash_key: cfg.hash_key.clone(),
            health: cfg.health.clone(),
            passive: cfg.passive,
            fail_open: cfg.fail_open,
            on_backend_down: cfg.on_backend_down,
            max_attempts: cfg.max_attempts,
            slow_start: cfg.slow_start,
            connect_timeout: cfg.connect_timeout,
            members: arc_swap::ArcSwap::from_pointee(Members::new(backends)),
            specs: cfg.backends.clone(),
            dns_refresh: cfg.dns_refresh,
            rebalance: cfg.rebalance,
            next: AtomicUsize::new(0),
            rng: Rng::new(balance::fnv1a(cfg.name.as_bytes())),
            tls,
            http,
            cfg: cfg.clone(),
            life: tokio_util::sync::CancellationToken::new(),
            resume_dials: tokio::sync::Semaphore::new(RESUME_DIALS),
        })
    }

    /// Takes over `old`'s backend objects (health, live counts, tokens) for
    /// every backend listed the same way in both (URL, weight, drain), and
    /// `old`'s discovered addresses for names discovered in both: what a
    /// reload keeps of a pool whose config changed.
    pub fn carry_over(&self, old: &Pool) {
        let prev = old.backends();
        let mut next: Vec<Arc<Backend>> = Vec::new();
        for b in self.backends().iter() {
            let same = prev
                .iter()
                .find(|o| o.url == b.url && o.weight == b.weight && o.drain == b.drain);
            next.push(same.cloned().unwrap_or_else(|| b.clone()));
        }
        for spec in self.specs.iter().filter(|s| s.discover) {
            if old.specs.iter().any(|o| o.discover && o.url == spec.url) {
                for b in prev.iter().filter(|b| b.tls_name == spec.url.host) {
                    if !next.iter().any(|n| n.url == b.url) {
                        next.push(b.clone());
                    }
                }
            }
        }
        self.members.store(Arc::new(Members::new(next)));
    }

    /// The current backends (a snapshot).
    pub fn backends(&self) -> Arc<Members> {
        self.members.load_full()
    }

    /// Index of the balancer's first choice (for every strategy but `hash`).
    fn first(&self, m: &Members) -> usize {
        let n = m.backends.len();
        let rr = self.next.fetch_add(1, Ordering::Relaxed);
        match self.balance {
            Balance::RoundRobin | Balance::Hash => usize::from(m.schedule[rr % m.schedule.len()]),
            Balance::LeastConn => {
                // Scan from a rotating start so ties spread evenly.
                let mut best = rr % n;
                let mut best_load = m.backends[best].active();
                for k in 1..n {
                    let i = (rr + k) % n;
                    let load = m.backends[i].active();
                    if load < best_load {
                        best = i;
                        best_load = load;
                    }
                }
                best
            }
            Balance::P2c => {
                if n == 1 {
                    return 0;
                }
                let a = self.rng.below(n);
                let b = (a + 1 + self.rng.below(n - 1)) % n;
                if m.backends[b].active() < m.backends[a].active() {
                    b
                } else {
                    a
                }
            }
        }
    }

    /// Every backend once, the balancer's pick first: the failover order for
    /// one request. `key` is the request's hash key for `balance: hash`
    /// (without one, a hash pool falls back to weighted round robin).
    pub fn try_order(&self, key: Option<u64>) -> Order {
        let m = self.members.load_full();
        let n = m.backends.len();
        let mut idx = [0u16; MAX_BACKENDS];
        match (self.balance, key) {
            (Balance::Hash, Some(key)) => {
                let mut score = [0f64; MAX_BACKENDS];
                for (i, b) in m.backends.iter().enumerate() {
                    idx[i] = i as u16;
                    score[i] = balance::rendezvous(key, b.id, b.weight);
                }
                idx[..n].sort_unstable_by(|&a, &b| {
                    score[usize::from(b)].total_cmp(&score[usize::from(a)])
                });
            }
            _ => {
                let start = if n == 0 { 0 } else { self.first(&m) };
                for (k, slot) in idx[..n].iter_mut().enumerate() {
                    *slot = ((start + k) % n) as u16;
                }
            }
        }
        // Unavailable (down, ejected) and draining backends are skipped; with
        // `fail_open`, a pool with none available tries all but the draining.
        let usable = |b: &Backend, all: bool| !b.drain && (all || b.health.available());
        let all = self.fail_open && !m.backends.iter().any(|b| usable(b, false));
        let mut len = 0;
        for k in 0..n {
            let i = idx[k];
            if usable(&m.backends[usize::from(i)], all) {
                idx[len] = i;
                len += 1;
            }
        }
        // Slow start: a backend that just came back is moved behind the others
        // unless a draw under its ramp says otherwise, so its share grows
        // from 5 % to full over `slow_start` (it stays in the failover order).
        if !self.slow_start.is_zero() {
            for _ in 0..len.saturating_sub(1) {
                let ramp = m.backends[usize::from(idx[0])].health.ramp(self.slow_start);
                if ramp >= 1.0 || (self.rng.next() >> 11) as f64 / (1u64 << 53) as f64 <= ramp {
                    break;
                }
                idx[..len].rotate_left(1);
            }
        }
        Order {
            picks: Picks::new(&idx[..len]),
            members: m,
            // At most MAX_BACKENDS (256).
            len: u16::try_from(len).unwrap_or(u16::MAX),
            pos: 0,
        }
    }

    /// Feeds a real attempt's outcome to the backend's passive health check.
    pub fn note_outcome(&self, backend: &Backend, ok: bool) {
        if !ok {
            backend.failures.fetch_add(1, Ordering::Relaxed);
        }
        if backend.health.record_request(ok, self.passive) {
            backend.ejections.fetch_add(1, Ordering::Relaxed);
            warn!(
                pool = %self.name,
                backend = %backend.url,
                ejected_for = ?backend.health.ejected_for(),
                "backend ejected after consecutive failures"
            );
        }
    }

    /// When an unavailable pool is worth retrying: the soonest end of an
    /// ejection, or the next active check.
    pub fn retry_after(&self) -> Duration {
        let ejection = self
            .backends()
            .iter()
            .filter_map(|b| b.health.ejected_for())
            .min();
        let check = self.health.as_ref().map(|h| h.interval);
        ejection
            .into_iter()
            .chain(check)
            .min()
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_secs(1))
    }

    /// Opens a connection to one backend of this pool, within its connect timeout.
    pub async fn connect(&self, b: &Backend) -> Result<BackendIo, ConnectError> {
        self.connect_within(b, self.connect_timeout).await
    }

    /// Opens a connection to one backend of this pool within `timeout`.
    pub async fn connect_within(
        &self,
        b: &Backend,
        timeout: Duration,
    ) -> Result<BackendIo, ConnectError> {
        upstream::connect(self.target(b), timeout).await
    }

    fn target<'a>(&'a self, b: &'a Backend) -> Target<'a> {
        Target {
            host: &b.url.host,
            sni: &b.tls_name,
            port: b.url.port,
            tls: if b.url.tls { self.tls.as_ref() } else { None },
        }
    }

    /// Opens a connection to one backend as [`Pool::connect`], writing
    /// `first` with the connect where it can (see `upstream::connect_sending`):
    /// returns how much of it was written.
    pub async fn connect_sending(
        &self,
        b: &Backend,
        first: &[u8],
    ) -> Result<(BackendIo, usize), ConnectError> {
        upstream::connect_sending(self.target(b), first, self.connect_timeout).await
    }
}

/// A failover order: an iterator over a snapshot of a pool's backends.
/// It lives in the request's future across every connect attempt, so it is
/// kept small: up to [`INLINE`] positions inline (a pool's usual size), a
/// boxed list beyond (inline, 256 positions took 512 bytes that every
/// upgrade's future carried and copied).
pub struct Order {
    pub(super) members: Arc<Members>,
    picks: Picks,
    len: u16,
    pos: u16,
}

/// Positions kept inline in an [`Order`].
const INLINE: usize = 12;

/// The backends' indices in failover order.
enum Picks {
    Inline([u16; INLINE]),
    Boxed(Box<[u16]>),
}

impl Picks {
    fn new(idx: &[u16]) -> Picks {
        match idx.len() {
            n if n <= INLINE => {
                let mut a = [0u16; INLINE];
                a[..n].copy_from_slice(idx);
                Picks::Inline(a)
            }
            _ => Picks::Boxed(idx.into()),
        }
    }
    fn get(&self, i: usize) -> Option<u16> {
        match self {
            Picks::Inline(a) => a.get(i).copied(),
            Picks::Boxed(b) => b.get(i).copied(),
        }
    }
}

impl Iterator for Order {
    type Item = Arc<Backend>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.len {
            return None;
        }
        let i = self.picks.get(usize::from(self.pos))?;
        self.pos += 1;
        self.members.backends.get(usize::from(i)).cloned()
    }
}

/// A pool's backends at one moment, with their weighted schedule.
pub struct Members {
    pub backends: Box<[Arc<Backend>]>,
    /// Weighted round-robin sequence of backend indices.
    schedule: Box<[u16]>,
}

impl Members {
    pub(super) fn new(backends: Vec<Arc<Backend>>) -> Members {
        let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
        let mut schedule = balance::schedule(&weights);
        if schedule.is_empty() {
            schedule.push(0);
        }
        Members {
            backends: backends.into(),
            schedule: schedule.into(),
        }
    }
}

impl std::ops::Deref for Members {
    type Target = [Arc<Backend>];
    fn deref(&self) -> &[Arc<Backend>] {
        &self.backends
    }
}

pub(super) fn new_backend(
    pool: &str,
    u: &BackendUrl,
    tls_name: &str,
    spec: &crate::config::BackendSpec,
    born: tokio::time::Instant,
) -> Result<Backend, PoolError> {
    let host = if u.host.contains(':') {
        format!("[{}]", u.host)
    } else {
        u.host.clone()
    };
    let authority = Authority::try_from(format!("{host}:{}", u.port)).map_err(|source| {
        PoolError::BadBackend {
            pool: pool.to_string(),
            backend: u.to_string(),
            source,
        }
    })?;
    let retired = tokio_util::sync::CancellationToken::new();
    Ok(Backend {
        url: u.clone(),
        tls_name: tls_name.to_string(),
        authority,
        weight: spec.weight,
        id: balance::fnv1a(u.to_string().as_bytes()),
        drain: spec.drain,
        health: Health::new(born),
        down: arc_swap::ArcSwap::from_pointee(retired.child_token()),
        active: AtomicUsize::new(0),
        retired,
        failures: std::sync::atomic::AtomicU64::new(0),
        ejections: std::sync::atomic::AtomicU64::new(0),
        shed: AtomicUsize::new(0),
        shed_wake: tokio::sync::Notify::new(),
    })
}

#[cfg(test)]
mod tests;
