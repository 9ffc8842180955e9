//! The request path: route, then either a WebSocket upgrade spliced to a
//! backend or a plain HTTP request proxied with connection reuse.

use std::convert::Infallible;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::{debug, info, warn, Instrument};

use crate::config::{HashKey, OnBackendDown};
use crate::conn::ConnInfo;
use crate::error::{BackendError, Body, ProxyError};
use crate::metrics::Outcome;
use crate::pool::{self, Backend, BackendGuard, Pool};
use crate::router::{self, Route};
use crate::state::{Shared, Snapshot};
use crate::ws::{self, Forwarded};
use std::sync::atomic::Ordering;

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
    if ws::wants_websocket(&req) {
        let h2 = ws::is_h2_websocket(&req);
        let r = &snapshot.routes.routes()[route];
        let stats = &snapshot.route_stats[route];
        if h2 {
            stats.http2_upgrades.fetch_add(1, Ordering::Relaxed);
        }
        let started = tokio::time::Instant::now();
        let span = tracing::info_span!(
            "ws",
            peer = %conn.peer,
            host,
            path = req.uri().path(),
            route = %r.name,
            http = if h2 { "2" } else { "1.1" }
        );
        let admitted = if origin_ok(r, req.headers()) {
            crate::limits::admit(stats, r.limits, conn.peer.ip(), &r.name)
        } else {
            let o = req.headers().get(header::ORIGIN).map(|o| {
                let o = String::from_utf8_lossy(o.as_bytes());
                o.chars().take(200).collect::<String>()
            });
            Err(ProxyError::Origin(o.unwrap_or_default()))
        };
        let resp = match (admitted, &snapshot.hubs[route]) {
            (Err(e), _) => Err(e),
            (Ok(admission), Some(hub)) => {
                crate::fanout::accept(&shared.life, &conn, hub, (r, stats, admission), req)
                    .instrument(span)
                    .await
            }
            (Ok(admission), None) => {
                upgrade(&shared, &conn, &snapshot, (route, admission), req)
                    .instrument(span)
                    .await
            }
        };
        let outcome = match &resp {
            Ok(r) if r.status() == StatusCode::SWITCHING_PROTOCOLS => Outcome::Ok,
            Ok(r) if h2 && r.status() == StatusCode::OK => Outcome::Ok,
            Ok(_) => Outcome::Refused,
            Err(ProxyError::RouteFull { .. } | ProxyError::ChannelLimit { .. }) => {
                Outcome::Rejected
            }
            Err(e) if e.status().is_client_error() => Outcome::Rejected,
            Err(_) => Outcome::Failed,
        };
        let resp = resp.unwrap_or_else(|e| {
            debug!(peer = %conn.peer, error = %e, "upgrade refused");
            e.into_response()
        });
        stats.upgrade(outcome, started.elapsed());
        return Ok(resp);
    }
    req.extensions_mut().insert(Matched {
        snapshot: snapshot.clone(),
        route,
        conn,
    });
    tower::ServiceExt::oneshot(http, req).await
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
    use crate::balance::fnv1a;
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

/// `base` + the route's (optionally stripped) path + the query.
fn backend_path(route: &Route, backend: &Backend, uri: &Uri) -> Result<PathAndQuery, http::Error> {
    let path = if route.strip_prefix {
        router::strip(&route.path, uri.path())
    } else {
        uri.path()
    };
    let mut s = String::with_capacity(
        backend.url.base_path.len() + path.len() + 1 + uri.query().map_or(0, str::len),
    );
    s.push_str(&backend.url.base_path);
    s.push_str(path);
    if let Some(q) = uri.query() {
        s.push('?');
        s.push_str(q);
    }
    Ok(PathAndQuery::try_from(s)?)
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
    let value = match client_host {
        Some(c) if route.preserve_host => HeaderValue::from_str(c).ok(),
        _ => None,
    };
    let value = value.or_else(|| HeaderValue::from_str(backend.authority.as_str()).ok());
    if let Some(v) = value {
        h.insert(header::HOST, v);
    }
}

/// `index` is the matched route's place in the snapshot's table; the
/// session keeps `admission` for its life.
async fn upgrade(
    shared: &Arc<Shared>,
    conn: &Arc<ConnInfo>,
    snapshot: &Snapshot,
    (index, admission): (usize, crate::limits::Admission),
    mut req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    ws::validate(&req)?;
    let route = &snapshot.routes.routes()[index];
    let stats = &snapshot.route_stats[index];
    let pool = &snapshot.pools[route.pool];
    let client_upgrade = hyper::upgrade::on(&mut req);
    let client_host = request_host(req.uri(), req.headers());
    let mut headers = forward_headers(req.headers(), conn, client_host);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    // An HTTP/2 client (RFC 8441) sends no key: the gateway is the
    // WebSocket client of the backend leg, and checks the answer itself.
    let own_key = ws::is_h2_websocket(&req).then(ws::new_key);
    if let Some(k) = own_key
        .as_deref()
        .and_then(|k| HeaderValue::from_str(k).ok())
    {
        headers.insert(header::SEC_WEBSOCKET_KEY, k);
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
    }
    let settings = &snapshot.settings;

    let key = hash_key(pool, conn, req.headers(), req.uri());
    let mut tried = 0;
    let mut last = None;
    for backend in pool.try_order(key).take(pool.max_attempts) {
        let backend = &backend;
        if tried > 0 {
            stats.failovers.fetch_add(1, Ordering::Relaxed);
        }
        tried += 1;
        set_host(&mut headers, route, client_host, backend);
        let pq = backend_path(route, backend, req.uri())
            .map_err(|_| ProxyError::Backend(BackendError::Protocol("invalid backend path")))?;
        let head = crate::upgrade::request_head(&pq, &headers);
        let attempt = async {
            let mut io = pool.connect(backend).await?;
            let answer = crate::upgrade::exchange(
                &mut io,
                &head,
                settings.handshake_timeout,
                settings.max_header_bytes,
            )
            .await?;
            Ok::<_, BackendError>((io, answer))
        };
        match attempt.await {
            Ok((io, answer)) => {
                crate::upstream::keepalive(io.tcp().into(), settings.tcp_keepalive);
                // A 5xx answer to the upgrade counts against the backend (it is still relayed).
                pool.note_outcome(backend, !answer.status.is_server_error());
                let mut headers = answer.headers;
                if own_key.is_some() && answer.status.is_success() {
                    // A 2xx would tell an HTTP/2 client its WebSocket is open.
                    warn!(backend = %backend.url, status = answer.status.as_u16(), "backend answered the upgrade without switching");
                    return Err(ProxyError::Backend(BackendError::Protocol(
                        "the backend answered the WebSocket upgrade without switching protocols",
                    )));
                }
                if answer.status != StatusCode::SWITCHING_PROTOCOLS {
                    info!(backend = %backend.url, status = answer.status.as_u16(), "backend refused the upgrade");
                    ws::strip_hop_by_hop(&mut headers);
                    headers.remove(header::CONTENT_LENGTH);
                    let mut out = Response::new(crate::error::full(answer.rest));
                    *out.status_mut() = answer.status;
                    out.headers_mut().extend(headers);
                    return Ok(out);
                }
                let guard = BackendGuard::new(backend.clone());
                let down =
                    (pool.on_backend_down == OnBackendDown::Close).then(|| backend.down_token());
                crate::session::spawn(
                    &shared.life,
                    conn.busy(),
                    client_upgrade,
                    (io, answer.rest),
                    guard,
                    crate::session::Ends {
                        backend_down: down,
                        route_retired: snapshot.route_tokens[index].clone(),
                        stats: crate::metrics::SessionGuard::new(stats.clone()),
                        admission,
                    },
                    settings.half_close_timeout,
                );
                let mut out = Response::new(crate::error::empty());
                match own_key {
                    None => *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS,
                    Some(k) => {
                        let want = tokio_tungstenite::tungstenite::handshake::derive_accept_key(
                            k.as_bytes(),
                        );
                        if headers
                            .get(header::SEC_WEBSOCKET_ACCEPT)
                            .is_none_or(|a| a.as_bytes() != want.as_bytes())
                        {
                            return Err(ProxyError::Backend(BackendError::Protocol(
                                "the backend's Sec-WebSocket-Accept does not match",
                            )));
                        }
                        // HTTP/2: `200` opens the stream; no connection-level headers.
                        ws::strip_hop_by_hop(&mut headers);
                        headers.remove(header::SEC_WEBSOCKET_ACCEPT);
                        headers.remove(header::CONTENT_LENGTH);
                        *out.status_mut() = StatusCode::OK;
                    }
                }
                *out.headers_mut() = headers;
                return Ok(out);
            }
            Err(e) if e.is_local() => {
                warn!(error = %e, "out of local resources: the upgrade fails, the backend is not blamed");
                return Err(ProxyError::Local(e));
            }
            Err(e) => {
                warn!(backend = %backend.url, failure = e.kind(), error = %e, "backend failed, trying the next");
                pool.note_outcome(backend, false);
                last = Some(e);
            }
        }
    }
    Err(pool.exhausted(tried, last))
}

/// The plain-HTTP proxy, run inside the tower middleware stack.
pub async fn proxy_http(mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let Some(m) = req.extensions_mut().remove::<Matched>() else {
        return Ok(crate::error::text_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "request was not routed\n".into(),
        ));
    };
    let route = &m.snapshot.routes.routes()[m.route];
    let pool = m.snapshot.pools[route.pool].clone();
    Ok(forward(&pool, route, &m.conn, req)
        .await
        .unwrap_or_else(|e| {
            warn!(route = %route.name, error = %e, "proxy error");
            e.into_response()
        }))
}

async fn forward(
    pool: &Pool,
    route: &Route,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let (parts, body) = req.into_parts();
    let client_host = request_host(&parts.uri, &parts.headers).map(str::to_string);
    let mut headers = forward_headers(&parts.headers, conn, client_host.as_deref());
    // A request without a body can be sent again to the next backend if the first is unreachable.
    let retryable = hyper::body::Body::is_end_stream(&body);
    let mut body = Some(body.map_err(Into::into).boxed_unsync());
    let mut tried = 0;
    let mut last = None;
    let key = hash_key(pool, conn, &parts.headers, &parts.uri);
    for backend in pool.try_order(key).take(pool.max_attempts) {
        let backend = &backend;
        let Some(b) = body.take() else { break };
        tried += 1;
        set_host(&mut headers, route, client_host.as_deref(), backend);
        let pq = backend_path(route, backend, &parts.uri)
            .map_err(|_| ProxyError::Backend(BackendError::Protocol("invalid backend path")))?;
        let uri = Uri::builder()
            .scheme(pool::http_scheme(backend))
            .authority(backend.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|_| ProxyError::Backend(BackendError::Protocol("invalid backend URI")))?;
        let mut out = Request::new(b);
        *out.method_mut() = parts.method.clone();
        *out.uri_mut() = uri;
        *out.version_mut() = Version::HTTP_11;
        *out.headers_mut() = headers.clone();
        match pool.http.request(out).await {
            Ok(mut resp) => {
                pool.note_outcome(backend, true);
                ws::strip_hop_by_hop(resp.headers_mut());
                return Ok(resp.map(|b| b.map_err(Into::into).boxed_unsync()));
            }
            Err(e) if crate::upstream::chain_is_local(&e) => {
                warn!(error = %e, "out of local resources: the request fails, the backend is not blamed");
                return Err(ProxyError::Local(BackendError::Client(e)));
            }
            Err(e) if e.is_connect() && retryable => {
                warn!(backend = %backend.url, error = %e, "backend unreachable, trying the next");
                pool.note_outcome(backend, false);
                body = Some(crate::error::empty());
                last = Some(BackendError::Client(e));
            }
            Err(e) => {
                if e.is_connect() {
                    pool.note_outcome(backend, false);
                }
                let err = BackendError::Client(e);
                return Err(if tried == 1 && last.is_none() {
                    ProxyError::Backend(err)
                } else {
                    ProxyError::NoBackend {
                        pool: pool.name.clone(),
                        tried,
                        last: err,
                    }
                });
            }
        }
    }
    Err(pool.exhausted(tried, last))
}
