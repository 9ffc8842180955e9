//! The admin listener: `/healthz`, `/readyz`, `/routes` and `/pools` (JSON)
//! for operators and orchestrators. It runs through a tower/tower-http stack
//! (tracing, a timeout, a global concurrency limit) and, when a token is
//! configured, wants `Authorization: Bearer TOKEN` on everything but the two
//! probes. It keeps serving while the gateway drains, so `/readyz` can say so.

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

use crate::error::{full, text_response, Body};
use crate::proxy::Shared;

/// What the admin endpoints read.
#[derive(Clone)]
struct Admin {
    shared: Arc<Shared>,
    token: Option<Arc<str>>,
}

/// Serves the admin listener until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    token: Option<String>,
    stop: CancellationToken,
) {
    let admin = Admin {
        shared,
        token: token.map(Arc::from),
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
            async move { Ok::<_, Infallible>(admin.handle(req)) }
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

fn json_response(v: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(v.to_string())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

impl Admin {
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| t.trim() == &**token)
    }

    fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path();
        if req.method() != Method::GET {
            return text_response(StatusCode::METHOD_NOT_ALLOWED, "only GET here\n".into());
        }
        match path {
            "/healthz" => return text_response(StatusCode::OK, "ok\n".into()),
            "/readyz" => {
                return if self.shared.draining.load(Ordering::Relaxed) {
                    text_response(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
                } else {
                    text_response(StatusCode::OK, "ready\n".into())
                };
            }
            _ => {}
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
        match path {
            "/routes" => self.routes(),
            "/pools" => self.pools(),
            _ => text_response(
                StatusCode::NOT_FOUND,
                "endpoints: /healthz /readyz /routes /pools\n".into(),
            ),
        }
    }

    fn routes(&self) -> Response<Body> {
        let snap = self.shared.snapshot.load();
        let routes: Vec<_> = snap
            .routes
            .routes()
            .iter()
            .zip(&snap.hubs)
            .map(|(r, hub)| {
                let mut v = json!({
                    "name": r.name,
                    "host": r.host.to_string(),
                    "path": r.path,
                    "pool": snap.pools[r.pool].name,
                    "strip_prefix": r.strip_prefix,
                    "mode": if hub.is_some() { "fanout" } else { "splice" },
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
                        })
                    })
                    .collect();
                json!({
                    "name": p.name,
                    "balance": format!("{:?}", p.balance),
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
        .map(|(key, clients)| json!({ "channel": key, "clients": clients }))
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
        "channels": channels,
    })
}
