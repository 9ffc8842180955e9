//! The request path: route, then either a WebSocket upgrade spliced to a
//! backend or a plain HTTP request proxied with connection reuse.

use std::convert::Infallible;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::{debug, info, Instrument};

use crate::backend::{Backend, Pool};
use crate::config::HashKey;
use crate::error::{Body, ProxyError};
use crate::metrics::Outcome;
use crate::router::{self, Route};
use crate::session::conn::ConnInfo;
use crate::session::{Admitted, Authenticated};
use crate::state::{Shared, Snapshot};
use crate::ws::{self, Forwarded};
use std::sync::atomic::Ordering;

pub mod direct;
mod plain;
mod upgrade;

pub use plain::proxy_http;
use upgrade::upgrade;

/// What the router decided, carried to the plain-HTTP service through request extensions.
#[derive(Clone)]
pub struct Matched {
    snapshot: Arc<Snapshot>,
    route: usize,
    conn: Arc<ConnInfo>,
}

/// The `Host` of a request: the header on HTTP/1.1, the URI authority on HTTP/2.
fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
}

/// Entry point for every request on a client connection.
pub async fn handle<S>(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    http: S,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible>
where
    S: tower::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>,
{
    conn.requests.fetch_add(1, Ordering::Relaxed);
    let _busy = conn.busy();
    let snapshot = shared.snapshot.load_full();
    let host = request_host(req.uri(), req.headers()).unwrap_or("");
    let Some(route) = snapshot.routes.find_index(host, req.uri().path()) else {
        let e = ProxyError::NoRoute {
            host: host.to_string(),
            path: req.uri().path().to_string(),
        };
        debug!(peer = %conn.peer, error = %e, "404");
        return Ok(e.into_response());
    };
    let (r, state) = snapshot.route(route);
    let grant = match &state.auth {
        None => None,
        Some(auth) => match authenticate(auth, &conn, &mut req).await {
            Ok(g) => Some(g),
            Err(refusal) => {
                let wants_ws = ws::wants_websocket(&req);
                info!(
                    peer = %conn.peer,
                    route = %r.name,
                    path = req.uri().path(),
                    auth = refusal.reason.label(),
                    status = refusal.status.as_u16(),
                    "refused: {}",
                    refusal.description
                );
                if wants_ws {
                    state.stats.upgrade(Outcome::Rejected, Default::default());
                }
                return Ok(refusal_response(refusal));
            }
        },
    };
    let host = request_host(req.uri(), req.headers()).unwrap_or("");
    if ws::wants_websocket(&req) {
        let h2 = ws::is_h2_websocket(&req);
        let stats = &state.stats;
        if h2 {
            stats.http2_upgrades.fetch_add(1, Ordering::Relaxed);
        }
        let started = tokio::time::Instant::now();
        let span = ws_span(&conn, host, req.uri().path(), r, h2);
        let resp = match admit(r, stats, &conn, req.headers(), grant) {
            Err(e) => Err(e),
            Ok(a) => match &state.hub {
                Some(hub) => {
                    crate::fanout::accept(&shared.life, &conn, hub, a, req)
                        .instrument(span)
                        .await
                }
                None => {
                    let client = Client::Hyper(hyper::upgrade::on(&mut req));
                    upgrade(&shared, &conn, &snapshot, a, &state.retired, &req, client)
                        .instrument(span)
                        .await
                        .map(|s| s.response)
                }
            },
        };
        return Ok(answered(stats, &conn, resp, h2, started));
    }
    req.extensions_mut().insert(Matched {
        snapshot: snapshot.clone(),
        route,
        conn,
    });
    tower::ServiceExt::oneshot(http, req).await
}

/// Where a spliced session's client socket comes from.
pub(crate) enum Client {
    /// hyper's connection: the session waits for hyper's upgrade, in its own task.
    Hyper(hyper::upgrade::OnUpgrade),
    /// The direct path owns the socket: the session is handed back to run there.
    Direct,
}

/// The answer to a WebSocket upgrade, and the session to run when it is a
/// yes on the direct path.
pub(crate) struct Switched {
    pub(crate) response: Response<Body>,
    pub(crate) session: Option<Box<crate::session::Pending>>,
    /// The direct path's 101 as the backend wrote it (`response` then only
    /// counts it): written to the client as it came.
    pub(crate) head: Option<bytes::BytesMut>,
}

/// The span a WebSocket upgrade runs in.
fn ws_span(conn: &ConnInfo, host: &str, path: &str, r: &Route, h2: bool) -> tracing::Span {
    tracing::info_span!(
        "ws",
        peer = %conn.peer,
        host,
        path,
        route = %r.name,
        http = if h2 { "2" } else { "1.1" }
    )
}

/// A WebSocket request's `Origin` and the route's limits: its place under
/// them, or why it has none.
fn admit<'a>(
    r: &'a Route,
    stats: &'a Arc<crate::metrics::RouteStats>,
    conn: &ConnInfo,
    headers: &HeaderMap,
    grant: Option<crate::auth::Grant>,
) -> Result<Admitted<'a>, ProxyError> {
    if !origin_ok(r, headers) {
        let o = headers.get(header::ORIGIN).map(|o| {
            let o = String::from_utf8_lossy(o.as_bytes());
            o.chars().take(200).collect::<String>()
        });
        return Err(ProxyError::Origin(o.unwrap_or_default()));
    }
    let admission = crate::limits::admit(stats, r.limits, conn.peer.ip(), &r.name)?;
    Ok(Admitted {
        route: r,
        stats,
        admission,
        auth: grant.map(|g| Authenticated {
            who: g.who,
            expires: g.expires,
            token_protocol: g.token_protocol,
        }),
    })
}

/// Counts a WebSocket upgrade's outcome and turns a refusal into its answer.
fn answered(
    stats: &crate::metrics::RouteStats,
    conn: &ConnInfo,
    resp: Result<Response<Body>, ProxyError>,
    h2: bool,
    started: tokio::time::Instant,
) -> Response<Body> {
    let outcome = match &resp {
        Ok(r) if r.status() == StatusCode::SWITCHING_PROTOCOLS => Outcome::Ok,
        Ok(r) if h2 && r.status() == StatusCode::OK => Outcome::Ok,
        Ok(_) => Outcome::Refused,
        Err(ProxyError::RouteFull { .. } | ProxyError::ChannelLimit { .. }) => Outcome::Rejected,
        Err(e) if e.status().is_client_error() => Outcome::Rejected,
        Err(_) => Outcome::Failed,
    };
    let resp = resp.unwrap_or_else(|e| {
        debug!(peer = %conn.peer, error = %e, "upgrade refused");
        e.into_response()
    });
    stats.upgrade(outcome, started.elapsed());
    resp
}

/// Checks the route's `auth:` and, when it lets the request on, applies
/// what it grants (headers set from claims, the token's query parameter or
/// subprotocol taken out).
async fn authenticate(
    auth: &crate::auth::RouteAuth,
    conn: &ConnInfo,
    req: &mut Request<Incoming>,
) -> Result<crate::auth::Grant, crate::auth::Refusal> {
    let grant = auth
        .check(&crate::auth::Ask {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            host: request_host(req.uri(), req.headers()),
            peer: conn.peer,
            proto: if conn.tls { "https" } else { "http" },
        })
        .await?;
    crate::auth::apply(req, &grant);
    Ok(grant)
}

/// The answer to a refused request: 401/403 with `WWW-Authenticate`, or
/// what the forward-auth service answered.
fn refusal_response(r: crate::auth::Refusal) -> Response<Body> {
    let mut resp = match r.body {
        Some(body) => {
            let mut resp = Response::new(crate::error::full(body));
            *resp.status_mut() = r.status;
            resp
        }
        None => crate::error::text_response(r.status, format!("{}\n", r.description)),
    };
    for (name, value) in r.headers.iter() {
        resp.headers_mut().append(name.clone(), value.clone());
    }
    resp
}

/// Whether the route lets the request's `Origin` (if any) open a WebSocket.
fn origin_ok(r: &crate::config::RouteConfig, headers: &HeaderMap) -> bool {
    let (Some(allowed), Some(origin)) = (&r.origins, headers.get(header::ORIGIN)) else {
        return true;
    };
    origin
        .to_str()
        .is_ok_and(|o| crate::config::origin::allowed(allowed, o))
}

/// The request's key for `balance: hash`; `None` (a missing header, cookie
/// or parameter, or another strategy) lets the pool use its round robin.
fn hash_key(pool: &Pool, conn: &ConnInfo, headers: &HeaderMap, uri: &Uri) -> Option<u64> {
    use crate::backend::balance::fnv1a;
    match pool.hash_key.as_ref()? {
        HashKey::Ip => Some(match conn.peer.ip() {
            std::net::IpAddr::V4(a) => fnv1a(&a.octets()),
            std::net::IpAddr::V6(a) => fnv1a(&a.octets()),
        }),
        HashKey::Header(name) => headers.get(name).map(|v| fnv1a(v.as_bytes())),
        HashKey::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(';'))
            .find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name).then(|| fnv1a(v.as_bytes()))
            }),
        HashKey::Query(name) => ws::query_values(uri, name)
            .next()
            .map(|v| fnv1a(v.as_bytes())),
    }
}

/// The request target sent to a backend: `base` + the route's (optionally
/// stripped) path + the query.
enum BackendPath<'u> {
    /// No base path, nothing stripped: the client's own target, borrowed
    /// (no allocation on the usual route).
    Client(&'u PathAndQuery),
    /// Rewritten.
    Built(PathAndQuery),
}

impl BackendPath<'_> {
    fn as_str(&self) -> &str {
        match self {
            BackendPath::Client(p) => p.as_str(),
            BackendPath::Built(p) => p.as_str(),
        }
    }
    fn into_path_and_query(self) -> PathAndQuery {
        match self {
            BackendPath::Client(p) => p.clone(),
            BackendPath::Built(p) => p,
        }
    }
}

fn backend_path<'u>(
    route: &Route,
    backend: &Backend,
    uri: &'u Uri,
) -> Result<BackendPath<'u>, http::Error> {
    let strip = route.strip_prefix.then_some(route.path.as_str());
    target(strip, &backend.url.base_path, uri)
}

/// [`backend_path`]: `strip` is the route's path when it strips it.
fn target<'u>(
    strip: Option<&str>,
    base: &str,
    uri: &'u Uri,
) -> Result<BackendPath<'u>, http::Error> {
    if strip.is_none() && base.is_empty() {
        // (A target not starting with `/` is rebuilt as below, which adds it.)
        if let Some(pq) = uri.path_and_query().filter(|p| p.as_str().starts_with('/')) {
            return Ok(BackendPath::Client(pq));
        }
    }
    let path = match strip {
        Some(prefix) => router::strip(prefix, uri.path()),
        None => uri.path(),
    };
    let mut s =
        String::with_capacity(base.len() + path.len() + 1 + uri.query().map_or(0, str::len));
    s.push_str(base);
    s.push_str(path);
    if let Some(q) = uri.query() {
        s.push('?');
        s.push_str(q);
    }
    Ok(BackendPath::Built(PathAndQuery::try_from(s)?))
}

/// Headers for the backend: the client's end-to-end headers plus `Forwarded` and friends.
fn forward_headers(src: &HeaderMap, conn: &ConnInfo, host: Option<&str>) -> HeaderMap {
    let mut h = src.clone();
    ws::strip_hop_by_hop(&mut h);
    ws::add_forwarded(
        &mut h,
        Forwarded {
            peer: conn.peer,
            tls: conn.tls,
            host,
        },
    );
    h
}

fn set_host(h: &mut HeaderMap, route: &Route, client_host: Option<&str>, backend: &Backend) {
    if let Some(v) =
        host_for(route, client_host, backend).and_then(|v| HeaderValue::from_str(v).ok())
    {
        h.insert(header::HOST, v);
    }
}

/// The backend's `Host`: the client's with `preserve_host` (when it is a
/// valid value), else the backend's authority.
fn host_for<'a>(
    route: &Route,
    client_host: Option<&'a str>,
    backend: &'a Backend,
) -> Option<&'a str> {
    let valid = |v: &&str| ws::value_ok(v.as_bytes());
    client_host
        .filter(|_| route.preserve_host)
        .filter(valid)
        .or_else(|| Some(backend.authority.as_str()).filter(valid))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client's target is sent as it is only where rebuilding it would
    /// give the same bytes.
    #[test]
    fn a_borrowed_backend_path_is_what_rebuilding_gives() {
        for u in [
            "/",
            "/chat",
            "/chat/x?room=1&a=%20b",
            "/?",
            "http://h:1/p?q",
            "http://h:1",
            "*",
        ] {
            let uri: Uri = u.parse().expect("uri");
            for strip in [None, Some("/chat")] {
                for base in ["", "/api"] {
                    let got = target(strip, base, &uri).expect("path");
                    let path = strip.map_or(uri.path(), |p| router::strip(p, uri.path()));
                    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
                    assert_eq!(
                        got.as_str(),
                        format!("{base}{path}{query}"),
                        "{u} {strip:?} {base}"
                    );
                    let borrowed = matches!(got, BackendPath::Client(_));
                    assert_eq!(
                        borrowed,
                        strip.is_none() && base.is_empty() && u != "*",
                        "{u}"
                    );
                }
            }
        }
    }
}
