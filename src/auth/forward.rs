//! Forward auth: a service of the user's decides (Traefik's ForwardAuth,
//! nginx's `auth_request`).
//!
//! upgate sends `GET url` with the original request described in
//! `X-Forwarded-Method`, `X-Forwarded-Uri`, `X-Forwarded-Host`,
//! `X-Forwarded-For` and `X-Forwarded-Proto`, plus the request's
//! `request_headers` (Cookie and Authorization by default). A 2xx lets the
//! request on, with the answer's `copy_headers` set on it; any other status
//! goes back to the client with its body (up to 16 KiB) and
//! `WWW-Authenticate`/`Location`. A timeout or an unreachable service is a
//! 503 (fail closed) unless `fail_open`. Connections to the service are
//! reused; decisions may be cached per credential for `cache`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tracing::warn;

use super::{Ask, AuthError, Refusal};
use crate::backend::connector::PoolConnector;
use crate::backend::{Body, Pool};
use crate::config::auth::{ForwardConfig, ForwardTarget};
use crate::metrics::{AuthReason, RouteStats};

/// Largest body of a refusal relayed to the client.
const MAX_BODY: usize = 16 * 1024;
/// Most cached decisions per route; beyond it the oldest half is dropped.
const MAX_CACHED: usize = 10_000;

pub struct Forward {
    cfg: ForwardConfig,
    via: Via,
    request_headers: Vec<HeaderName>,
    copy_headers: Vec<HeaderName>,
    /// Credential (a keyed hash of the forwarded headers' values) →
    /// decision and when it was made. SipHash with a per-process random
    /// key: a client cannot craft a credential that collides with another's.
    cache: Mutex<HashMap<u64, (Instant, Decision)>>,
    hasher: std::hash::RandomState,
}

/// How the service is reached.
enum Via {
    Url(Box<Client<PoolConnector, Body>>, http::Uri),
    /// A pool of the config: its balancing, health and failover, and its
    /// pooled client; the path to ask.
    Pool(Arc<Pool>, String),
}

fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[derive(Clone)]
enum Decision {
    Allow(Vec<(HeaderName, HeaderValue)>),
    Deny(StatusCode, HeaderMap, Bytes),
}

impl Forward {
    pub fn new(
        route: &str,
        cfg: &ForwardConfig,
        pools: &[Arc<Pool>],
    ) -> Result<Forward, AuthError> {
        let via = match &cfg.target {
            ForwardTarget::Url(url) => {
                let tls = if url.scheme_str() == Some("https") {
                    let c = crate::tls::client_config(cfg.ca.as_deref()).map_err(|e| {
                        AuthError::Forward {
                            route: route.to_string(),
                            message: e.to_string(),
                        }
                    })?;
                    Some(tokio_rustls::TlsConnector::from(c))
                } else {
                    None
                };
                let client = Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(90))
                    .build(PoolConnector::new(tls, cfg.timeout));
                Via::Url(Box::new(client), url.clone())
            }
            ForwardTarget::Pool { pool, name, path } => {
                let p = pools.get(*pool).ok_or_else(|| AuthError::Forward {
                    route: route.to_string(),
                    message: format!("pool `{name}` is not built"),
                })?;
                Via::Pool(p.clone(), path.clone())
            }
        };
        let names = |list: &[String]| {
            list.iter()
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .collect::<Vec<_>>()
        };
        Ok(Forward {
            request_headers: names(&cfg.request_headers),
            copy_headers: names(&cfg.copy_headers),
            cfg: cfg.clone(),
            via,
            cache: Mutex::new(HashMap::new()),
            hasher: std::hash::RandomState::new(),
        })
    }

    /// The headers the service's answer may set: client copies never pass.
    pub fn owned_headers(&self) -> &[HeaderName] {
        &self.copy_headers
    }

    /// The cache key: the credential headers' values (never stored as text).
    fn credential(&self, headers: &HeaderMap) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = self.hasher.build_hasher();
        for name in &self.request_headers {
            h.write(name.as_str().as_bytes());
            for v in headers.get_all(name) {
                h.write(b"\0");
                h.write(v.as_bytes());
            }
            h.write(b"\n");
        }
        h.finish()
    }

    pub async fn check(
        &self,
        ask: &Ask<'_>,
        stats: &RouteStats,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, Refusal> {
        let key = (!self.cfg.cache.is_zero()).then(|| self.credential(ask.headers));
        if let Some(k) = key {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, d)) = cache.get(&k) {
                if at.elapsed() < self.cfg.cache {
                    stats
                        .auth
                        .forward_cache_hits
                        .fetch_add(1, Ordering::Relaxed);
                    return decided(d.clone());
                }
            }
        }
        let d = match tokio::time::timeout(self.cfg.timeout, self.ask(ask)).await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => return self.unavailable(&e),
            Err(_) => return self.unavailable("no answer in time"),
        };
        if let Some(k) = key {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= MAX_CACHED {
                let ttl = self.cfg.cache;
                cache.retain(|_, (at, _)| at.elapsed() < ttl);
                if cache.len() >= MAX_CACHED {
                    cache.clear();
                }
            }
            cache.insert(k, (Instant::now(), d.clone()));
        }
        decided(d)
    }

    fn unavailable(&self, why: &str) -> Result<Vec<(HeaderName, HeaderValue)>, Refusal> {
        warn!(target = %self.cfg.target, error = why, fail_open = self.cfg.fail_open, "forward auth unavailable");
        if self.cfg.fail_open {
            return Ok(Vec::new());
        }
        Err(Refusal {
            reason: AuthReason::Unavailable,
            status: StatusCode::SERVICE_UNAVAILABLE,
            description: "the authentication service is unavailable".into(),
            headers: Box::default(),
            body: None,
        })
    }

    async fn ask(&self, ask: &Ask<'_>) -> Result<Decision, String> {
        let mut h = HeaderMap::new();
        for name in &self.request_headers {
            for v in ask.headers.get_all(name) {
                h.append(name.clone(), v.clone());
            }
        }
        let mut set = |name: &'static str, v: &str| {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(HeaderName::from_static(name), v);
            }
        };
        set("x-forwarded-method", ask.method.as_str());
        set(
            "x-forwarded-uri",
            ask.uri.path_and_query().map_or("/", |p| p.as_str()),
        );
        set("x-forwarded-host", ask.host.unwrap_or(""));
        set("x-forwarded-for", &ask.peer.ip().to_string());
        set("x-forwarded-proto", ask.proto);
        let resp = self.send(h).await?;
        let status = resp.status();
        if status.is_success() {
            let set = self
                .copy_headers
                .iter()
                .flat_map(|n| {
                    resp.headers()
                        .get_all(n)
                        .iter()
                        .map(move |v| (n.clone(), v.clone()))
                })
                .collect();
            return Ok(Decision::Allow(set));
        }
        let mut headers = HeaderMap::new();
        for name in [
            http::header::WWW_AUTHENTICATE,
            http::header::LOCATION,
            http::header::CONTENT_TYPE,
            http::header::SET_COOKIE,
        ] {
            for v in resp.headers().get_all(&name) {
                headers.append(name.clone(), v.clone());
            }
        }
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok(Decision::Deny(status, headers, body))
    }
}

impl Forward {
    /// Sends the question: to the URL, or through the pool's failover order.
    async fn send(
        &self,
        headers: HeaderMap,
    ) -> Result<http::Response<hyper::body::Incoming>, String> {
        let request = |uri: http::Uri| {
            let mut req = http::Request::get(uri)
                .body(empty())
                .map_err(|e| e.to_string())?;
            *req.headers_mut() = headers.clone();
            Ok::<_, String>(req)
        };
        match &self.via {
            Via::Url(client, url) => client
                .request(request(url.clone())?)
                .await
                .map_err(|e| e.to_string()),
            Via::Pool(pool, path) => {
                let mut last = format!("no auth server of pool `{}` is available", pool.name);
                for backend in pool.try_order(None).take(pool.max_attempts) {
                    let uri = http::Uri::builder()
                        .scheme(crate::backend::connector::http_scheme(&backend))
                        .authority(backend.authority.clone())
                        .path_and_query(path.as_str())
                        .build()
                        .map_err(|e| e.to_string())?;
                    match pool.http.request(request(uri)?).await {
                        Ok(resp) => {
                            pool.note_outcome(&backend, !resp.status().is_server_error());
                            return Ok(resp);
                        }
                        Err(e) if e.is_connect() => {
                            pool.note_outcome(&backend, false);
                            last = format!("{}: {e}", backend.url);
                        }
                        Err(e) => return Err(e.to_string()),
                    }
                }
                Err(last)
            }
        }
    }
}

fn decided(d: Decision) -> Result<Vec<(HeaderName, HeaderValue)>, Refusal> {
    match d {
        Decision::Allow(set) => Ok(set),
        Decision::Deny(status, headers, body) => Err(Refusal {
            reason: AuthReason::Denied,
            status,
            description: format!("the authentication service answered {status}"),
            headers: Box::new(headers),
            body: Some(body),
        }),
    }
}
