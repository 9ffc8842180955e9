//! Backend pools: the backends of one service, how the next one is picked,
//! and the live-connection count each carries.
//!
//! Picking takes no lock and allocates nothing: counters and per-backend
//! counts are atomics, and the failover order is built on the stack. A
//! request walks the backends in [`Pool::try_order`], the balancer's pick
//! first (arithmetic in [`crate::balance`]). `discovery` resolves
//! `discover: dns` backends; `connector` opens the pooled plain-HTTP
//! client's connections.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_rustls::TlsConnector;

use crate::balance::{self, Rng};
use crate::config::{BackendUrl, Balance, HashKey, HealthCheck, PoolConfig, MAX_BACKENDS};
use crate::health::{Health, PassivePolicy};
use crate::tls::{self, TlsError};
use crate::upstream::{self, BackendIo, ConnectError, Target};
use tracing::warn;

mod connector;
mod discovery;

pub use connector::{http_scheme, PoolConnector};
pub use discovery::{system_resolver, Resolver};

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
    /// sessions that hold the current token close.
    down: arc_swap::ArcSwap<tokio_util::sync::CancellationToken>,
    /// Live upgraded sessions; `least_conn` and `p2c` read it.
    active: AtomicUsize,
    /// Cancelled when a reload removed this backend and the drain period is
    /// over: its remaining sessions close.
    retired: tokio_util::sync::CancellationToken,
    /// Failed attempts and passive ejections, for `/metrics`.
    pub failures: std::sync::atomic::AtomicU64,
    pub ejections: std::sync::atomic::AtomicU64,
}

impl Backend {
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// A token cancelled when this backend, removed by a reload, has drained.
    pub fn retired(&self) -> &tokio_util::sync::CancellationToken {
        &self.retired
    }

    /// A token cancelled when this backend is next marked down.
    pub fn down_token(&self) -> tokio_util::sync::CancellationToken {
        (**self.down.load()).clone()
    }

    /// Closes the sessions holding the current token; later sessions get a new one.
    pub fn signal_down(&self) {
        let old = self
            .down
            .swap(Arc::new(tokio_util::sync::CancellationToken::new()));
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

pub type HttpClient = Client<PoolConnector, crate::error::Body>;

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
    members: arc_swap::ArcSwap<Members>,
    /// The configured backends (discovered ones expand into one per address).
    specs: Vec<crate::config::BackendSpec>,
    pub dns_refresh: Duration,
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
}

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
            next: AtomicUsize::new(0),
            rng: Rng::new(balance::fnv1a(cfg.name.as_bytes())),
            tls,
            http,
            cfg: cfg.clone(),
            life: tokio_util::sync::CancellationToken::new(),
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
            members: m,
            idx,
            len,
            pos: 0,
        }
    }

    /// The error once the failover order is used up: 503 when nothing was
    /// even available to try, otherwise 502/504 with the last failure.
    pub fn exhausted(
        &self,
        tried: usize,
        last: Option<crate::error::BackendError>,
    ) -> crate::error::ProxyError {
        use crate::error::ProxyError;
        match last {
            Some(last) if tried > 0 => ProxyError::NoBackend {
                pool: self.name.clone(),
                tried,
                last,
            },
            _ => ProxyError::Unavailable {
                pool: self.name.clone(),
                retry_after: self.retry_after(),
            },
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
        let target = Target {
            host: &b.url.host,
            sni: &b.tls_name,
            port: b.url.port,
            tls: if b.url.tls { self.tls.as_ref() } else { None },
        };
        upstream::connect(target, timeout).await
    }
}

/// A failover order: an iterator over a pool's backends, built on the stack.
/// A failover order: an iterator over a snapshot of a pool's backends,
/// built on the stack.
pub struct Order {
    members: Arc<Members>,
    idx: [u16; MAX_BACKENDS],
    len: usize,
    pos: usize,
}

impl Iterator for Order {
    type Item = Arc<Backend>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.len {
            return None;
        }
        let b = self.members.backends[usize::from(self.idx[self.pos])].clone();
        self.pos += 1;
        Some(b)
    }
}

/// A pool's backends at one moment, with their weighted schedule.
pub struct Members {
    pub backends: Box<[Arc<Backend>]>,
    /// Weighted round-robin sequence of backend indices.
    schedule: Box<[u16]>,
}

impl Members {
    fn new(backends: Vec<Arc<Backend>>) -> Members {
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

fn new_backend(
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
    Ok(Backend {
        url: u.clone(),
        tls_name: tls_name.to_string(),
        authority,
        weight: spec.weight,
        id: balance::fnv1a(u.to_string().as_bytes()),
        drain: spec.drain,
        health: Health::new(born),
        down: arc_swap::ArcSwap::from_pointee(tokio_util::sync::CancellationToken::new()),
        active: AtomicUsize::new(0),
        retired: tokio_util::sync::CancellationToken::new(),
        failures: std::sync::atomic::AtomicU64::new(0),
        ejections: std::sync::atomic::AtomicU64::new(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendSpec;

    fn pool_w(balance: Balance, weights: &[u32]) -> Pool {
        let cfg = PoolConfig {
            name: "p".into(),
            balance,
            hash_key: (balance == Balance::Hash).then_some(HashKey::Ip),
            connect_timeout: Duration::from_secs(1),
            backends: weights
                .iter()
                .enumerate()
                .map(|(i, &weight)| BackendSpec {
                    url: format!("ws://127.0.0.1:{}", 9000 + i).parse().unwrap(),
                    weight,
                    drain: false,
                    discover: false,
                })
                .collect(),
            ca_file: None,
            health: None,
            passive: PassivePolicy {
                eject_after: 2,
                eject_for: Duration::from_secs(10),
            },
            fail_open: false,
            on_backend_down: crate::config::OnBackendDown::Close,
            max_attempts: 3,
            slow_start: Duration::ZERO,
            dns_refresh: Duration::from_secs(10),
        };
        Pool::new(&cfg).unwrap()
    }

    fn pool(balance: Balance, n: usize) -> Pool {
        pool_w(balance, &vec![1; n])
    }

    fn first_port(p: &Pool) -> u16 {
        p.try_order(None).next().unwrap().url.port
    }

    /// Picks per backend over `n` requests.
    fn counts(p: &Pool, n: usize, key: impl Fn(usize) -> Option<u64>) -> Vec<usize> {
        let mut c = vec![0; p.backends().len()];
        for i in 0..n {
            let port = p.try_order(key(i)).next().unwrap().url.port;
            c[usize::from(port - 9000)] += 1;
        }
        c
    }

    #[tokio::test]
    async fn round_robin_cycles_and_try_order_covers_all() {
        let p = pool(Balance::RoundRobin, 3);
        let firsts: Vec<u16> = (0..6).map(|_| first_port(&p)).collect();
        assert_eq!(firsts, [9000, 9001, 9002, 9000, 9001, 9002]);
        for balance in [
            Balance::RoundRobin,
            Balance::LeastConn,
            Balance::P2c,
            Balance::Hash,
        ] {
            let p = pool(balance, 5);
            for key in [None, Some(42)] {
                let mut order: Vec<u16> = p.try_order(key).map(|b| b.url.port).collect();
                order.sort();
                assert_eq!(order, [9000, 9001, 9002, 9003, 9004], "{balance:?}");
            }
        }
    }

    #[tokio::test]
    async fn weighted_round_robin_is_exact_over_10000_picks() {
        let p = pool_w(Balance::RoundRobin, &[5, 3, 2]);
        assert_eq!(counts(&p, 10_000, |_| None), [5_000, 3_000, 2_000]);
    }

    #[tokio::test]
    async fn p2c_spreads_evenly_and_avoids_the_loaded() {
        let p = pool(Balance::P2c, 4);
        // Idle pool: within ±10 % of 2,500 each over 10,000 picks.
        for c in counts(&p, 10_000, |_| None) {
            assert!((2_250..=2_750).contains(&c), "{c}");
        }
        // A loaded backend is picked only when both random choices are it: never, with two distinct picks.
        let _g: Vec<BackendGuard> = (0..10)
            .map(|_| BackendGuard::new(p.backends()[0].clone()))
            .collect();
        assert_eq!(counts(&p, 10_000, |_| None)[0], 0);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_start_grows_a_recovered_backends_share() {
        let mut p = pool(Balance::RoundRobin, 2);
        p.slow_start = Duration::from_secs(10);
        let t = crate::health::Thresholds {
            healthy_after: 1,
            unhealthy_after: 1,
        };
        p.backends()[0].health.record_check(false, t);
        p.backends()[0].health.record_check(true, t); // back up now
        let share = |p: &Pool| counts(p, 10_000, |_| None)[0] as f64 / 10_000.0;
        // Normal share 0.5; right after recovery ~5 % of it, half-way ~50 %, then all.
        let s0 = share(&p);
        assert!(s0 < 0.06, "{s0}");
        tokio::time::advance(Duration::from_secs(5)).await;
        let s5 = share(&p);
        assert!((0.20..0.30).contains(&s5), "{s5}");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(share(&p), 0.5);
    }

    #[tokio::test]
    async fn least_conn_follows_live_guards() {
        let p = pool(Balance::LeastConn, 3);
        let b0 = p.backends()[0].clone();
        let b1 = p.backends()[1].clone();
        let _g: Vec<BackendGuard> = (0..2)
            .map(|_| BackendGuard::new(b0.clone()))
            .chain([BackendGuard::new(b1.clone())])
            .collect();
        for _ in 0..5 {
            assert_eq!(first_port(&p), 9002);
        }
        {
            let _more: Vec<BackendGuard> = (0..3)
                .map(|_| BackendGuard::new(p.backends()[2].clone()))
                .collect();
            assert_eq!(first_port(&p), 9001);
        }
        // Guards released on drop: back to the emptiest.
        assert_eq!(p.backends()[2].active(), 0);
        assert_eq!(first_port(&p), 9002);
    }

    fn key(i: usize) -> Option<u64> {
        Some(balance::fnv1a(format!("user-{i}").as_bytes()))
    }

    #[tokio::test]
    async fn hash_is_fair_weighted_and_the_same_on_every_instance() {
        let a = pool_w(Balance::Hash, &[1, 1, 1, 1]);
        let b = pool_w(Balance::Hash, &[1, 1, 1, 1]); // a second gateway, same config
        for c in counts(&a, 10_000, key) {
            assert!((2_250..=2_750).contains(&c), "{c}");
        }
        for i in 0..1_000 {
            let pa = a.try_order(key(i)).map(|x| x.url.port).collect::<Vec<_>>();
            let pb = b.try_order(key(i)).map(|x| x.url.port).collect::<Vec<_>>();
            assert_eq!(pa, pb, "instances disagree on key {i}");
        }
        let w = pool_w(Balance::Hash, &[1, 3]);
        let c = counts(&w, 10_000, key);
        assert!((2_250..=2_750).contains(&c[0]), "{c:?}");
    }

    #[tokio::test]
    async fn removing_one_of_five_backends_moves_only_its_keys() {
        let five = pool(Balance::Hash, 5);
        // The same backends without the last one (URLs, hence identities, unchanged).
        let four = pool(Balance::Hash, 4);
        let n = 10_000;
        let mut moved = 0;
        for i in 0..n {
            let before = five.try_order(key(i)).next().unwrap().url.port;
            let after = four.try_order(key(i)).next().unwrap().url.port;
            if before != after {
                assert_eq!(before, 9004, "a key moved although its backend stayed");
                moved += 1;
            }
        }
        let fraction = moved as f64 / n as f64;
        // Ideal 1/5; allow 0.15–0.25.
        assert!((0.15..=0.25).contains(&fraction), "moved {fraction}");
    }
}
