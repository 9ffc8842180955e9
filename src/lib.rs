//! upgate: a WebSocket gateway.
//!
//! The tree is the architecture, top to bottom (docs/ARCHITECTURE.md tells
//! the whole story):
//!
//! - [`admin`]: the admin listener (probes, JSON views, reload, status
//!   page, the Prometheus collector).
//! - [`server`]: listeners, the accept loop (deadline, PROXY header, TLS),
//!   HTTP/1.1 and HTTP/2 serving, applying reloads, shutdown.
//! - [`proxy`]: the request path: route ([`router`]), authentication
//!   ([`auth`]), origin, limits ([`limits`]), handshake checks ([`ws`]),
//!   then a splice upgrade with failover, a fan-out client, or plain HTTP
//!   through tower.
//! - [`state`] and [`reload`]: the snapshot every request reads and how a
//!   new config becomes the next one.
//! - [`session`] (one spliced session: the client leg and the splice) and
//!   [`fanout`] (one upstream per channel, broadcast to its clients), on
//!   [`lifecycle`]'s task tracker; [`supervise`] runs background tasks.
//! - [`backend`]: pools, balancing, health and checks, DNS discovery,
//!   connecting and the upgrade exchange with a backend.
//! - [`config`] and [`metrics`] at the bottom, depending on nothing in the
//!   crate; [`tls`] loads certificates; [`error`] maps every request-path
//!   error to a status in one place.
//!
//! Dependencies run one way, checked by `tests/architecture.rs`. [`demo`]
//! holds the built-in demo backends.

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod backend;
pub mod buffers;
pub mod config;
pub mod demo;
pub mod error;
pub mod fanout;
pub mod frames;
#[doc(hidden)]
pub mod fuzzing;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod router;
pub mod server;
pub mod session;
pub mod state;
pub mod supervise;
pub mod tls;
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
