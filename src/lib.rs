//! upgate: a WebSocket gateway.
//!
//! Data flow, accept to splice:
//! [`server`] accepts (connection-limit permit, `TCP_NODELAY`, one deadline
//! to a complete head), terminates TLS ([`tls`]: SNI certificate choice,
//! ALPN) and serves HTTP/1.1 and HTTP/2 with hyper, each connection
//! described by [`conn`]. [`proxy`] matches the request against the
//! [`router`] table of the current [`state`] snapshot, checks origins and
//! [`limits`], validates WebSocket handshakes ([`ws`]), takes the failover
//! order of the route's [`pool`] (strategies in [`balance`], health in
//! [`health`], probes in [`checker`]), connects ([`upstream`]) and exchanges
//! the upgrade with a backend ([`upgrade`]) **before** answering 101,
//! failing over to the next backend. The backend's 101 goes back to the
//! client and [`session`] takes both sockets back from hyper and
//! [`splice`]s them on a tracked task. Plain HTTP requests go through a
//! tower middleware stack to a pooled hyper client. Routes with `mode:
//! fanout` go to [`fanout`] instead: one upstream connection per channel,
//! each message framed once and broadcast to the channel's clients.
//!
//! Dependencies run one way (checked by `tests/architecture.rs`):
//! [`config`] and [`metrics`] depend on nothing in the crate; backends
//! ([`upstream`], [`pool`], [`health`], [`checker`]) on them; sessions
//! ([`splice`], [`session`], [`fanout`]) on backends, [`conn`] and
//! [`lifecycle`]; then [`state`] and [`reload`], the request path
//! ([`proxy`]), the [`server`], and the [`admin`] listener (with the
//! Prometheus collector) on top. [`supervise`] runs background tasks;
//! [`error`] maps every request-path error to a status in one place;
//! [`demo`] holds the built-in demo backends. docs/ARCHITECTURE.md tells
//! the whole story.

#![forbid(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod checker;
pub mod config;
pub mod conn;
pub mod demo;
pub mod error;
pub mod fanout;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod proxy_protocol;
pub mod reload;
pub mod router;
pub mod server;
pub mod session;
pub mod splice;
pub mod state;
pub mod supervise;
pub mod tls;
pub mod upgrade;
pub mod upstream;
pub mod watch;
pub mod ws;

pub use config::Config;
pub use server::Gateway;

/// A small deterministic generator (xorshift64*) for randomized tests, so a
/// failure repeats with the same seed.
#[cfg(test)]
pub(crate) fn test_rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}
