//! Plain HTTP on a route: the request carries the routing decision into the
//! tower stack, then goes to the pool's pooled hyper client, with failover
//! for requests without a body.

use std::convert::Infallible;

use http::uri::Uri;
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::warn;

use super::{
    backend_path, forward_headers, hash_key, request_host, set_host, BackendPath, Matched,
};
use crate::backend::{pool, BackendError, Pool};
use crate::error::{Body, ProxyError};
use crate::router::Route;
use crate::session::conn::ConnInfo;
use crate::ws;

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
            .map(BackendPath::into_path_and_query)
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
            Err(e) if crate::backend::upstream::chain_is_local(&e) => {
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
    Err(ProxyError::exhausted(pool, tried, last))
}
