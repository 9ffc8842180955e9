//! A WebSocket upgrade on a splice route: the pool's failover order, for
//! each backend a connect and the upgrade exchange before anything is
//! answered, then the backend's answer to the client and the session.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::StatusCode;
use http::{Request, Response};
use std::sync::atomic::Ordering;
use tracing::{info, warn};

use super::{backend_path, forward_headers, hash_key, host_for, request_host, set_host};
use super::{Client, Switched};
use crate::backend::BackendError;
use crate::backend::BackendGuard;
use crate::config::OnBackendDown;
use crate::error::ProxyError;
use crate::session::conn::ConnInfo;
use crate::session::{Admitted, Pending};
use crate::state::{Shared, Snapshot};
use crate::ws;
use tokio_util::sync::CancellationToken;

/// The session keeps `admitted.admission` for its life and ends when
/// `retired` is cancelled (the route removed by a reload, drain over).
///
/// Not an `async fn`, as the callers up to the connection's first request:
/// one keeps each argument twice in its future (as passed, and moved into
/// the body), and an upgrade's future is moved by value as it starts (see
/// `docs/performance.md`, eighth pass).
#[allow(clippy::manual_async_fn)] // on purpose: see `proxy::upgrade::upgrade`
pub(super) fn upgrade<'a, B: 'a>(
    shared: &'a Arc<Shared>,
    conn: &'a Arc<ConnInfo>,
    snapshot: &'a Snapshot,
    admitted: Admitted<'a>,
    retired: &'a CancellationToken,
    req: &'a Request<B>,
    client: Client,
) -> impl std::future::Future<Output = Result<Switched, ProxyError>> + 'a {
    async move {
        if matches!(client, Client::Hyper(_)) {
            // (The direct path takes only requests that passed.)
            ws::validate(req)?;
        }
        let Admitted {
            route,
            stats,
            admission,
            auth,
        } = admitted;
        let auth = auth.unwrap_or_default();
        let pool = &snapshot.pools[route.pool];
        let client_host = request_host(req.uri(), req.headers());
        // The direct path's splice writes the backend's head straight from the
        // client's headers: no copy of the map.
        let write_direct = matches!(client, Client::Direct) && route.frames.is_none();
        let mut headers = if write_direct {
            http::HeaderMap::new() // the head is written from the client's map below
        } else {
            let mut h = forward_headers(req.headers(), conn, client_host);
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h
        };
        // A frames route: upgate is the backend's WebSocket client (no
        // extension on that leg) and the client's server (compression, if the
        // route allows it and the client offers it).
        let client_deflate = match &route.frames {
            Some(f) => {
                headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
                f.compression
                    .then(|| crate::ws::deflate::negotiate(req.headers()))
                    .flatten()
            }
            None => None,
        };
        // An HTTP/2 client (RFC 8441) sends no key: the gateway is the
        // WebSocket client of the backend leg, and checks the answer itself.
        let own_key = ws::is_h2_websocket(req).then(ws::new_key);
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
            let pq = backend_path(route, backend, req.uri())
                .map_err(|_| ProxyError::Backend(BackendError::Protocol("invalid backend path")))?;
            let head = match write_direct {
                true => ws::upgrade_request_head(
                    pq.as_str(),
                    req.headers(),
                    ws::Forwarded {
                        peer: conn.peer,
                        tls: conn.tls,
                        host: client_host,
                    },
                    host_for(route, client_host, backend),
                ),
                false => {
                    set_host(&mut headers, route, client_host, backend);
                    crate::backend::upgrade::request_head(pq.as_str(), &headers)
                }
            };
            let attempt = async {
                // The head goes out with the connect where it can.
                let (mut io, sent) = pool.connect_sending(backend, &head).await?;
                let answer = crate::backend::upgrade::exchange_with(
                    &mut io,
                    head.get(sent..).unwrap_or_default(),
                    settings.handshake_timeout,
                    settings.max_header_bytes,
                    write_direct,
                )
                .await?;
                Ok::<_, BackendError>((io, answer))
            };
            let sent = &headers;
            match attempt.await {
                Ok((io, answer)) => {
                    crate::backend::upstream::keepalive(io.tcp().into(), settings.tcp_keepalive);
                    // A 5xx answer to the upgrade counts against the backend (it is still relayed).
                    pool.note_outcome(backend, !answer.status.is_server_error());
                    let mut headers = answer.headers;
                    // The direct path's 101, relayed as the backend wrote it.
                    let raw_101 = answer.head;
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
                        return Ok(Switched {
                            response: out,
                            session: None,
                            head: None,
                        });
                    }
                    let guard = BackendGuard::new(backend.clone());
                    let down = (pool.on_backend_down == OnBackendDown::Close)
                        .then(|| backend.down_token());
                    let ends = crate::session::Ends {
                        backend_down: down,
                        route_retired: retired.clone(),
                        stats: crate::metrics::SessionGuard::new(stats.clone()),
                        admission,
                        expires: auth.expires,
                        who: auth.who,
                        rebalance_close: route.rebalance_close,
                        access: crate::session::Access::new(
                            &route.name,
                            client_host.unwrap_or_default(),
                            req.uri().path(),
                            if ws::is_h2_websocket(req) { "2" } else { "1.1" },
                        ),
                    };
                    let mut session = None;
                    match (&route.frames, client) {
                        (None, client) => {
                            let pending = Pending::new(
                                conn.busy(),
                                (io, answer.rest),
                                guard,
                                ends,
                                settings.half_close_timeout,
                            );
                            match client {
                                Client::Hyper(on) => pending.spawn(&shared.life, on),
                                Client::Direct => session = Some(pending),
                            }
                        }
                        (Some(_), Client::Direct) => {
                            return Err(ProxyError::Internal(
                                "a frames route reached the direct upgrade path",
                            ))
                        }
                        (Some(cfg), Client::Hyper(client_upgrade)) => {
                            let redial = redial(
                                pool,
                                route,
                                sent,
                                req.uri(),
                                client_host,
                                key,
                                headers.get(header::SEC_WEBSOCKET_PROTOCOL).cloned(),
                                settings,
                            );
                            crate::frames::spawn(
                                &shared.life,
                                conn.busy(),
                                client_upgrade,
                                (io, answer.rest),
                                guard,
                                ends,
                                cfg.clone(),
                                redial,
                                client_deflate.is_some(),
                            );
                            if let Some(ext) = client_deflate {
                                headers.insert(
                                    header::SEC_WEBSOCKET_EXTENSIONS,
                                    HeaderValue::from_static(ext),
                                );
                            }
                        }
                    }
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
                    if let Some(p) = auth.token_protocol {
                        // The backend selected none: select the token's entry (a
                        // browser that offered protocols fails an answer without one).
                        if !headers.contains_key(header::SEC_WEBSOCKET_PROTOCOL) {
                            if let Ok(v) = HeaderValue::from_str(&p) {
                                headers.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
                            }
                        }
                    }
                    *out.headers_mut() = headers;
                    return Ok(Switched {
                        response: out,
                        session,
                        head: raw_101,
                    });
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
        Err(ProxyError::exhausted(pool, tried, last))
    }
}

/// How a frames session on `route` dials a backend again (`resume`): the
/// same request, with a new key and the new backend's `Host` and path.
#[allow(clippy::too_many_arguments)]
fn redial(
    pool: &Arc<crate::backend::pool::Pool>,
    route: &crate::config::RouteConfig,
    headers: &http::HeaderMap,
    uri: &http::Uri,
    client_host: Option<&str>,
    key: Option<u64>,
    protocol: Option<HeaderValue>,
    settings: &crate::config::ServerSettings,
) -> crate::frames::Redial {
    // Every live session holds this: the head is rendered once, but for the
    // parts that depend on the backend (its base path and, without
    // `preserve_host`, its authority) and the key. Rendering also copies the
    // header values, which are slices of the client connection's whole
    // read buffer (8 KiB) a clone would keep alive.
    let path = if route.strip_prefix {
        crate::router::strip(&route.path, uri.path())
    } else {
        uri.path()
    };
    let rest: Box<str> = match uri.query() {
        Some(q) => format!("{path}?{q}").into(),
        None => path.into(),
    };
    let host: Option<Box<str>> = client_host
        .filter(|h| route.preserve_host && HeaderValue::from_str(h).is_ok())
        .map(Into::into);
    let mut block = Vec::with_capacity(headers.len() * 48 + 32);
    for (name, value) in headers {
        if name == header::HOST
            || name == header::SEC_WEBSOCKET_KEY
            || name == header::SEC_WEBSOCKET_VERSION
        {
            continue;
        }
        block.extend_from_slice(name.as_str().as_bytes());
        block.extend_from_slice(b": ");
        block.extend_from_slice(value.as_bytes());
        block.extend_from_slice(b"\r\n");
    }
    block.extend_from_slice(b"sec-websocket-version: 13\r\n");
    let block: Box<[u8]> = block.into();
    let protocol = protocol.and_then(|p| HeaderValue::from_bytes(p.as_bytes()).ok());
    crate::frames::Redial {
        pool: pool.clone(),
        head: Box::new(move |backend, key| {
            let base = &backend.url.base_path;
            let pq = http::uri::PathAndQuery::try_from(format!("{base}{rest}")).ok()?;
            let host = host.as_deref().unwrap_or(backend.authority.as_str());
            let mut out = Vec::with_capacity(block.len() + pq.as_str().len() + host.len() + 96);
            out.extend_from_slice(b"GET ");
            out.extend_from_slice(pq.as_str().as_bytes());
            out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
            out.extend_from_slice(host.as_bytes());
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&block);
            out.extend_from_slice(b"sec-websocket-key: ");
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
            Some(out)
        }),
        hash_key: key,
        protocol,
        handshake_timeout: settings.handshake_timeout,
        max_header_bytes: settings.max_header_bytes,
        tcp_keepalive: settings.tcp_keepalive,
    }
}
