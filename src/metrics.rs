//! The gateway's counters. Counting is atomics on objects the request path
//! already holds (a route's [`RouteStats`], a listener's [`ListenerStats`],
//! each backend, each fan-out hub): no lock, no label lookup. The admin
//! listener's Prometheus collector (`admin::prometheus`) reads them all
//! when `/metrics` is scraped. This module depends on nothing in the crate.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// Histogram bucket bounds, in seconds.
const SESSION_BUCKETS: [f64; 10] = [
    1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 43200.0, 86400.0,
];
const HANDSHAKE_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];
const RESUME_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0];

/// Why a frames session moved to another backend (`upgate_frames_resumes_total{cause}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeCause {
    /// The backend closed with 1001, 1012, 1013 or 1014.
    Close,
    /// The connection ended without a Close, failed, or stopped answering pings.
    Gone,
    /// Health checks marked the backend down, or a reload drained or removed it.
    Down,
    /// The pool's rebalancer asked for the move.
    Rebalance,
}

impl ResumeCause {
    pub const ALL: [ResumeCause; 4] = [
        ResumeCause::Close,
        ResumeCause::Gone,
        ResumeCause::Down,
        ResumeCause::Rebalance,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ResumeCause::Close => "backend_close",
            ResumeCause::Gone => "backend_gone",
            ResumeCause::Down => "backend_down",
            ResumeCause::Rebalance => "rebalance",
        }
    }
}

/// A histogram of fixed buckets over atomics.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last one is +Inf.
    counts: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub(crate) fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    /// (sum, count, per-bucket counts): prometheus-client's encoder makes
    /// the `le` buckets cumulative itself, so they are passed as counted.
    pub(crate) fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut total = 0u64;
        let mut buckets = Vec::with_capacity(self.counts.len());
        for (i, c) in self.counts.iter().enumerate() {
            let n = c.load(Relaxed);
            total = total.saturating_add(n);
            buckets.push((self.bounds.get(i).copied().unwrap_or(f64::INFINITY), n));
        }
        (self.sum_micros.load(Relaxed) as f64 / 1e6, total, buckets)
    }
}

/// How an upgrade request ended, for `upgate_upgrades_total{outcome}`.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// 101: a session started.
    Ok,
    /// The backend answered with something else (relayed).
    Refused,
    /// A bad request from the client (4xx).
    Rejected,
    /// No backend could take it (502/503/504).
    Failed,
}

/// Counters of one route (kept across reloads by route name).
#[derive(Debug)]
pub struct RouteStats {
    pub(crate) upgrades: [AtomicU64; 4],
    pub failovers: AtomicU64,
    /// Upgrades (of any outcome) that came as HTTP/2 extended CONNECTs.
    pub http2_upgrades: AtomicU64,
    pub sessions_active: AtomicU64,
    /// Bytes and WebSocket messages spliced, client → backend (`up`) and
    /// back; live sessions add theirs at most once per [`report_epoch`].
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub messages_up: AtomicU64,
    pub messages_down: AtomicU64,
    /// `mode: frames` sessions moved to another backend, and those that
    /// found none within `resume_timeout`.
    pub resumes: [AtomicU64; ResumeCause::ALL.len()],
    pub resume_failures: AtomicU64,
    /// Sessions closed with 1012 because the rebalancer asked them to leave (`rebalance: close`).
    pub rebalance_closes: AtomicU64,
    /// From losing a backend leg to the next one taking the session.
    pub resume_gap: Histogram,
    pub session_duration: Histogram,
    pub handshake: Histogram,
    /// Sessions admitted under the route's limits.
    pub admitted: Admitted,
    /// Authentication outcomes on the route (`auth:`).
    pub auth: AuthStats,
}

/// Why a request was refused authentication (a label of
/// `upgate_auth_refused_total`); never derived from the token's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthReason {
    Missing,
    Malformed,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    UnknownKey,
    /// A valid token that lacks a required claim value (403).
    Forbidden,
    /// The forward-auth service said no.
    Denied,
    /// The forward-auth service could not be asked (timeout, unreachable).
    Unavailable,
}

impl AuthReason {
    pub const ALL: [AuthReason; 11] = [
        AuthReason::Missing,
        AuthReason::Malformed,
        AuthReason::BadSignature,
        AuthReason::Expired,
        AuthReason::NotYetValid,
        AuthReason::WrongIssuer,
        AuthReason::WrongAudience,
        AuthReason::UnknownKey,
        AuthReason::Forbidden,
        AuthReason::Denied,
        AuthReason::Unavailable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            AuthReason::Missing => "missing",
            AuthReason::Malformed => "malformed",
            AuthReason::BadSignature => "bad_signature",
            AuthReason::Expired => "expired",
            AuthReason::NotYetValid => "not_yet_valid",
            AuthReason::WrongIssuer => "wrong_issuer",
            AuthReason::WrongAudience => "wrong_audience",
            AuthReason::UnknownKey => "unknown_key",
            AuthReason::Forbidden => "forbidden",
            AuthReason::Denied => "denied",
            AuthReason::Unavailable => "unavailable",
        }
    }
}

/// Authentication counters of one route.
#[derive(Debug, Default)]
pub struct AuthStats {
    pub allowed: AtomicU64,
    pub refused: [AtomicU64; AuthReason::ALL.len()],
    /// Live sessions ended because their token expired.
    pub expired_sessions: AtomicU64,
    /// Failed fetches of a JWKS URL (the last good keys stay).
    pub jwks_refresh_failures: AtomicU64,
    /// Forward-auth answers served from the cache.
    pub forward_cache_hits: AtomicU64,
}

impl AuthStats {
    pub fn refused(&self, r: AuthReason) {
        self.refused[r as usize].fetch_add(1, Relaxed);
    }
}

impl Default for RouteStats {
    fn default() -> Self {
        RouteStats {
            upgrades: Default::default(),
            failovers: AtomicU64::new(0),
            http2_upgrades: AtomicU64::new(0),
            sessions_active: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            messages_up: AtomicU64::new(0),
            messages_down: AtomicU64::new(0),
            resumes: Default::default(),
            resume_failures: AtomicU64::new(0),
            rebalance_closes: AtomicU64::new(0),
            resume_gap: Histogram::new(&RESUME_BUCKETS),
            session_duration: Histogram::new(&SESSION_BUCKETS),
            handshake: Histogram::new(&HANDSHAKE_BUCKETS),
            admitted: Default::default(),
            auth: Default::default(),
        }
    }
}

impl RouteStats {
    pub fn upgrade(&self, o: Outcome, took: Duration) {
        self.upgrades[o as usize].fetch_add(1, Relaxed);
        self.handshake.observe(took);
    }
}

/// Ticked once a second by whoever samples the counters (the dashboard's
/// history). A live session adds what it moved to its route's counters when
/// it notices a new epoch, so the hot path pays one relaxed load per wake-up
/// instead of an atomic add per message; a session adds the rest as it ends.
static REPORT_EPOCH: AtomicU64 = AtomicU64::new(0);

/// The current reporting epoch.
#[inline]
pub fn report_epoch() -> u64 {
    REPORT_EPOCH.load(Relaxed)
}

/// Asks live sessions to report what they moved (once a second).
pub fn tick_report_epoch() {
    REPORT_EPOCH.fetch_add(1, Relaxed);
}

/// Counts a live session on a route for as long as it is held.
#[derive(Debug)]
pub struct SessionGuard(Arc<RouteStats>);

impl SessionGuard {
    pub fn new(s: Arc<RouteStats>) -> SessionGuard {
        s.sessions_active.fetch_add(1, Relaxed);
        SessionGuard(s)
    }
    pub fn stats(&self) -> &RouteStats {
        &self.0
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.sessions_active.fetch_sub(1, Relaxed);
    }
}

/// Counters of one listener.
#[derive(Debug)]
pub struct ListenerStats {
    pub addr: SocketAddr,
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub tls_ok: AtomicU64,
    pub tls_failed: AtomicU64,
    /// Connections closed for a missing or malformed PROXY header.
    pub proxy_header_failed: AtomicU64,
    /// Connections closed because no complete request head came within
    /// `handshake_timeout` of the accept (TLS handshake included).
    pub handshake_timeouts: AtomicU64,
    /// Connections closed after `idle_timeout` with nothing in flight.
    pub idle_closed: AtomicU64,
    /// Failed `accept` calls (out of descriptors or memory, and the like).
    pub accept_errors: AtomicU64,
}

impl ListenerStats {
    pub fn new(addr: SocketAddr) -> ListenerStats {
        ListenerStats {
            addr,
            accepted: AtomicU64::new(0),
            active: AtomicU64::new(0),
            tls_ok: AtomicU64::new(0),
            tls_failed: AtomicU64::new(0),
            proxy_header_failed: AtomicU64::new(0),
            handshake_timeouts: AtomicU64::new(0),
            idle_closed: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
        }
    }
}

/// A route's admitted sessions (kept with its counters, so across reloads).
#[derive(Debug, Default)]
pub struct Admitted {
    pub(crate) total: AtomicU64,
    /// Admitted sessions per client address; an address leaves the map
    /// with its last session. Hashed with foldhash, seeded per map: about
    /// a tenth of SipHash's cost for an address (three hashes per session
    /// were 550 instructions), and its seed keeps collisions out of a
    /// client's reach.
    pub(crate) per_ip: std::sync::Mutex<
        std::collections::HashMap<std::net::IpAddr, u32, foldhash::fast::RandomState>,
    >,
    pub refused_route: AtomicU64,
    pub refused_ip: AtomicU64,
}
