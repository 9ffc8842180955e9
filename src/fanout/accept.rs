//! A client's upgrade on a fan-out route: which channel it names, joining
//! (or opening) that channel, the 101, and the client's task.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::{debug, info};

use super::direct::SharedTcp;
use super::{client, Hub, State};
use crate::config::{ChannelKey, FanoutConfig};
use crate::error::{Body, ProxyError};
use crate::lifecycle::Lifecycle;
use crate::router::{self, Route};
use crate::session::conn::ConnInfo;
use crate::session::Admitted;
use crate::ws::deflate;

/// The channel (and upstream target) of a client connecting to exactly
/// the route's path without a query.
pub(super) fn route_channel(route: &Route, cfg: &FanoutConfig) -> (String, String) {
    let target = match &cfg.upstream_path {
        Some(t) => t.replace("{channel}", "/"),
        None if route.strip_prefix => "/".to_string(),
        None => route.path.clone(),
    };
    ("/".to_string(), target)
}

/// The channel key and the upstream target of a request.
fn channel_of<B>(
    route: &Route,
    cfg: &FanoutConfig,
    req: &Request<B>,
) -> Result<(String, String), ProxyError> {
    let uri = req.uri();
    let rest = router::strip(&route.path, uri.path());
    let own_path = if route.strip_prefix { rest } else { uri.path() };
    let key = match &cfg.channel {
        ChannelKey::Path => match uri.query() {
            Some(q) => format!("{rest}?{q}"),
            None => rest.to_string(),
        },
        ChannelKey::Query(name) => crate::ws::query_values(uri, name)
            .find(|v| !v.is_empty())
            .map(str::to_string)
            .ok_or_else(|| ProxyError::NoChannel(format!("query parameter `{name}`")))?,
        ChannelKey::Header(name) => req
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .ok_or_else(|| ProxyError::NoChannel(format!("header `{name}`")))?,
    };
    // The key goes into the upstream request and into `subscribe` messages:
    // nothing that could break out of a JSON string or a request line.
    if key.len() > 256 || key.chars().any(|c| c == '"' || c == '\\' || c.is_control()) {
        return Err(ProxyError::NoChannel(
            "channel name of at most 256 characters without quotes, backslashes or control characters"
                .into(),
        ));
    }
    let target = match (&cfg.upstream_path, &cfg.channel) {
        (Some(t), _) => t.replace("{channel}", &key),
        (None, ChannelKey::Path) => match uri.query() {
            Some(q) => format!("{own_path}?{q}"),
            None => own_path.to_string(),
        },
        (None, _) => (if route.strip_prefix {
            "/"
        } else {
            route.path.as_str()
        })
        .to_string(),
    };
    if http::uri::PathAndQuery::try_from(target.as_str()).is_err() {
        return Err(ProxyError::NoChannel(format!(
            "channel name that fits in a request target (`{key}`)"
        )));
    }
    Ok((key, target))
}

/// Whether the runtime has one worker thread (`--threads 1`).
fn single_worker() -> bool {
    tokio::runtime::Handle::try_current().is_ok_and(|h| h.metrics().num_workers() == 1)
}

/// Answers a fan-out route's upgrade: joins the channel (waiting for its
/// upstream if this client opened it), then sends 101 and starts the client.
pub async fn accept(
    life: &Lifecycle,
    conn: &Arc<ConnInfo>,
    hub: &Arc<Hub>,
    admitted: Admitted<'_>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let Admitted {
        route,
        stats,
        admission,
        auth,
    } = admitted;
    let auth = auth.unwrap_or_default();
    let (expires, who) = (auth.expires, auth.who);
    crate::ws::validate(&req)?;
    let (key, target) = channel_of(route, &hub.cfg, &req)?;
    let member = hub.join(life, key, target, conn.peer.ip())?;
    let mut state = member.ch.state.subscribe();
    // Bounded: a channel task that neither connects nor fails (it cannot,
    // but a client must never wait on it forever) is a 504.
    let limit = hub.settings.handshake_timeout;
    let waited = tokio::time::timeout(limit, state.wait_for(|s| !matches!(s, State::Connecting)))
        .await
        .map(|r| r.map(|s| s.clone()));
    match waited {
        Ok(Ok(State::Failed(e))) => return Err(ProxyError::Shared(e)),
        Ok(Ok(_)) => {}
        // The channel task ended before deciding: the gateway is stopping.
        Ok(Err(_)) => {
            return Err(ProxyError::Unavailable {
                pool: hub.pool(0).name.clone(),
                retry_after: std::time::Duration::from_secs(1),
            })
        }
        Err(_) => return Err(ProxyError::ChannelTimeout(limit)),
    }
    let extension = if hub.cfg.compression {
        deflate::negotiate(req.headers())
    } else {
        None
    };
    let (rx, replay) = member
        .ch
        .subscribe(hub.cfg.replay_last, extension.is_some());
    let accept_key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| tokio_tungstenite::tungstenite::handshake::derive_accept_key(k.as_bytes()))
        .unwrap_or_default();
    let client_upgrade = hyper::upgrade::on(&mut req);

    let stop = life.hard_stop.clone();
    let conn = conn.busy();
    let session = crate::metrics::SessionGuard::new(stats.clone());
    // Not instrumented (a span entered on every wake-up costs at 10,000
    // clients); the access line names the route and peer itself.
    let route_name = route.name.clone();
    life.tasks.spawn(async move {
        let up = match client_upgrade.await {
            Ok(up) => up,
            Err(e) => {
                debug!(error = %e, "client upgrade did not complete");
                return;
            }
        };
        let started = tokio::time::Instant::now();
        let cx = client::Cx {
            hub: &member.hub,
            ch: &member.ch,
            stop: &stop,
            retired: &member.hub.retired,
            deflate: extension.is_some(),
            expires,
        };
        let out = match crate::session::conn::client_leg(up, conn.tls) {
            // Shared with the channel's task, which writes to it while the
            // client has caught up: on a one-thread runtime, and not with
            // deflate (its frames differ). With several workers the clients'
            // own tasks spread the writes over the cores, which measured
            // better than the channel writing (docs/performance.md).
            crate::session::conn::Leg::Tcp(s, pending) if !cx.deflate && single_worker() => {
                let s = Arc::new(s);
                let direct = Some(s.clone());
                client::run(SharedTcp(s), pending, rx, replay, cx, direct).await
            }
            crate::session::conn::Leg::Tcp(s, pending) => {
                client::run(s, pending, rx, replay, cx, None).await
            }
            crate::session::conn::Leg::Other(io, pending) => {
                Box::pin(client::run(io, pending, rx, replay, cx, None)).await
            }
        };
        info!(
            target: "upgate::access",
            peer = %conn.peer,
            route = %route_name,
            channel = %member.ch.key,
            duration_ms = started.elapsed().as_millis() as u64,
            delivered = out.delivered,
            dropped = out.dropped,
            end = out.end.label(),
            close_code = out.close_code,
            user = who.as_deref(),
            error = out.error.as_ref().map(tracing::field::display),
            "fanout session"
        );
        session.stats().session_duration.observe(started.elapsed());
        if out.end == client::End::TokenExpired {
            let s = session.stats();
            s.auth
                .expired_sessions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        drop(member);
        drop(conn);
        drop(admission);
    });
    let mut resp = Response::new(crate::error::empty());
    let h2 = crate::ws::is_h2_websocket(&req);
    let h = resp.headers_mut();
    if !h2 {
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Ok(v) = HeaderValue::from_str(&accept_key) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
    }
    if let Some(e) = extension {
        h.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static(e),
        );
    }
    // upgate selects no subprotocol of its own; a token offered as one is
    // selected, or a browser fails the handshake.
    if let Some(v) = auth
        .token_protocol
        .as_deref()
        .and_then(|p| HeaderValue::from_str(p).ok())
    {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
    }
    // HTTP/2 (RFC 8441): `200` opens the stream.
    *resp.status_mut() = if h2 {
        StatusCode::OK
    } else {
        StatusCode::SWITCHING_PROTOCOLS
    };
    Ok(resp)
}
