//! Errors on the request path, and the one place they become HTTP responses.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::backend::upstream::ConnectError;
use crate::backend::{BackendError, Pool};
use crate::ws::HandshakeError;

pub use crate::backend::{Body, BoxError};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for host `{host}` and path `{path}`")]
    NoRoute { host: String, path: String },
    #[error("bad WebSocket handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("no backend of pool `{pool}` could be reached ({tried} tried)")]
    NoBackend {
        pool: String,
        tried: usize,
        #[source]
        last: BackendError,
    },
    #[error("backend failed: {0}")]
    Backend(#[source] BackendError),
    #[error("no backend of pool `{pool}` is available (all down or ejected)")]
    Unavailable { pool: String, retry_after: Duration },
    /// A fan-out request without the value that names its channel.
    #[error("no channel: the request has no {0}")]
    NoChannel(String),
    /// The route holds `max_sessions` sessions already.
    #[error("route `{route}` is at its limit of {limit} sessions")]
    RouteFull { route: String, limit: u64 },
    /// This client address holds `max_sessions_per_ip` sessions on the route already.
    #[error("{ip} already has {limit} sessions on route `{route}`, its limit")]
    ClientFull {
        ip: std::net::IpAddr,
        route: String,
        limit: u32,
    },
    /// A fan-out route holds `max_channels` channels already.
    #[error("route `{route}` has {limit} channels open, its limit")]
    ChannelLimit { route: String, limit: usize },
    /// A channel key outside the route's `channels` list.
    #[error("no channel `{0}` on this route")]
    ChannelNotAllowed(String),
    /// This client address opened `channel_opens_per_ip` new channels in the last minute.
    #[error("{ip} opened too many new channels on route `{route}` (limit {limit} a minute)")]
    ChannelRate {
        ip: std::net::IpAddr,
        route: String,
        limit: u32,
    },
    /// The fan-out channel's task died before its upstream opened.
    #[error("the channel failed before its upstream opened; try again")]
    ChannelFailed,
    /// The fan-out channel's upstream did not open in time.
    #[error("the channel's upstream did not open within {0:?}")]
    ChannelTimeout(Duration),
    /// A browser page from an origin the route does not allow.
    #[error("origin `{0}` may not open WebSockets on this route")]
    Origin(String),
    /// The gateway ran out of descriptors, ports or memory reaching a backend.
    #[error("the gateway is short of local resources (file descriptors, ports or memory); try again shortly")]
    Local(#[source] BackendError),
    /// A request on a path that cannot serve it: a bug of upgate's, answered 500.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// One failure answered to every client waiting for the same fan-out channel.
    #[error(transparent)]
    Shared(std::sync::Arc<ProxyError>),
}

impl ProxyError {
    /// The error once a pool's failover order is used up: 503 when nothing
    /// was even available to try, otherwise 502/504 with the last failure.
    pub fn exhausted(pool: &Pool, tried: usize, last: Option<BackendError>) -> ProxyError {
        match last {
            Some(last) if tried > 0 => ProxyError::NoBackend {
                pool: pool.name.clone(),
                tried,
                last,
            },
            _ => ProxyError::Unavailable {
                pool: pool.name.clone(),
                retry_after: pool.retry_after(),
            },
        }
    }

    /// The status code for each error: the one mapping, kept exhaustive on purpose.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::NoChannel(_) => StatusCode::BAD_REQUEST,
            ProxyError::Origin(_) => StatusCode::FORBIDDEN,
            ProxyError::RouteFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Local(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ClientFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::ChannelLimit { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ChannelNotAllowed(_) => StatusCode::NOT_FOUND,
            ProxyError::ChannelRate { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::ChannelFailed => StatusCode::BAD_GATEWAY,
            ProxyError::ChannelTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Shared(inner) => inner.status(),
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Handshake(HandshakeError::UnsupportedVersion) => {
                StatusCode::UPGRADE_REQUIRED
            }
            ProxyError::Handshake(
                HandshakeError::NotGet
                | HandshakeError::NotWebSocket
                | HandshakeError::NoConnectionUpgrade
                | HandshakeError::BadKey
                | HandshakeError::OldHttp,
            ) => StatusCode::BAD_REQUEST,
            ProxyError::NoBackend { last, .. } | ProxyError::Backend(last) => match last {
                BackendError::Timeout(_) | BackendError::Connect(ConnectError::Timeout(_)) => {
                    StatusCode::GATEWAY_TIMEOUT
                }
                BackendError::Connect(_)
                | BackendError::Io(_)
                | BackendError::Protocol(_)
                | BackendError::Client(_) => StatusCode::BAD_GATEWAY,
            },
        }
    }

    /// A short plain-text answer. Backend addresses stay in the log, not in the body.
    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        let mut resp = text_response(
            status,
            format!(
                "{} {}: {self}\n",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            ),
        );
        // A shared error carries the headers of the one inside.
        let own = match &self {
            ProxyError::Shared(inner) => &**inner,
            e => e,
        };
        match own {
            ProxyError::Handshake(HandshakeError::UnsupportedVersion) => {
                resp.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            ProxyError::Unavailable { retry_after, .. } => {
                resp.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after.as_secs().max(1)),
                );
            }
            // A place frees when any session ends: worth trying again soon.
            ProxyError::RouteFull { .. }
            | ProxyError::ClientFull { .. }
            | ProxyError::ChannelLimit { .. }
            | ProxyError::Local(_) => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ProxyError::ChannelRate { .. } => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            }
            _ => {}
        }
        resp
    }
}

pub fn text_response(status: StatusCode, text: String) -> Response<Body> {
    let mut resp = Response::new(full(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    full(Bytes::new())
}
