//! Backends: everything upgate knows about the servers behind a route.
//!
//! [`pool`] holds a service's backends, picks the next one and keeps the
//! live-session count each carries ([`balance`] is the picking arithmetic,
//! [`discovery`] resolves `discover: dns` backends, [`connector`] opens the
//! pooled plain-HTTP client's connections). [`health`] is the up/down state
//! machine that active probes ([`checker`]) and passive outcomes feed.
//! [`upstream`] connects (TCP, keepalive, TLS) and [`upgrade`] exchanges the
//! WebSocket upgrade with a backend by hand. Nothing here knows about
//! routes, sessions or the request path.

use std::time::Duration;

use bytes::Bytes;

use upstream::ConnectError;

pub mod balance;
pub mod checker;
pub mod connector;
pub mod discovery;
pub mod health;
pub mod pool;
pub mod rebalance;
pub mod upgrade;
pub mod upstream;

pub use discovery::{system_resolver, Resolver};
pub use pool::{Backend, BackendGuard, Pool};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every request upgate sends to a backend and every
/// response it answers with.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Failure talking to one backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("I/O error during the upgrade: {0}")]
    Io(#[source] std::io::Error),
    #[error("bad answer to the upgrade: {0}")]
    Protocol(&'static str),
    #[error("request failed: {0}")]
    Client(#[from] hyper_util::client::legacy::Error),
    #[error("no response head within {0:?}")]
    Timeout(Duration),
}

impl BackendError {
    /// A stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendError::Connect(ConnectError::Timeout(_)) => "connect_timeout",
            BackendError::Connect(ConnectError::Local(_)) => "local_resources",
            BackendError::Connect(_) => "connect",
            BackendError::Io(_) => "io",
            BackendError::Protocol(_) | BackendError::Client(_) => "protocol",
            BackendError::Timeout(_) => "response_timeout",
        }
    }

    /// The gateway's own resources failed, not the backend (see
    /// [`upstream::is_local`]): not a backend failure, not worth a failover.
    pub fn is_local(&self) -> bool {
        match self {
            BackendError::Connect(c) => c.is_local(),
            BackendError::Client(e) => upstream::chain_is_local(e),
            BackendError::Io(e) => upstream::is_local(e),
            BackendError::Protocol(_) | BackendError::Timeout(_) => false,
        }
    }
}
