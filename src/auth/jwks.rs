//! JSON Web Key Sets: parsing (from a file or a URL), and a URL's refresher.
//!
//! A JWKS URL is fetched when the route starts and every `refresh` after;
//! a failed fetch keeps the last good keys (logged, counted in
//! `upgate_auth_jwks_refresh_failures_total`). A token naming an unknown
//! `kid` may ask for one early fetch, at most once per [`EARLY_EVERY`], and
//! waits for it at most [`EARLY_WAIT`]: a flood of made-up `kid`s costs the
//! identity provider nothing.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{info, warn};

use super::jwt::{algs_for, Key};
use crate::backend::connector::PoolConnector;
use crate::metrics::RouteStats;

/// Shortest time between two early (unknown-`kid`) fetches of one URL.
pub const EARLY_EVERY: Duration = Duration::from_secs(10);
/// Longest a request waits for an early fetch.
pub const EARLY_WAIT: Duration = Duration::from_secs(2);
/// Largest JWKS document read.
const MAX_JWKS: usize = 1 << 20;

/// The keys of a JWKS document. Keys of a kind upgate cannot verify with
/// (encryption keys, unknown curves) are skipped; none usable is an error.
pub fn parse(text: &[u8]) -> Result<Vec<Key>, String> {
    let set: JwkSet = serde_json::from_slice(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        if jwk
            .common
            .public_key_use
            .as_ref()
            .is_some_and(|u| *u != jsonwebtoken::jwk::PublicKeyUse::Signature)
        {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        // A public key of the wrong size can never verify: not a key.
        let size_ok = match key.family() {
            jsonwebtoken::AlgorithmFamily::Ec => {
                matches!(key.try_get_as_bytes().map(<[u8]>::len), Ok(65 | 97))
            }
            jsonwebtoken::AlgorithmFamily::Ed => {
                matches!(key.try_get_as_bytes().map(<[u8]>::len), Ok(32))
            }
            jsonwebtoken::AlgorithmFamily::Hmac => {
                key.try_get_as_bytes().is_ok_and(|b| b.len() >= 32)
            }
            jsonwebtoken::AlgorithmFamily::Rsa => true,
        };
        if !size_ok {
            continue;
        }
        let mut algs = algs_for(&key);
        if let AlgorithmParameters::EllipticCurve(ec) = &jwk.algorithm {
            algs = match ec.curve {
                jsonwebtoken::jwk::EllipticCurve::P256 => vec![Algorithm::ES256],
                jsonwebtoken::jwk::EllipticCurve::P384 => vec![Algorithm::ES384],
                _ => continue,
            };
        }
        // A JWK that names its algorithm verifies that one only.
        if let Some(named) = jwk.common.key_algorithm.and_then(algorithm) {
            if !algs.contains(&named) {
                continue;
            }
            algs = vec![named];
        }
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            algs,
            key,
        });
    }
    if keys.is_empty() {
        return Err("no signature-verification key in it".into());
    }
    Ok(keys)
}

fn algorithm(k: KeyAlgorithm) -> Option<Algorithm> {
    use Algorithm as A;
    Some(match k {
        KeyAlgorithm::HS256 => A::HS256,
        KeyAlgorithm::HS384 => A::HS384,
        KeyAlgorithm::HS512 => A::HS512,
        KeyAlgorithm::ES256 => A::ES256,
        KeyAlgorithm::ES384 => A::ES384,
        KeyAlgorithm::RS256 => A::RS256,
        KeyAlgorithm::RS384 => A::RS384,
        KeyAlgorithm::RS512 => A::RS512,
        KeyAlgorithm::PS256 => A::PS256,
        KeyAlgorithm::PS384 => A::PS384,
        KeyAlgorithm::PS512 => A::PS512,
        KeyAlgorithm::EdDSA => A::EdDSA,
        _ => return None,
    })
}

/// A JWKS URL and its current keys.
pub struct JwksUrl {
    url: http::Uri,
    refresh: Duration,
    client: Client<PoolConnector, Empty<Bytes>>,
    keys: ArcSwap<Vec<Key>>,
    /// Wakes the refresher for an early fetch.
    kick: Notify,
    /// When the last early fetch was asked for.
    early: Mutex<Option<Instant>>,
    /// Bumped after every fetch attempt.
    fetched: watch::Sender<u64>,
}

impl JwksUrl {
    pub fn new(url: &str, refresh: Duration, ca: Option<&Path>) -> Result<JwksUrl, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
        let tls = if uri.scheme_str() == Some("https") {
            let cfg = crate::tls::client_config(ca).map_err(|e| e.to_string())?;
            Some(tokio_rustls::TlsConnector::from(cfg))
        } else {
            None
        };
        let client = Client::builder(TokioExecutor::new())
            .build(PoolConnector::new(tls, Duration::from_secs(5)));
        Ok(JwksUrl {
            url: uri,
            refresh,
            client,
            keys: ArcSwap::from_pointee(Vec::new()),
            kick: Notify::new(),
            early: Mutex::new(None),
            fetched: watch::Sender::new(0),
        })
    }

    pub fn same_url(&self, other: &JwksUrl) -> bool {
        self.url == other.url
    }

    pub fn take_keys(&self, other: &JwksUrl) {
        self.keys.store(other.keys());
    }

    /// How many fetches have completed (a verified-token cache entry made
    /// before the latest is not trusted: the key that verified it may be gone).
    pub fn generation(&self) -> u64 {
        *self.fetched.borrow()
    }

    pub fn keys(&self) -> Arc<Vec<Key>> {
        self.keys.load_full()
    }

    /// Runs the refresher (supervised) until `stop`.
    pub fn start(
        self: &Arc<Self>,
        life: &crate::lifecycle::Lifecycle,
        stop: &tokio_util::sync::CancellationToken,
        stats: &Arc<RouteStats>,
    ) {
        let (this, stats, until) = (self.clone(), stats.clone(), stop.clone());
        crate::supervise::spawn(
            &life.tasks,
            life.panics.clone(),
            crate::supervise::Kind::JwksRefresh,
            self.url.to_string(),
            stop.clone(),
            move || {
                let (this, stats, until) = (this.clone(), stats.clone(), until.clone());
                async move {
                    loop {
                        this.fetch_once(&stats).await;
                        tokio::select! {
                            _ = until.cancelled() => return,
                            _ = tokio::time::sleep(this.refresh) => {}
                            _ = this.kick.notified() => {}
                        }
                    }
                }
            },
        );
    }

    async fn fetch_once(&self, stats: &RouteStats) {
        match tokio::time::timeout(Duration::from_secs(10), self.fetch()).await {
            Ok(Ok(keys)) => {
                info!(url = %self.url, keys = keys.len(), "JWKS fetched");
                self.keys.store(Arc::new(keys));
            }
            Ok(Err(e)) => {
                stats
                    .auth
                    .jwks_refresh_failures
                    .fetch_add(1, Ordering::Relaxed);
                warn!(url = %self.url, error = %e, "JWKS fetch failed; keeping the last good keys");
            }
            Err(_) => {
                stats
                    .auth
                    .jwks_refresh_failures
                    .fetch_add(1, Ordering::Relaxed);
                warn!(url = %self.url, "JWKS fetch timed out; keeping the last good keys");
            }
        }
        self.fetched.send_modify(|n| *n += 1);
    }

    async fn fetch(&self) -> Result<Vec<Key>, String> {
        let req = http::Request::get(self.url.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("answered {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_JWKS)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes();
        parse(&body)
    }

    /// Asks for an early fetch (at most once per [`EARLY_EVERY`]) and waits
    /// for it (at most [`EARLY_WAIT`]). Whether a fetch happened.
    pub async fn refresh_early(&self) -> bool {
        let mut seen = self.fetched.subscribe();
        if *seen.borrow_and_update() == 0 {
            // Not fetched yet (the route just started): wait for the first
            // fetch rather than spend the early one.
            return tokio::time::timeout(EARLY_WAIT, seen.changed())
                .await
                .is_ok_and(|r| r.is_ok());
        }
        {
            let mut last = self.early.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < EARLY_EVERY) {
                return false;
            }
            *last = Some(Instant::now());
        }
        self.kick.notify_one();
        tokio::time::timeout(EARLY_WAIT, seen.changed())
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jwks_yields_its_signing_keys_with_their_algorithms() {
        let doc = br#"{"keys":[
            {"kty":"oct","kid":"h","k":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI","alg":"HS256"},
            {"kty":"RSA","kid":"enc","use":"enc","n":"AQAB","e":"AQAB"},
            {"kty":"OKP","kid":"e","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
        ]}"#;
        let keys = parse(doc).expect("parses");
        let kids: Vec<_> = keys
            .iter()
            .map(|k| k.kid.clone().unwrap_or_default())
            .collect();
        assert_eq!(kids, ["h", "e"], "the encryption key is skipped");
        assert_eq!(keys[0].algs, [Algorithm::HS256]);
        assert_eq!(keys[1].algs, [Algorithm::EdDSA]);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse(b"").is_err());
        assert!(parse(b"{\"keys\":[]}").is_err());
        assert!(
            parse(b"{\"keys\":[{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"\",\"y\":\"\"}]}")
                .is_err()
        );
        let mut r = crate::test_rng(11);
        for _ in 0..2_000 {
            let n = (r() % 200) as usize;
            let b: Vec<u8> = (0..n).map(|_| r() as u8).collect();
            let _ = parse(&b);
        }
    }
}
