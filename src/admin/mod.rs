//! The admin listener: `/healthz`, `/readyz`, `/metrics` (Prometheus),
//! `/routes`, `/pools`, `/config` and `/history` (JSON), `POST /reload`, and
//! `GET /`, a live dashboard (charts of the last 15 minutes drawn by the
//! embedded uPlot, see `history`), for operators and orchestrators. It runs through a tower/tower-http stack
//! (tracing, a timeout, a global concurrency limit) and, when a token is
//! configured, wants `Authorization: Bearer TOKEN` on everything but the two
//! probes. It keeps serving while the gateway drains, so `/readyz` can say so.
//!
//! Against hostile web pages in the operator's browser: requests must name
//! the admin by an IP address, `localhost` or a configured host (a DNS
//! rebinding page sends its own name), and `POST`s from another origin are
//! refused (a cross-site form cannot reload).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tracing::{debug, warn};

pub mod history;
mod prometheus;

use crate::error::{full, text_response, Body};
use crate::state::Shared;

/// What the admin endpoints read.
#[derive(Clone)]
struct Admin {
    shared: Arc<Shared>,
    token: Option<Arc<str>>,
    /// Host names accepted besides IP literals and `localhost`.
    hosts: Arc<[String]>,
    metrics: Arc<prometheus_client::registry::Registry>,
    history: Arc<history::History>,
}

/// Serves the admin listener until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    settings: crate::config::AdminConfig,
    stop: CancellationToken,
) {
    let history = Arc::new(history::History::default());
    tokio::spawn(history::run(shared.clone(), history.clone(), stop.clone()));
    let admin = Admin {
        metrics: Arc::new(prometheus::registry(shared.clone())),
        history,
        shared,
        token: settings.token.map(Arc::from),
        hosts: settings.hosts.into(),
    };
    let svc = ServiceBuilder::new()
        .map_response(|r: Response<_>| {
            r.map(|b: tower_http::trace::ResponseBody<Body, _>| {
                http_body_util::BodyExt::boxed_unsync(http_body_util::BodyExt::map_err(
                    b,
                    Into::into,
                ))
            })
        })
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(10),
        ))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(32))
        .service_fn(move |req| {
            let admin = admin.clone();
            async move { Ok::<_, Infallible>(admin.handle(req).await) }
        });
    let svc: tower::util::BoxCloneSyncService<Request<Incoming>, Response<Body>, Infallible> =
        tower::util::BoxCloneSyncService::new(svc);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let svc = svc.clone();
        let svc =
            hyper::service::service_fn(move |req| tower::ServiceExt::oneshot(svc.clone(), req));
        let stop = stop.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                r = conn => if let Err(e) = r { debug!(%peer, error = %e, "admin connection ended") },
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// Whether `host` (a `Host` header: name or address, optional port) names
/// this listener: an IP literal, `localhost`, or one of `extra`.
fn host_allowed(host: &str, extra: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        // [v6]:port
        Some(v6) => match v6.split_once(']') {
            Some((addr, rest)) => {
                return (rest.is_empty() || rest.starts_with(':'))
                    && addr.parse::<std::net::Ipv6Addr>().is_ok()
            }
            None => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(n, _)| n),
    };
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || extra.iter().any(|h| h.eq_ignore_ascii_case(name))
}

fn json_response(v: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(v.to_string())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

const ENDPOINTS: &str =
    "endpoints: GET / /healthz /readyz /metrics /routes /pools /config /history[?since=N], POST /reload\n";

/// A static file of the dashboard, cached by the browser for a day.
fn asset(body: &'static str, kind: &'static str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from_static(body.as_bytes())));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=86400"),
    );
    r
}

impl Admin {
    /// A bearer token in `Authorization`, or `?token=` (for the status page in a browser).
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let query = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
        header.or(query).is_some_and(|t| t == &**token)
    }

    /// Refuses what a web page could make the operator's browser send: a
    /// `Host` that is not this listener's (DNS rebinding), and a state
    /// change from another origin (a cross-site form or fetch).
    fn same_site(&self, req: &Request<Incoming>) -> Result<(), &'static str> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok());
        if let Some(host) = host {
            if !host_allowed(host, &self.hosts) {
                return Err("this admin listener answers only to its IP address, localhost, or a name listed in admin.hosts");
            }
        }
        if req.method() == Method::GET || req.method() == Method::HEAD {
            return Ok(());
        }
        let h = req.headers();
        if h.get("sec-fetch-site")
            .is_some_and(|v| v != "same-origin" && v != "none")
        {
            return Err("cross-site requests may not change anything here");
        }
        if let Some(origin) = h.get(header::ORIGIN) {
            let own = host.is_some_and(|host| {
                origin
                    .to_str()
                    .ok()
                    .and_then(|o| o.split_once("://"))
                    .is_some_and(|(scheme, rest)| {
                        (scheme == "http" || scheme == "https") && rest.eq_ignore_ascii_case(host)
                    })
            });
            if !own {
                return Err("requests from another origin may not change anything here");
            }
        }
        Ok(())
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let get = req.method() == Method::GET;
        match path.as_str() {
            "/healthz" if get => return text_response(StatusCode::OK, "ok\n".into()),
            // The chart library is public code: a `<script src>` cannot carry the token.
            "/assets/uplot.js" if get => return asset(UPLOT_JS, "text/javascript; charset=utf-8"),
            "/assets/uplot.css" if get => return asset(UPLOT_CSS, "text/css; charset=utf-8"),
            "/readyz" if get => {
                return if self.shared.draining.load(Ordering::Relaxed) {
                    text_response(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
                } else {
                    text_response(StatusCode::OK, "ready\n".into())
                };
            }
            _ => {}
        }
        if let Err(why) = self.same_site(&req) {
            debug!(why, "admin request refused");
            return text_response(StatusCode::FORBIDDEN, format!("{why}\n"));
        }
        if !self.authorized(&req) {
            let mut r = text_response(
                StatusCode::UNAUTHORIZED,
                "a bearer token is required\n".into(),
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
        match (path.as_str(), get, req.method() == Method::POST) {
            ("/", true, _) => {
                let mut r = Response::new(full(Bytes::from_static(STATUS_PAGE.as_bytes())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
                r
            }
            ("/history", true, _) => {
                let since = req
                    .uri()
                    .query()
                    .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("since=")))
                    .and_then(|n| n.parse().ok());
                let mut v = self.history.json(since);
                v["reloads"] = self.reloads();
                v["channels"] = self.channel_upstreams();
                json_response(v)
            }
            ("/routes", true, _) => self.routes(),
            ("/pools", true, _) => self.pools(),
            ("/config", true, _) => json_response(config_json(&self.shared.snapshot.load().config)),
            ("/metrics", true, _) => self.metrics(),
            ("/reload", _, true) => match crate::state::request_reload(&self.shared.reload).await {
                Ok(summary) => json_response(json!({ "reloaded": true, "summary": summary })),
                Err(error) => {
                    let mut r = json_response(json!({ "reloaded": false, "error": error }));
                    *r.status_mut() = StatusCode::BAD_REQUEST;
                    r
                }
            },
            (
                "/" | "/routes" | "/pools" | "/config" | "/history" | "/metrics" | "/reload",
                _,
                _,
            ) => text_response(StatusCode::METHOD_NOT_ALLOWED, ENDPOINTS.into()),
            _ => text_response(StatusCode::NOT_FOUND, ENDPOINTS.into()),
        }
    }

    /// The last reloads, oldest first.
    fn reloads(&self) -> serde_json::Value {
        let log = self
            .shared
            .stats
            .reload_log
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        log.iter()
            .map(|r| {
                let at =
                    r.at.duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                json!({ "at_ms": at, "ok": r.ok, "text": r.text })
            })
            .collect()
    }

    /// Each open channel's route, key, clients and upstream backends now.
    fn channel_upstreams(&self) -> serde_json::Value {
        let snap = self.shared.snapshot.load();
        snap.each_route()
            .filter_map(|(r, state)| Some((r, state.hub.as_ref()?)))
            .flat_map(|(r, hub)| {
                let linger = hub.linger();
                hub.channel_list().into_iter().map(move |c| {
                    json!({
                        "route": r.name,
                        "channel": c.key,
                        "id": format!("{} {}", r.name, c.key),
                        "clients": c.clients,
                        "upstreams": c.upstreams,
                        "linger_ms": linger.as_millis() as u64,
                    })
                })
            })
            .collect()
    }

    fn metrics(&self) -> Response<Body> {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.metrics) {
            return text_response(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"));
        }
        let mut r = Response::new(full(Bytes::from(out)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        r
    }

    fn routes(&self) -> Response<Body> {
        let snap = self.shared.snapshot.load();
        let routes: Vec<_> = snap
            .each_route()
            .map(|(r, state)| {
                let (hub, stats) = (&state.hub, &state.stats);
                let mut v = json!({
                    "name": r.name,
                    "host": r.host.to_string(),
                    "path": r.path,
                    "pool": snap.pools[r.pool].name,
                    "strip_prefix": r.strip_prefix,
                    "mode": if hub.is_some() {
                        "fanout"
                    } else if r.frames.is_some() {
                        "frames"
                    } else {
                        "splice"
                    },
                    "sessions_active": stats.sessions_active.load(Ordering::Relaxed),
                    "clients": stats.admitted.clients(),
                    "max_sessions": r.limits.max_sessions,
                    "max_sessions_per_ip": r.limits.max_sessions_per_ip,
                });
                if let Some(h) = hub {
                    v["fanout"] = fanout_json(h);
                }
                v
            })
            .collect();
        json_response(json!({ "routes": routes }))
    }

    fn pools(&self) -> Response<Body> {
        let snap = self.shared.snapshot.load();
        let pools: Vec<_> = snap
            .pools
            .iter()
            .map(|p| {
                let backends: Vec<_> = p
                    .backends()
                    .iter()
                    .map(|b| {
                        json!({
                            "url": b.url.to_string(),
                            "weight": b.weight,
                            "drain": b.drain,
                            "healthy": b.health.healthy(),
                            "available": b.health.available() && !b.drain,
                            "ejected_for_ms": b.health.ejected_for().map(|d| d.as_millis() as u64),
                            "live_sessions": b.active(),
                            "failures": b.failures.load(Ordering::Relaxed),
                            "ejections": b.ejections.load(Ordering::Relaxed),
                        })
                    })
                    .collect();
                json!({
                    "name": p.name,
                    "balance": p.balance.to_string(),
                    "backends": backends,
                })
            })
            .collect();
        json_response(json!({ "pools": pools }))
    }
}

/// A fan-out route's counters and open channels.
fn fanout_json(h: &crate::fanout::Hub) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &h.stats;
    let channels: Vec<_> = h
        .channel_list()
        .into_iter()
        .map(|c| {
            json!({
                "channel": c.key,
                "clients": c.clients,
                "messages_in": c.messages_in,
                "dropped": c.dropped,
                "slow_disconnects": c.slow_disconnects,
                "upstreams": c.upstreams,
            })
        })
        .collect();
    json!({
        "sources": h.source_names(),
        "clients": s.clients.load(Relaxed),
        "messages_in": s.messages_in.load(Relaxed),
        "delivered": s.delivered.load(Relaxed),
        "dropped": s.dropped.load(Relaxed),
        "slow_disconnects": s.slow_disconnects.load(Relaxed),
        "upstream_reconnects": s.reconnects.load(Relaxed),
        "forwarded": s.forwarded.load(Relaxed),
        "forward_dropped": s.forward_dropped.load(Relaxed),
        "channels": channels,
    })
}

/// The effective config as JSON, the admin token redacted.
fn config_json(c: &crate::config::Config) -> serde_json::Value {
    let s = &c.server;
    let listeners: Vec<_> = c
        .listeners
        .iter()
        .map(|l| {
            json!({
                "addr": l.addr.to_string(),
                "tls": l.tls.as_ref().map(|certs| certs.iter().map(|f| json!({
                    "cert": f.cert.display().to_string(),
                    "key": f.key.display().to_string(),
                })).collect::<Vec<_>>()),
                "proxy_protocol": l.proxy_protocol,
            })
        })
        .collect();
    let pools: Vec<_> = c
        .pools
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "balance": p.balance.to_string(),
                "hash_key": p.hash_key.as_ref().map(ToString::to_string),
                "connect_timeout_ms": p.connect_timeout.as_millis() as u64,
                "backends": p.backends.iter().map(|b| json!({
                    "url": b.url.to_string(), "weight": b.weight, "drain": b.drain, "discover": b.discover,
                })).collect::<Vec<_>>(),
                "health": p.health.as_ref().map(|h| format!("{h:?}")),
                "eject_after": p.passive.eject_after,
                "eject_for_ms": p.passive.eject_for.as_millis() as u64,
                "fail_open": p.fail_open,
                "on_backend_down": format!("{:?}", p.on_backend_down),
                "max_attempts": p.max_attempts,
                "slow_start_ms": p.slow_start.as_millis() as u64,
            })
        })
        .collect();
    let routes: Vec<_> = c
        .routes
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "host": r.host.to_string(),
                "path": r.path,
                "pool": c.pools[r.pool].name,
                "strip_prefix": r.strip_prefix,
                "preserve_host": r.preserve_host,
                "origins": r.origins.as_ref().map(|o| o.iter().map(|p| p.to_string()).collect::<Vec<_>>()),
                "max_sessions": r.limits.max_sessions,
                "max_sessions_per_ip": r.limits.max_sessions_per_ip,
                "fanout": r.fanout.as_ref().map(|f| format!("{f:?}")),
            })
        })
        .collect();
    json!({
        "source": c.source.display().to_string(),
        "server": {
            "handshake_timeout_ms": s.handshake_timeout.as_millis() as u64,
            "max_connections": s.max_connections,
            "max_header_bytes": s.max_header_bytes,
            "max_headers": s.max_headers,
            "request_timeout_ms": s.request_timeout.as_millis() as u64,
            "shutdown_grace_ms": s.shutdown_grace.as_millis() as u64,
            "half_close_timeout_ms": s.half_close_timeout.as_millis() as u64,
            "drain_timeout_ms": s.drain_timeout.as_millis() as u64,
            "watch_interval_ms": s.watch_interval.as_millis() as u64,
        },
        "admin": c.admin.as_ref().map(|a| json!({
            "addr": a.addr.to_string(),
            "token": a.token.as_ref().map(|_| "<redacted>"),
            "hosts": a.hosts,
            "insecure": a.insecure,
        })),
        "listen": listeners,
        "pools": pools,
        "routes": routes,
    })
}

/// `GET /`: the dashboard (charts from `/history`, tables from `/routes`
/// and `/pools`), refreshed every second.
const STATUS_PAGE: &str = include_str!("page.html");
/// uPlot 1.6.32 (MIT), see `vendor/README.md`: no CDN, the page works offline.
const UPLOT_JS: &str = include_str!("vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("vendor/uPlot.min.css");

#[cfg(test)]
mod host_tests {
    #[test]
    fn hosts_that_name_this_listener() {
        let extra = ["gw.internal".to_string()];
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9901",
            "10.0.0.5:80",
            "[::1]:9901",
            "[::1]",
            "localhost",
            "LOCALHOST:1",
            "gw.internal",
            "gw.internal:9901",
        ] {
            assert!(super::host_allowed(ok, &extra), "{ok}");
        }
        for bad in [
            "evil.example.com",
            "evil.example.com:9901",
            "127.0.0.1.nip.io",
            "[::1]x",
            "[evil]:1",
            "gw.internal.evil",
            "",
            "localhost.evil:1",
        ] {
            assert!(!super::host_allowed(bad, &extra), "{bad}");
        }
    }
}
