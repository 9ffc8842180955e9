//! Who may connect: a route's `auth:`, checked before a byte reaches a
//! backend or a fan-out channel is joined.
//!
//! - [`jwt`]: tokens checked by upgate (signature, `exp`/`nbf`/`iss`/`aud`,
//!   required claims), found in the configured places (header, cookie,
//!   query parameter, an offered subprotocol `bearer.TOKEN`); keys from PEM
//!   files, JWKS files, JWKS URLs refreshed in the background
//!   ([`jwks`]), or an HMAC secret from the environment. Cryptography is
//!   `ring` through `jsonwebtoken`'s provider interface ([`crypto`]).
//! - [`forward`]: a service of the user's decides (2xx: go on), asked with
//!   the request's method, URI, host, client address and chosen headers.
//!
//! A check ends in a [`Grant`] (what to change in the request sent on, what
//! the access log says, when a live session's token expires) or a
//! [`Refusal`] (status, `WWW-Authenticate`, a reason counted per route).
//! The token itself is never logged or counted.

pub mod crypto;
pub mod forward;
pub mod jwks;
pub mod jwt;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode, Uri};

use crate::config::auth::AuthConfig;
use crate::metrics::{AuthReason, RouteStats};

/// A key or JWKS that could not be loaded: fails the (re)load that asked.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("line {line}: route `{route}`, auth key: {message}")]
    Key {
        route: String,
        line: usize,
        message: String,
    },
    #[error("route `{route}`, forward auth: {message}")]
    Forward { route: String, message: String },
}

/// A route's authentication, built with its snapshot.
pub struct RouteAuth {
    pub cfg: AuthConfig,
    jwt: Option<jwt::Jwt>,
    forward: Option<forward::Forward>,
    stats: Arc<RouteStats>,
    /// Ends the JWKS refreshers when this route's auth is replaced or dropped.
    stop: tokio_util::sync::CancellationToken,
    started: std::sync::atomic::AtomicBool,
}

impl Drop for RouteAuth {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What a successful check changes and tells.
#[derive(Debug, Default)]
pub struct Grant {
    /// The configured claim's value (`sub` by default), for the access log.
    pub who: Option<String>,
    /// When the token stops being valid (its `exp` plus leeway), if a live
    /// session must end then (`on_expiry: close`).
    pub expires: Option<SystemTime>,
    /// Headers upgate owns on this route: every client copy is removed,
    /// whether or not a value is set for it.
    pub remove: Vec<HeaderName>,
    /// Headers to set on the request sent on.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// A query parameter that carried the token, removed from the URI sent on.
    pub strip_query: Option<String>,
    /// The token came as the offered subprotocol `bearer.TOKEN`: removed
    /// from the offer sent on.
    pub strip_subprotocol: bool,
    /// That offered entry, to select in the answer when the backend selects
    /// none (a browser that offered protocols fails a handshake whose answer
    /// selects none).
    pub token_protocol: Option<String>,
}

/// Why a request may not go on, and how to say so.
#[derive(Debug)]
pub struct Refusal {
    pub reason: AuthReason,
    pub status: StatusCode,
    /// For `error_description` (RFC 6750) and the log; never contains the token.
    pub description: String,
    /// Headers to answer with (`WWW-Authenticate`, or the forward-auth service's).
    pub headers: Box<HeaderMap>,
    /// A forward-auth service's body (bounded), sent to the client as is.
    pub body: Option<bytes::Bytes>,
}

impl Refusal {
    /// 401 with `WWW-Authenticate: Bearer error="invalid_token"` (RFC 6750 §3).
    pub fn invalid_token(reason: AuthReason, description: impl Into<String>) -> Refusal {
        let description = description.into();
        let mut headers = HeaderMap::new();
        let challenge = if reason == AuthReason::Missing {
            // No token at all: the bare challenge, no error code (RFC 6750 §3.1).
            "Bearer".to_string()
        } else {
            format!(
                "Bearer error=\"invalid_token\", error_description=\"{}\"",
                description.replace(['"', '\\'], "'")
            )
        };
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            headers.insert(http::header::WWW_AUTHENTICATE, v);
        }
        Refusal {
            reason,
            status: StatusCode::UNAUTHORIZED,
            description,
            headers: Box::new(headers),
            body: None,
        }
    }

    /// 403 with `error="insufficient_scope"` for a valid token lacking a required claim.
    pub fn forbidden(description: String) -> Refusal {
        let mut r = Refusal::invalid_token(AuthReason::Forbidden, description);
        r.status = StatusCode::FORBIDDEN;
        if let Ok(v) = HeaderValue::from_str(&format!(
            "Bearer error=\"insufficient_scope\", error_description=\"{}\"",
            r.description.replace(['"', '\\'], "'")
        )) {
            r.headers.insert(http::header::WWW_AUTHENTICATE, v);
        }
        r
    }
}

/// What a check looks at.
pub struct Ask<'a> {
    pub method: &'a http::Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub host: Option<&'a str>,
    pub peer: SocketAddr,
    /// `http` or `https`: how the client reached upgate.
    pub proto: &'a str,
}

impl RouteAuth {
    /// Loads keys (files, environment) now; JWKS URLs are fetched by
    /// [`RouteAuth::start`].
    pub fn new(
        route: &str,
        cfg: &AuthConfig,
        stats: Arc<RouteStats>,
        pools: &[Arc<crate::backend::Pool>],
    ) -> Result<RouteAuth, AuthError> {
        crypto::install();
        let jwt = match &cfg.jwt {
            Some(j) => Some(jwt::Jwt::load(route, j)?),
            None => None,
        };
        let forward = match &cfg.forward {
            Some(f) => Some(forward::Forward::new(route, f, pools)?),
            None => None,
        };
        Ok(RouteAuth {
            cfg: cfg.clone(),
            jwt,
            forward,
            stats,
            stop: tokio_util::sync::CancellationToken::new(),
            started: Default::default(),
        })
    }

    /// Takes over the keys `old` fetched from the same JWKS URLs, so a
    /// reload does not leave a gap before the first fetch.
    pub fn carry_over(&self, old: &RouteAuth) {
        if let (Some(j), Some(o)) = (&self.jwt, &old.jwt) {
            j.carry_over(o);
        }
    }

    /// Starts the JWKS URL refreshers (once; later calls do nothing). They
    /// end when this value is dropped or the gateway stops.
    pub fn start(&self, life: &crate::lifecycle::Lifecycle) {
        if self
            .started
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let stop = self.stop.clone();
        // Refreshers end with this route's auth, or when shutdown begins.
        let (shutdown, s) = (life.shutdown.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => s.cancel(),
                _ = s.cancelled() => {}
            }
        });
        if let Some(j) = &self.jwt {
            j.start(life, &stop, &self.stats);
        }
    }

    /// Checks a request: JWT first (cheap, local), then the forward service.
    pub async fn check(&self, ask: &Ask<'_>) -> Result<Grant, Refusal> {
        let r = self.check_inner(ask).await;
        match &r {
            Ok(_) => {
                self.stats
                    .auth
                    .allowed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(refusal) => self.stats.auth.refused(refusal.reason),
        }
        r
    }

    async fn check_inner(&self, ask: &Ask<'_>) -> Result<Grant, Refusal> {
        let mut grant = match &self.jwt {
            Some(j) => j.check(ask.uri, ask.headers).await?,
            None => Grant::default(),
        };
        if let Some(f) = &self.forward {
            let set = f.check(ask, &self.stats).await?;
            grant.remove.extend_from_slice(f.owned_headers());
            grant.set.extend(set);
        }
        Ok(grant)
    }
}

/// Applies a grant to the request going on: client copies of the headers
/// upgate sets are removed (no spoofing), the token's query parameter and
/// subprotocol entry are taken out.
pub fn apply<B>(req: &mut http::Request<B>, grant: &Grant) {
    for name in grant.remove.iter().chain(grant.set.iter().map(|(n, _)| n)) {
        req.headers_mut().remove(name);
    }
    for (name, value) in &grant.set {
        req.headers_mut().append(name.clone(), value.clone());
    }
    if let Some(param) = &grant.strip_query {
        if let Some(uri) = without_query_param(req.uri(), param) {
            *req.uri_mut() = uri;
        }
    }
    if grant.strip_subprotocol {
        let offered: Vec<String> = req
            .headers()
            .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty() && !jwt::is_bearer_protocol(p))
            .map(str::to_string)
            .collect();
        req.headers_mut()
            .remove(http::header::SEC_WEBSOCKET_PROTOCOL);
        if let Ok(v) = HeaderValue::from_str(&offered.join(", ")) {
            if !offered.is_empty() {
                req.headers_mut()
                    .insert(http::header::SEC_WEBSOCKET_PROTOCOL, v);
            }
        }
    }
}

/// `uri` without every `param=…` of its query (`None` if it has none).
pub fn without_query_param(uri: &Uri, param: &str) -> Option<Uri> {
    let q = uri.query()?;
    let kept: Vec<&str> = q
        .split('&')
        .filter(|kv| kv.split_once('=').map_or(*kv, |(k, _)| k) != param)
        .collect();
    let pq = if kept.is_empty() {
        uri.path().to_string()
    } else {
        format!("{}?{}", uri.path(), kept.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// How long from now until `at` (zero if past).
pub fn until(at: SystemTime) -> Duration {
    at.duration_since(SystemTime::now()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_removed_and_the_rest_kept() {
        let u: Uri = "/chat?access_token=abc&room=1&access_token=x"
            .parse()
            .unwrap();
        assert_eq!(
            without_query_param(&u, "access_token").unwrap().to_string(),
            "/chat?room=1"
        );
        let u: Uri = "/chat?access_token=abc".parse().unwrap();
        assert_eq!(
            without_query_param(&u, "access_token").unwrap().to_string(),
            "/chat"
        );
        let u: Uri = "/chat?access_tokens=1".parse().unwrap();
        assert_eq!(
            without_query_param(&u, "access_token").unwrap().to_string(),
            "/chat?access_tokens=1"
        );
    }

    #[test]
    fn the_bearer_subprotocol_leaves_the_offer() {
        let mut req = http::Request::get("/")
            .header("sec-websocket-protocol", "chat.v2, bearer.aaa.bbb.ccc")
            .body(())
            .unwrap();
        apply(
            &mut req,
            &Grant {
                strip_subprotocol: true,
                ..Grant::default()
            },
        );
        assert_eq!(req.headers()["sec-websocket-protocol"], "chat.v2");
    }

    #[test]
    fn granted_headers_replace_the_clients_copies() {
        let mut req = http::Request::get("/")
            .header("x-user-id", "admin")
            .header("x-user-id", "root")
            .body(())
            .unwrap();
        apply(
            &mut req,
            &Grant {
                set: vec![(
                    HeaderName::from_static("x-user-id"),
                    HeaderValue::from_static("alice"),
                )],
                ..Grant::default()
            },
        );
        let v: Vec<_> = req.headers().get_all("x-user-id").iter().collect();
        assert_eq!(v, ["alice"]);
    }
}
