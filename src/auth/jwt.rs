//! JWTs checked by upgate: where the token is, which key verifies it, and
//! what its claims allow.
//!
//! The algorithm a key may verify is fixed by the key (its type, or the
//! JWK's `alg`), never chosen by the token: an HMAC token presented against
//! an RSA public key finds no key and is refused, and `none` is no
//! algorithm at all. A token's `kid` selects among keys; an unknown `kid`
//! asks the JWKS URLs for one early refresh (rate-limited) and looks again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Uri};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::jwks::JwksUrl;
use super::{AuthError, Grant, Refusal};
use crate::config::auth::{JwtConfig, KeyKind, OnExpiry, TokenSource};
use crate::metrics::{AuthReason, RouteStats};

/// One verification key and the algorithms it may verify.
#[derive(Clone)]
pub struct Key {
    pub kid: Option<String>,
    pub algs: Vec<Algorithm>,
    pub key: DecodingKey,
}

/// The algorithms a key of this kind verifies.
pub fn algs_for(key: &DecodingKey) -> Vec<Algorithm> {
    use Algorithm::*;
    match key.family() {
        AlgorithmFamily::Hmac => vec![HS256, HS384, HS512],
        AlgorithmFamily::Rsa => vec![RS256, RS384, RS512, PS256, PS384, PS512],
        AlgorithmFamily::Ec => match key.try_get_as_bytes().map(<[u8]>::len) {
            Ok(97) => vec![ES384],
            _ => vec![ES256],
        },
        AlgorithmFamily::Ed => vec![EdDSA],
    }
}

/// A PEM public key: RSA, EC (P-256, P-384) or Ed25519.
pub fn pem_key(pem: &[u8]) -> Result<DecodingKey, String> {
    DecodingKey::from_rsa_pem(pem)
        .or_else(|_| DecodingKey::from_ec_pem(pem))
        .or_else(|_| DecodingKey::from_ed_pem(pem))
        .map_err(|_| "not a PEM public key (RSA, EC P-256/P-384 or Ed25519)".to_string())
}

/// Whether an offered subprotocol carries a token (`bearer.TOKEN`).
pub fn is_bearer_protocol(p: &str) -> bool {
    p.len() > 7 && p[..7].eq_ignore_ascii_case("bearer.")
}

pub struct Jwt {
    cfg: JwtConfig,
    /// Keys from files and the environment, fixed until the next reload.
    fixed: Vec<Key>,
    urls: Vec<Arc<JwksUrl>>,
    /// The claims' header names, parsed once.
    forward: Vec<(String, HeaderName)>,
    /// Tokens whose signature was verified (SHA-256 of the token → its claims).
    cache: Mutex<HashMap<[u8; 32], Verified>>,
}

/// A token's verified claims, kept so that a client reconnecting with the
/// same token costs no second signature check. Time-based claims are
/// checked again at every use; a JWKS fetch since invalidates it.
struct Verified {
    claims: Arc<Map<String, Value>>,
    generation: u64,
}

/// Most tokens kept verified per route (about 1 KiB each with their claims).
const CACHED_TOKENS: usize = 10_000;

impl Jwt {
    pub fn load(route: &str, cfg: &JwtConfig) -> Result<Jwt, AuthError> {
        let mut fixed = Vec::new();
        let mut urls = Vec::new();
        for src in &cfg.keys {
            let err = |message: String| AuthError::Key {
                route: route.to_string(),
                line: src.line,
                message,
            };
            match &src.kind {
                KeyKind::Pem(path) => {
                    let pem = std::fs::read(path)
                        .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
                    let key = pem_key(&pem).map_err(|e| err(format!("{}: {e}", path.display())))?;
                    fixed.push(Key {
                        kid: src.kid.clone(),
                        algs: algs_for(&key),
                        key,
                    });
                }
                KeyKind::JwksFile(path) => {
                    let text = std::fs::read(path)
                        .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
                    let keys = super::jwks::parse(&text)
                        .map_err(|e| err(format!("{}: {e}", path.display())))?;
                    fixed.extend(keys);
                }
                KeyKind::HmacEnv(name) => {
                    let secret = std::env::var(name)
                        .map_err(|_| err(format!("environment variable `{name}` is not set")))?;
                    if secret.len() < 32 {
                        return Err(err(format!(
                            "the secret in `{name}` is {} bytes; use at least 32",
                            secret.len()
                        )));
                    }
                    let key = DecodingKey::from_secret(secret.as_bytes())
                        .map_err(|e| err(format!("`{name}`: {e}")))?;
                    fixed.push(Key {
                        kid: src.kid.clone(),
                        algs: algs_for(&key),
                        key,
                    });
                }
                KeyKind::JwksUrl { url, refresh, ca } => {
                    let u = JwksUrl::new(url, *refresh, ca.as_deref())
                        .map_err(|e| err(format!("{url}: {e}")))?;
                    urls.push(Arc::new(u));
                }
            }
        }
        let mut jwt = Jwt::from_keys(cfg.clone(), fixed);
        jwt.urls = urls;
        Ok(jwt)
    }

    /// A verifier over keys already in hand (fuzzing, tests).
    pub fn from_keys(cfg: JwtConfig, fixed: Vec<Key>) -> Jwt {
        let forward = cfg
            .forward_claims
            .iter()
            .filter_map(|(c, h)| Some((c.clone(), HeaderName::from_bytes(h.as_bytes()).ok()?)))
            .collect();
        Jwt {
            cfg,
            fixed,
            urls: Vec::new(),
            forward,
            cache: Mutex::default(),
        }
    }

    pub fn carry_over(&self, old: &Jwt) {
        for u in &self.urls {
            if let Some(o) = old.urls.iter().find(|o| o.same_url(u)) {
                u.take_keys(o);
            }
        }
    }

    pub fn start(
        &self,
        life: &crate::lifecycle::Lifecycle,
        stop: &tokio_util::sync::CancellationToken,
        stats: &Arc<RouteStats>,
    ) {
        for u in &self.urls {
            u.start(life, stop, stats);
        }
    }

    /// The token and where it was found.
    fn find<'a>(
        &'a self,
        uri: &'a Uri,
        headers: &'a HeaderMap,
    ) -> Option<(&'a str, &'a TokenSource)> {
        for src in &self.cfg.token_from {
            let t = match src {
                TokenSource::Header => headers
                    .get_all(http::header::AUTHORIZATION)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find_map(|v| {
                        let (scheme, rest) = v.trim().split_once(' ')?;
                        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
                    }),
                TokenSource::Cookie(name) => headers
                    .get_all(http::header::COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(';'))
                    .find_map(|kv| {
                        let (k, v) = kv.trim().split_once('=')?;
                        (k == name).then(|| v.trim_matches('"'))
                    }),
                TokenSource::Query(name) => crate::ws::query_values(uri, name).next(),
                TokenSource::Subprotocol => headers
                    .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .map(str::trim)
                    .find(|p| is_bearer_protocol(p))
                    .map(|p| &p[7..]),
            };
            if let Some(t) = t.filter(|t| !t.is_empty()) {
                return Some((t, src));
            }
        }
        None
    }

    /// Every key that could verify a token with this `kid` and algorithm,
    /// and whether any key has that `kid` at all.
    fn candidates(&self, kid: Option<&str>, alg: Algorithm) -> (Vec<Key>, bool) {
        let mut known = false;
        let mut out = Vec::new();
        let url_keys: Vec<Arc<Vec<Key>>> = self.urls.iter().map(|u| u.keys()).collect();
        let all = self
            .fixed
            .iter()
            .chain(url_keys.iter().flat_map(|k| k.iter()));
        for k in all {
            if kid.is_some() && k.kid.as_deref() != kid {
                continue;
            }
            known = true;
            if k.algs.contains(&alg) {
                out.push(k.clone());
            }
        }
        (out, known)
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = self.cfg.leeway.as_secs();
        v.validate_nbf = true;
        v.validate_exp = true;
        v.required_spec_claims.clear();
        if self.cfg.require_exp {
            v.required_spec_claims.insert("exp".to_string());
        }
        if self.cfg.issuer.is_empty() {
            v.iss = None;
        } else {
            v.set_issuer(&self.cfg.issuer);
        }
        if self.cfg.audience.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.cfg.audience);
        }
        v
    }

    pub async fn check(&self, uri: &Uri, headers: &HeaderMap) -> Result<Grant, Refusal> {
        let Some((token, src)) = self.find(uri, headers) else {
            return Err(Refusal::invalid_token(
                AuthReason::Missing,
                "no token (send Authorization: Bearer …)",
            ));
        };
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .unwrap_or([0; 32]);
        let generation = self.generation();
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&digest)
            .filter(|v| v.generation == generation)
            .map(|v| v.claims.clone());
        if let Some(claims) = cached {
            self.still_valid(&claims)?;
            return self.finish(&claims, src, token);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| {
            Refusal::invalid_token(AuthReason::Malformed, "the token is not a well-formed JWT")
        })?;
        let kid = header.kid.as_deref();
        let (mut keys, mut known) = self.candidates(kid, header.alg);
        if !known && !self.urls.is_empty() {
            // A key we have not seen: maybe it was just rotated in.
            let mut refreshed = false;
            for u in &self.urls {
                refreshed |= u.refresh_early().await;
            }
            if refreshed {
                (keys, known) = self.candidates(kid, header.alg);
            }
        }
        if !known {
            return Err(Refusal::invalid_token(
                AuthReason::UnknownKey,
                "the token's key is not known",
            ));
        }
        if keys.is_empty() {
            return Err(Refusal::invalid_token(
                AuthReason::BadSignature,
                format!("algorithm {:?} is not allowed for this key", header.alg),
            ));
        }
        let validation = self.validation(header.alg);
        let mut last = None;
        for k in &keys {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &k.key, &validation) {
                Ok(data) => {
                    self.still_valid(&data.claims)?;
                    let claims = Arc::new(data.claims);
                    let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                    if cache.len() >= CACHED_TOKENS {
                        let now = now_secs();
                        cache.retain(|_, v| {
                            v.claims
                                .get("exp")
                                .and_then(Value::as_u64)
                                .is_some_and(|e| e > now)
                        });
                        if cache.len() >= CACHED_TOKENS {
                            cache.clear();
                        }
                    }
                    cache.insert(
                        digest,
                        Verified {
                            claims: claims.clone(),
                            generation,
                        },
                    );
                    drop(cache);
                    return self.finish(&claims, src, token);
                }
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => last = Some(e),
                Err(e) => return Err(refusal(e.kind())),
            }
        }
        Err(refusal(
            last.as_ref()
                .map_or(&ErrorKind::InvalidSignature, |e| e.kind()),
        ))
    }

    /// The JWKS fetches so far, all URLs together.
    fn generation(&self) -> u64 {
        self.urls.iter().map(|u| u.generation()).sum()
    }

    /// The time-based checks again, for a token verified earlier.
    fn still_valid(&self, claims: &Map<String, Value>) -> Result<(), Refusal> {
        let now = now_secs();
        let leeway = self.cfg.leeway.as_secs();
        if let Some(exp) = claims.get("exp").and_then(Value::as_u64) {
            // RFC 7519 §4.1.4: valid only *before* `exp` (plus leeway), so a
            // live session ends exactly when a new handshake would be refused.
            if exp.saturating_add(leeway) <= now {
                return Err(refusal(&ErrorKind::ExpiredSignature));
            }
        }
        if let Some(nbf) = claims.get("nbf").and_then(Value::as_u64) {
            if nbf > now.saturating_add(leeway) {
                return Err(refusal(&ErrorKind::ImmatureSignature));
            }
        }
        Ok(())
    }

    fn finish(
        &self,
        claims: &Map<String, Value>,
        src: &TokenSource,
        token: &str,
    ) -> Result<Grant, Refusal> {
        let mut g = self.grant(claims, src)?;
        if g.strip_subprotocol {
            g.token_protocol = Some(format!("bearer.{token}"));
        }
        Ok(g)
    }

    fn grant(&self, claims: &Map<String, Value>, src: &TokenSource) -> Result<Grant, Refusal> {
        for (claim, want) in &self.cfg.require {
            let ok = match claims.get(claim) {
                Some(Value::String(s)) => s == want,
                Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(want)),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => {
                    serde_json::from_str::<Value>(want).is_ok_and(|w| w == *v)
                }
                _ => false,
            };
            if !ok {
                return Err(Refusal::forbidden(format!(
                    "the token's `{claim}` claim does not allow this"
                )));
            }
        }
        let mut grant = Grant {
            who: self
                .cfg
                .log_claim
                .as_ref()
                .and_then(|c| claims.get(c))
                .map(claim_text),
            ..Grant::default()
        };
        for (claim, name) in &self.forward {
            grant.remove.push(name.clone());
            if let Some(v) = claims.get(claim) {
                if let Ok(v) = HeaderValue::from_str(&claim_text(v)) {
                    grant.set.push((name.clone(), v));
                }
            }
        }
        if self.cfg.on_expiry == OnExpiry::Close {
            if let Some(exp) = claims.get("exp").and_then(Value::as_u64) {
                let at = exp.saturating_add(self.cfg.leeway.as_secs());
                grant.expires = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(at));
            }
        }
        match src {
            TokenSource::Query(name) => grant.strip_query = Some(name.clone()),
            TokenSource::Subprotocol => grant.strip_subprotocol = true,
            TokenSource::Header | TokenSource::Cookie(_) => {}
        }
        Ok(grant)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A claim as header or log text: strings as they are, arrays joined by commas.
fn claim_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(claim_text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Every fixed refusal text (fuzzing checks that a refusal says nothing else).
pub const REFUSAL_TEXTS: &[&str] = &[
    "no token (send Authorization: Bearer …)",
    "the token is not a well-formed JWT",
    "the token's key is not known",
    "the signature does not verify",
    "the token has expired",
    "the token is not valid yet",
    "the token's issuer is not accepted",
    "the token is not meant for this service",
    "the token's algorithm does not match its key",
    "the token lacks a required claim (exp)",
];

fn refusal(kind: &ErrorKind) -> Refusal {
    let (reason, text) = match kind {
        ErrorKind::InvalidSignature => (AuthReason::BadSignature, "the signature does not verify"),
        ErrorKind::ExpiredSignature => (AuthReason::Expired, "the token has expired"),
        ErrorKind::ImmatureSignature => (AuthReason::NotYetValid, "the token is not valid yet"),
        ErrorKind::InvalidIssuer => (
            AuthReason::WrongIssuer,
            "the token's issuer is not accepted",
        ),
        ErrorKind::InvalidAudience => (
            AuthReason::WrongAudience,
            "the token is not meant for this service",
        ),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidKeyFormat => (
            AuthReason::BadSignature,
            "the token's algorithm does not match its key",
        ),
        ErrorKind::MissingRequiredClaim(_) => (
            AuthReason::Malformed,
            "the token lacks a required claim (exp)",
        ),
        _ => (AuthReason::Malformed, "the token is not a well-formed JWT"),
    };
    Refusal::invalid_token(reason, text)
}
