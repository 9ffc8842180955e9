//! A route's `auth:` section: who may connect. The shape as written
//! (`Raw*`), and its validation into [`AuthConfig`]. Keys are named here
//! (files, environment variables, URLs) and loaded by the `auth` module when a
//! snapshot is built, so a bad key file fails a reload like a bad certificate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::locate::{locate, Seg};
use super::raw::Dur;
use super::{ConfigError, Ctx};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub jwt: Option<RawJwt>,
    pub forward: Option<RawForward>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    pub keys: Vec<RawKey>,
    pub issuer: Option<OneOrMany>,
    pub audience: Option<OneOrMany>,
    pub leeway: Option<Dur>,
    pub token_from: Option<Vec<String>>,
    #[serde(default)]
    pub forward_claims: super::raw::indexmap_lite::OrderedMap<String>,
    #[serde(default)]
    pub require: super::raw::indexmap_lite::OrderedMap<String>,
    pub on_expiry: Option<OnExpiry>,
    pub log_claim: Option<String>,
    pub require_exp: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub file: Option<PathBuf>,
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    pub hmac_secret_env: Option<String>,
    /// For `file` and `hmac_secret_env`: the key id tokens name in `kid`.
    pub kid: Option<String>,
    /// For `jwks_url`: how often to fetch it again (default 5m).
    pub refresh: Option<Dur>,
    /// For `jwks_url` over https: a CA file instead of the system roots.
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawForward {
    pub url: Option<String>,
    /// Instead of `url`: a pool of auth servers (health checks, failover) and the path to ask.
    pub pool: Option<String>,
    pub path: Option<String>,
    pub timeout: Option<Dur>,
    #[serde(default)]
    pub copy_headers: Vec<String>,
    pub request_headers: Option<Vec<String>>,
    pub cache: Option<Dur>,
    #[serde(default)]
    pub fail_open: bool,
    pub ca: Option<PathBuf>,
}

/// What ends a live session whose token expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExpiry {
    Close,
    Ignore,
}

/// A route's validated `auth:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    pub jwt: Option<JwtConfig>,
    pub forward: Option<ForwardConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    pub keys: Vec<KeySource>,
    /// Accepted `iss` values (any one); empty: not checked.
    pub issuer: Vec<String>,
    /// Accepted `aud` values (any one); empty: not checked.
    pub audience: Vec<String>,
    pub leeway: Duration,
    pub token_from: Vec<TokenSource>,
    /// Claim name → header set for the backend (client copies removed).
    pub forward_claims: Vec<(String, String)>,
    /// Claim name → required value (403 otherwise).
    pub require: Vec<(String, String)>,
    pub on_expiry: OnExpiry,
    /// The claim the access log names (`sub` by default); `None`: nothing.
    pub log_claim: Option<String>,
    pub require_exp: bool,
}

/// Where a key comes from; `line` is where it is written, for load errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySource {
    pub kind: KeyKind,
    pub kid: Option<String>,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    /// A PEM public key (RSA, EC P-256/P-384, Ed25519).
    Pem(PathBuf),
    JwksFile(PathBuf),
    JwksUrl {
        url: String,
        refresh: Duration,
        ca: Option<PathBuf>,
    },
    /// An HMAC secret read from this environment variable.
    HmacEnv(String),
}

/// Where a token is looked for, in the configured order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer TOKEN`.
    Header,
    Cookie(String),
    /// A query parameter, removed from the URI sent on.
    Query(String),
    /// An offered `Sec-WebSocket-Protocol` entry `bearer.TOKEN`, removed from the offer.
    Subprotocol,
}

/// Where forward auth asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardTarget {
    Url(http::Uri),
    /// A pool of the config (index into `Config::pools`) and the path to ask.
    Pool {
        pool: usize,
        name: String,
        path: String,
    },
}

impl std::fmt::Display for ForwardTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForwardTarget::Url(u) => write!(f, "{u}"),
            ForwardTarget::Pool { name, path, .. } => write!(f, "pool {name} {path}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardConfig {
    pub target: ForwardTarget,
    pub timeout: Duration,
    pub copy_headers: Vec<String>,
    pub request_headers: Vec<String>,
    /// How long a decision is kept per credential; zero: not cached.
    pub cache: Duration,
    pub fail_open: bool,
    pub ca: Option<PathBuf>,
}

impl AuthConfig {
    /// One line for `upgate check`: what is checked, with which keys, from where.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(j) = &self.jwt {
            let keys: Vec<String> = j
                .keys
                .iter()
                .map(|k| match &k.kind {
                    KeyKind::Pem(p) => format!("pem {}", p.display()),
                    KeyKind::JwksFile(p) => format!("jwks {}", p.display()),
                    KeyKind::JwksUrl { url, refresh, .. } => {
                        format!("jwks {url} every {refresh:?}")
                    }
                    KeyKind::HmacEnv(n) => format!("hmac ${n}"),
                })
                .collect();
            let from: Vec<String> = j
                .token_from
                .iter()
                .map(|s| match s {
                    TokenSource::Header => "header".to_string(),
                    TokenSource::Cookie(n) => format!("cookie:{n}"),
                    TokenSource::Query(n) => format!("query:{n}"),
                    TokenSource::Subprotocol => "subprotocol".to_string(),
                })
                .collect();
            let mut s = format!("auth jwt ({}; from {}", keys.join(", "), from.join(" "));
            if !j.issuer.is_empty() {
                s.push_str(&format!("; iss {}", j.issuer.join("|")));
            }
            if !j.audience.is_empty() {
                s.push_str(&format!("; aud {}", j.audience.join("|")));
            }
            if j.on_expiry == OnExpiry::Close {
                s.push_str("; closes on expiry");
            }
            s.push(')');
            parts.push(s);
        }
        if let Some(f) = &self.forward {
            parts.push(format!(
                "auth forward {}{}",
                f.target,
                if f.fail_open { " (fail open)" } else { "" }
            ));
        }
        parts.join(", ")
    }
}

/// Validates `routes[i].auth`.
pub(super) fn auth(
    cx: &Ctx,
    route: usize,
    raw: RawAuth,
    resolve: &dyn Fn(&Path) -> PathBuf,
    pools: &[super::PoolConfig],
) -> Result<AuthConfig, ConfigError> {
    let base = [Seg::Key("routes"), Seg::Index(route), Seg::Key("auth")];
    let at = |k: &'static str| {
        let mut p = base.to_vec();
        p.push(Seg::Key(k));
        p
    };
    if raw.jwt.is_none() && raw.forward.is_none() {
        return Err(cx.err(&base, "say how: `jwt:` (tokens checked by upgate) and/or `forward:` (a service of yours decides)"));
    }
    let jwt = match raw.jwt {
        None => None,
        Some(j) => Some(jwt(cx, &at("jwt"), j, resolve)?),
    };
    let forward = match raw.forward {
        None => None,
        Some(f) => Some(forward(cx, &at("forward"), f, resolve, pools)?),
    };
    Ok(AuthConfig { jwt, forward })
}

fn with<'a>(p: &[Seg<'a>], s: Seg<'a>) -> Vec<Seg<'a>> {
    let mut v = p.to_vec();
    v.push(s);
    v
}

fn jwt(
    cx: &Ctx,
    at: &[Seg],
    j: RawJwt,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<JwtConfig, ConfigError> {
    if j.keys.is_empty() {
        return Err(cx.err(
            &with(at, Seg::Key("keys")),
            "list at least one key: `{ file: PEM }`, `{ jwks_file: FILE }`, `{ jwks_url: URL }` or `{ hmac_secret_env: NAME }`",
        ));
    }
    let mut keys = Vec::new();
    for (k, key) in j.keys.into_iter().enumerate() {
        let here = with(&with(at, Seg::Key("keys")), Seg::Index(k));
        let line = locate(cx.text, &here);
        let given = [
            key.file.is_some(),
            key.jwks_file.is_some(),
            key.jwks_url.is_some(),
            key.hmac_secret_env.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if given != 1 {
            return Err(cx.err(
                &here,
                "each key is exactly one of `file`, `jwks_file`, `jwks_url`, `hmac_secret_env`",
            ));
        }
        let url_only = |name: &'static str, set: bool| {
            if set && key.jwks_url.is_none() {
                Err(cx.err(
                    &with(&here, Seg::Key(name)),
                    format!("`{name}` is only used with `jwks_url`"),
                ))
            } else {
                Ok(())
            }
        };
        url_only("refresh", key.refresh.is_some())?;
        url_only("ca", key.ca.is_some())?;
        if key.kid.is_some() && (key.jwks_file.is_some() || key.jwks_url.is_some()) {
            return Err(cx.err(
                &with(&here, Seg::Key("kid")),
                "a JWKS names its own keys' `kid`; `kid` is for `file` and `hmac_secret_env`",
            ));
        }
        let kind = if let Some(f) = key.file {
            KeyKind::Pem(resolve(&f))
        } else if let Some(f) = key.jwks_file {
            KeyKind::JwksFile(resolve(&f))
        } else if let Some(url) = key.jwks_url {
            let ok = url
                .parse::<http::Uri>()
                .ok()
                .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
            if ok.is_none() {
                return Err(cx.err(
                    &with(&here, Seg::Key("jwks_url")),
                    format!("`{url}` is not an http:// or https:// URL"),
                ));
            }
            let refresh = key.refresh.map_or(Duration::from_secs(300), |d| d.0);
            if refresh < Duration::from_secs(1) {
                return Err(cx.err(&with(&here, Seg::Key("refresh")), "at least 1s"));
            }
            KeyKind::JwksUrl {
                url,
                refresh,
                ca: key.ca.map(|c| resolve(&c)),
            }
        } else {
            let name = key.hmac_secret_env.unwrap_or_default();
            if name.is_empty() {
                return Err(cx.err(
                    &with(&here, Seg::Key("hmac_secret_env")),
                    "name an environment variable",
                ));
            }
            KeyKind::HmacEnv(name)
        };
        keys.push(KeySource {
            kind,
            kid: key.kid,
            line,
        });
    }
    let token_from = match j.token_from {
        None => vec![TokenSource::Header],
        Some(list) if list.is_empty() => {
            return Err(cx.err(
                &with(at, Seg::Key("token_from")),
                "list at least one source, or remove the key for `[header]`",
            ))
        }
        Some(list) => {
            let mut out = Vec::new();
            for (k, s) in list.iter().enumerate() {
                let src = match s.split_once(':') {
                    None if s == "header" => TokenSource::Header,
                    None if s == "subprotocol" => TokenSource::Subprotocol,
                    Some(("cookie", n)) if !n.is_empty() => TokenSource::Cookie(n.into()),
                    Some(("query", n)) if !n.is_empty() => TokenSource::Query(n.into()),
                    _ => {
                        return Err(cx.err(
                            &with(&with(at, Seg::Key("token_from")), Seg::Index(k)),
                            format!("`{s}` is not a token source; use `header`, `cookie:NAME`, `query:NAME` or `subprotocol`"),
                        ))
                    }
                };
                out.push(src);
            }
            out
        }
    };
    let mut forward_claims = Vec::new();
    for (claim, header) in j.forward_claims.0 {
        if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
            return Err(cx.err(
                &with(
                    &with(at, Seg::Key("forward_claims")),
                    Seg::Key(claim.as_str()),
                ),
                format!("`{header}` (for claim `{claim}`) is not a valid header name"),
            ));
        }
        forward_claims.push((claim, header));
    }
    let log_claim = match j.log_claim.as_deref() {
        None => Some("sub".to_string()),
        Some("none") | Some("") => None,
        Some(c) => Some(c.to_string()),
    };
    Ok(JwtConfig {
        keys,
        issuer: j.issuer.map(OneOrMany::into_vec).unwrap_or_default(),
        audience: j.audience.map(OneOrMany::into_vec).unwrap_or_default(),
        leeway: j.leeway.map_or(Duration::from_secs(30), |d| d.0),
        token_from,
        forward_claims,
        require: j.require.0,
        on_expiry: j.on_expiry.unwrap_or(OnExpiry::Close),
        log_claim,
        require_exp: j.require_exp.unwrap_or(true),
    })
}

fn forward(
    cx: &Ctx,
    at: &[Seg],
    f: RawForward,
    resolve: &dyn Fn(&Path) -> PathBuf,
    pools: &[super::PoolConfig],
) -> Result<ForwardConfig, ConfigError> {
    let target = match (&f.url, &f.pool) {
        (Some(url), None) => {
            if f.path.is_some() {
                return Err(cx.err(
                    &with(at, Seg::Key("path")),
                    "`path` goes with `pool`; put the path in `url`",
                ));
            }
            let u = url
                .parse::<http::Uri>()
                .ok()
                .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some())
                .ok_or_else(|| {
                    cx.err(
                        &with(at, Seg::Key("url")),
                        format!("`{url}` is not an http:// or https:// URL"),
                    )
                })?;
            ForwardTarget::Url(u)
        }
        (None, Some(name)) => {
            let pool = pools.iter().position(|p| p.name == *name).ok_or_else(|| {
                let known: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
                cx.err(
                    &with(at, Seg::Key("pool")),
                    format!(
                        "no pool named `{name}`; defined pools: {}",
                        known.join(", ")
                    ),
                )
            })?;
            let path = f.path.clone().unwrap_or_else(|| "/".into());
            if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
                return Err(cx.err(
                    &with(at, Seg::Key("path")),
                    format!("`{path}` is not a path starting with /"),
                ));
            }
            ForwardTarget::Pool {
                pool,
                name: name.clone(),
                path,
            }
        }
        _ => {
            return Err(cx.err(
                at,
                "say where to ask: `url: http://…` or `pool: NAME` (with `path: /check`), not both",
            ))
        }
    };
    if f.ca.is_some() && !matches!(target, ForwardTarget::Url(_)) {
        return Err(cx.err(
            &with(at, Seg::Key("ca")),
            "`ca` is for a `url`; a pool's backends use the pool's `ca_file`",
        ));
    }
    let headers = |name: &'static str, list: &[String]| {
        for (k, h) in list.iter().enumerate() {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(cx.err(
                    &with(&with(at, Seg::Key(name)), Seg::Index(k)),
                    format!("`{h}` is not a valid header name"),
                ));
            }
        }
        Ok(())
    };
    headers("copy_headers", &f.copy_headers)?;
    let request_headers = f
        .request_headers
        .unwrap_or_else(|| vec!["Cookie".into(), "Authorization".into()]);
    headers("request_headers", &request_headers)?;
    let timeout = f.timeout.map_or(Duration::from_secs(2), |d| d.0);
    if timeout.is_zero() {
        return Err(cx.err(&with(at, Seg::Key("timeout")), "must be more than 0s"));
    }
    Ok(ForwardConfig {
        target,
        timeout,
        copy_headers: f.copy_headers,
        request_headers,
        cache: f.cache.map_or(Duration::ZERO, |d| d.0),
        fail_open: f.fail_open,
        ca: f.ca.map(|c| resolve(&c)),
    })
}
