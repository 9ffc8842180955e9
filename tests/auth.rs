//! Authentication at the edge (`auth:`): JWTs checked by upgate, keys from
//! files, JWKS files and a JWKS URL served over HTTPS here, an HMAC secret
//! from the environment, tokens from every source, forwarded claims, expiry
//! of live sessions, and forward auth against a service started here.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use jsonwebtoken::Algorithm;
use serde_json::json;
use support::jwt::{claims, hmac_token, now, unsigned_token, SigningKey};
use support::*;
use tokio_tungstenite::tungstenite::Message;

const ISS: &str = "https://id.test";

fn route_yaml(be: SocketAddr, auth: &str) -> String {
    format!(
        "admin: {{ addr: '127.0.0.1:0' }}\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://{be}] }}\nroutes:\n  - name: r\n    path: /chat\n    pool: p\n    auth:\n{auth}"
    )
}

/// The status and `WWW-Authenticate` of a refused handshake with these headers.
async fn refused(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    match ws_with(addr, "x", path, headers).await {
        Ok(_) => panic!("{path} with {headers:?} was let in"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            resp.headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
        ),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
    }
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

#[tokio::test]
async fn every_algorithm_verifies_and_every_refusal_says_why() {
    let be = echo_backends(&["a"]).await;
    let dir = TempDir::new("auth-algs");
    let ec = SigningKey::generate(Algorithm::ES256);
    let ec384 = SigningKey::generate(Algorithm::ES384);
    let ed = SigningKey::generate(Algorithm::EdDSA);
    let rsa = SigningKey::generate(Algorithm::RS256);
    let pss = SigningKey::generate(Algorithm::PS256);
    let stranger = SigningKey::generate(Algorithm::ES256);
    ec.write_public(&dir.0, "ec.pem");
    ec384.write_public(&dir.0, "ec384.pem");
    ed.write_public(&dir.0, "ed.pem");
    let rsa_pem = rsa.write_public(&dir.0, "rsa.pem");
    let gw = gateway_in(
        &dir.0,
        &route_yaml(
            be.addrs[0],
            &format!("      jwt:\n        keys: [{{ file: ec.pem, kid: ec }}, {{ file: ec384.pem, kid: ec384 }}, {{ file: ed.pem, kid: ed }}, {{ file: rsa.pem, kid: rsa }}]\n        issuer: {ISS}\n        audience: chat\n        leeway: 5s\n        forward_claims: {{ sub: X-User-Id, tenant: X-Tenant }}\n"),
        ),
    )
    .await;
    let admin = gw.admin.expect("admin");
    let ok = claims("alice", ISS, "chat");
    for (key, kid) in [
        (&ec, "ec"),
        (&ec384, "ec384"),
        (&ed, "ed"),
        (&rsa, "rsa"),
        (&pss, "rsa"),
    ] {
        let t = key.sign(Some(kid), &ok);
        let auth = bearer(&t);
        // The client's own X-User-Id and X-Tenant never reach the backend.
        let mut ws = ws_with(
            gw.addr(),
            "x",
            "/chat",
            &[
                ("authorization", &auth),
                ("x-user-id", "admin"),
                ("x-tenant", "evil"),
            ],
        )
        .await
        .unwrap_or_else(|e| panic!("{:?} refused: {e}", key.alg));
        let who = whoami(&mut ws).await;
        assert!(who.contains("x-user-id: alice\n"), "{who}");
        assert!(!who.contains("x-user-id: admin"), "{who}");
        assert!(
            !who.contains("x-tenant"),
            "a claim the token lacks is no header: {who}"
        );
    }

    let sign = |c: &serde_json::Value| ec.sign(Some("ec"), c);
    let mut expired = ok.clone();
    expired["exp"] = json!(now() - 60);
    let mut early = ok.clone();
    early["nbf"] = json!(now() + 600);
    let mut no_exp = ok.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("missing", String::new(), 401, "Bearer"),
        ("malformed", "abc.def".into(), 401, "invalid_token"),
        (
            "bad_signature",
            stranger.sign(Some("ec"), &ok),
            401,
            "does not verify",
        ),
        ("expired", sign(&expired), 401, "expired"),
        ("not_yet_valid", sign(&early), 401, "not valid yet"),
        (
            "wrong_issuer",
            sign(&claims("alice", "https://evil.test", "chat")),
            401,
            "issuer",
        ),
        (
            "wrong_audience",
            sign(&claims("alice", ISS, "billing")),
            401,
            "not meant",
        ),
        ("unknown_key", ec.sign(Some("nope"), &ok), 401, "not known"),
    ];
    for (reason, token, status, challenge) in &cases {
        let headers: Vec<(&str, String)> = if token.is_empty() {
            vec![]
        } else {
            vec![("authorization", bearer(token))]
        };
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (got, www) = refused(gw.addr(), "/chat", &h).await;
        assert_eq!(got, *status, "{reason}");
        assert!(www.contains(challenge), "{reason}: {www}");
        assert!(
            !www.contains(token.as_str()) || token.is_empty(),
            "the token is never echoed"
        );
    }
    // `alg: none`, and HS256 "signed" with the RSA public key as the secret
    // (algorithm confusion): both refused.
    let (s, _) = refused(
        gw.addr(),
        "/chat",
        &[("authorization", &bearer(&unsigned_token(&ok)))],
    )
    .await;
    assert_eq!(s, 401);
    let confused = hmac_token(
        &std::fs::read(&rsa_pem).unwrap(),
        Algorithm::HS256,
        Some("rsa"),
        &ok,
    );
    let (s, www) = refused(gw.addr(), "/chat", &[("authorization", &bearer(&confused))]).await;
    assert_eq!(s, 401);
    assert!(www.contains("not allowed for this key"), "{www}");
    // A token without `exp` is refused by default.
    let (s, _) = refused(
        gw.addr(),
        "/chat",
        &[("authorization", &bearer(&sign(&no_exp)))],
    )
    .await;
    assert_eq!(s, 401);

    // Plain HTTP on the same route: the same rules.
    let r = get(gw.addr(), "x", "/chat/x").await;
    assert_eq!(r.status, 401);
    let tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let req = http::Request::get("/chat/x")
        .header("host", "x")
        .header("authorization", bearer(&sign(&ok)))
        .header("x-user-id", "admin")
        .body(String::new())
        .unwrap();
    let r = http1(tcp, req).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("x-user-id: alice\n"), "{}", r.body);

    for (reason, n) in [
        ("missing", 2),
        ("malformed", 3),
        ("bad_signature", 2),
        ("expired", 1),
        ("not_yet_valid", 1),
        ("wrong_issuer", 1),
        ("wrong_audience", 1),
        ("unknown_key", 1),
    ] {
        assert_eq!(
            metric(
                admin,
                "upgate_auth_refused_total",
                &format!("reason=\"{reason}\"")
            )
            .await,
            n,
            "{reason}"
        );
    }
    assert_eq!(
        metric(admin, "upgate_auth_allowed_total", "route=\"r\"").await,
        6
    );
}

#[tokio::test]
async fn required_claims_are_403_and_tokens_come_from_every_source() {
    let be = echo_backends(&["a"]).await;
    let dir = TempDir::new("auth-src");
    let ec = SigningKey::generate(Algorithm::ES256);
    ec.write_public(&dir.0, "ec.pem");
    let gw = gateway_in(
        &dir.0,
        &route_yaml(
            be.addrs[0],
            "      jwt:\n        keys: [{ file: ec.pem }]\n        token_from: [cookie:session, 'query:access_token', subprotocol]\n        require: { role: chat }\n",
        ),
    )
    .await;
    let mut c = claims("bob", ISS, "chat");
    c["role"] = json!(["reader", "chat"]);
    let t = ec.sign(None, &c);

    // Query: the parameter is gone from what the backend sees, the rest stays.
    let mut ws = ws_with(
        gw.addr(),
        "x",
        &format!("/chat?room=1&access_token={t}"),
        &[],
    )
    .await
    .expect("query token");
    let who = whoami(&mut ws).await;
    assert!(who.contains("path=/chat?room=1 "), "{who}");
    assert!(!who.contains(&t), "the token reached the backend: {who}");

    // Cookie.
    let cookie = format!("theme=dark; session={t}");
    let mut ws = ws_with(gw.addr(), "x", "/chat", &[("cookie", &cookie)])
        .await
        .expect("cookie token");
    assert!(whoami(&mut ws).await.contains("backend=a"));

    // Subprotocol, beside the app's own: the backend never sees the token
    // entry (the demo backend selects the first protocol it is offered).
    let offer = format!("chat.v1, bearer.{t}");
    let mut ws = ws_with(
        gw.addr(),
        "x",
        "/chat",
        &[("sec-websocket-protocol", &offer)],
    )
    .await
    .expect("subprotocol token");
    let who = whoami(&mut ws).await;
    assert!(who.contains("sec-websocket-protocol: chat.v1\n"), "{who}");
    assert!(!who.contains(&t), "{who}");
    // Offered alone: upgate selects it, so a browser accepts the answer.
    let offer = format!("bearer.{t}");
    let tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        "ws://x/chat",
    )
    .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", offer.parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("alone");
    assert_eq!(resp.headers()["sec-websocket-protocol"], offer.as_str());
    assert!(whoami(&mut ws).await.contains("backend=a"));

    // `header` is not a configured source here.
    let (s, _) = refused(gw.addr(), "/chat", &[("authorization", &bearer(&t))]).await;
    assert_eq!(s, 401);
    // A valid token without the required claim value: 403.
    let (s, www) = refused(
        gw.addr(),
        "/chat",
        &[(
            "cookie",
            &format!("session={}", ec.sign(None, &claims("eve", ISS, "chat"))),
        )],
    )
    .await;
    assert_eq!(s, 403);
    assert!(www.contains("insufficient_scope"), "{www}");
}

#[tokio::test]
async fn an_expiring_token_ends_a_spliced_session_and_closes_a_fanout_client_with_1008() {
    let be = echo_backends(&["a"]).await;
    let feed = support::feed::Feed::start().await;
    let dir = TempDir::new("auth-exp");
    let ec = SigningKey::generate(Algorithm::ES256);
    ec.write_public(&dir.0, "ec.pem");
    let auth = "    auth:\n      jwt:\n        keys: [{ file: ec.pem }]\n        leeway: 0s\n";
    let yaml = format!(
        "admin: {{ addr: '127.0.0.1:0' }}\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://{}] }}\n  f: {{ backends: ['{}'] }}\nroutes:\n  - name: r\n    path: /chat\n    pool: p\n{auth}  - name: feed\n    path: /feed\n    pool: f\n    mode: fanout\n{auth}",
        be.addrs[0],
        feed.url()
    );
    let gw = gateway_in(&dir.0, &yaml).await;
    let mut c = claims("carol", ISS, "chat");
    c["exp"] = json!(now() + 2);
    let auth = bearer(&ec.sign(None, &c));
    let mut spliced = ws_with(gw.addr(), "x", "/chat", &[("authorization", &auth)])
        .await
        .expect("spliced");
    let mut fan = ws_with(gw.addr(), "x", "/feed", &[("authorization", &auth)])
        .await
        .expect("fan-out");
    assert_eq!(roundtrip(&mut spliced, "still valid").await, "still valid");
    let t0 = std::time::Instant::now();
    // Fan-out: a Close 1008 "token expired".
    let (code, reason) = loop {
        match tokio::time::timeout(Duration::from_secs(10), fan.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                break (u16::from(f.code), f.reason.to_string())
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close: {other:?}"),
        }
    };
    assert_eq!((code, reason.as_str()), (1008, "token expired"));
    // Spliced: the connection ends (a TCP close; upgate does not frame a splice).
    assert!(ends_within(&mut spliced, Duration::from_secs(5)).await);
    assert!(t0.elapsed() < Duration::from_secs(6));
    // The token was verified (and kept verified) before: it is still refused now.
    let (s, www) = refused(gw.addr(), "/chat", &[("authorization", &auth)]).await;
    assert_eq!(s, 401);
    assert!(www.contains("expired"), "{www}");
    let admin = gw.admin.expect("admin");
    wait_metric(
        admin,
        "upgate_auth_expired_sessions_total",
        "route=\"r\"",
        1,
    )
    .await;
    wait_metric(
        admin,
        "upgate_auth_expired_sessions_total",
        "route=\"feed\"",
        1,
    )
    .await;
}

/// A JWKS over HTTPS, its content replaceable, its fetches counted.
struct JwksServer {
    addr: SocketAddr,
    doc: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
    ca: std::path::PathBuf,
}

async fn jwks_server(dir: &std::path::Path, doc: String) -> JwksServer {
    use hyper::service::service_fn;
    let (cert, key, _) = cert_files(dir, "idp", &["localhost"]);
    let certs: Vec<_> = rustls_pki_types::pem::PemObject::pem_file_iter(&cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = rustls_pki_types::pem::PemObject::from_pem_file(&key).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let doc = Arc::new(Mutex::new(doc));
    let hits = Arc::new(AtomicUsize::new(0));
    let (d, h) = (doc.clone(), hits.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, d, h) = (acceptor.clone(), d.clone(), h.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(move |_req| {
                    h.fetch_add(1, Ordering::SeqCst);
                    let body = d.lock().unwrap().clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    JwksServer {
        addr,
        doc,
        hits,
        ca: cert,
    }
}

#[tokio::test]
async fn keys_rotate_through_a_jwks_url_and_a_jwks_file() {
    let be = echo_backends(&["a"]).await;
    let dir = TempDir::new("auth-jwks");
    let (a, b, c, d) = (
        SigningKey::generate(Algorithm::ES256),
        SigningKey::generate(Algorithm::EdDSA),
        SigningKey::generate(Algorithm::ES256),
        SigningKey::generate(Algorithm::ES256),
    );
    let idp = jwks_server(&dir.0, json!({"keys": [a.jwk("a")]}).to_string()).await;
    std::fs::write(
        dir.0.join("jwks.json"),
        json!({"keys": [c.jwk("c")]}).to_string(),
    )
    .unwrap();
    let cfg = dir.0.join("routes.yaml");
    std::fs::write(
        &cfg,
        route_yaml(
            be.addrs[0],
            &format!(
                "      jwt:\n        keys:\n          - {{ jwks_url: 'https://localhost:{}/jwks', refresh: 1h, ca: {} }}\n          - {{ jwks_file: jwks.json }}\n",
                idp.addr.port(),
                idp.ca.display()
            ),
        ),
    )
    .unwrap();
    let gw = gateway_file(&cfg).await;
    let admin = gw.admin.expect("admin");
    let ok = claims("dave", ISS, "chat");
    let open = |t: String| {
        let addr = gw.addr();
        async move { ws_with(addr, "x", "/chat", &[("authorization", &bearer(&t))]).await }
    };
    // The URL's key works once fetched (an unknown kid waits for the first fetch).
    open(a.sign(Some("a"), &ok))
        .await
        .expect("key a from the URL");
    open(c.sign(Some("c"), &ok))
        .await
        .expect("key c from the file");
    let fetched = idp.hits.load(Ordering::SeqCst);
    assert!(fetched >= 1);

    // Rotation at the identity provider: an unknown kid triggers one early fetch.
    *idp.doc.lock().unwrap() = json!({"keys": [a.jwk("a"), b.jwk("b")]}).to_string();
    open(b.sign(Some("b"), &ok))
        .await
        .expect("key b after an early refresh");
    assert_eq!(idp.hits.load(Ordering::SeqCst), fetched + 1);
    // More unknown kids right after: refused, and no fetch per request.
    for i in 0..5 {
        let r = open(a.sign(Some(&format!("made-up-{i}")), &ok)).await;
        assert!(r.is_err());
    }
    assert_eq!(idp.hits.load(Ordering::SeqCst), fetched + 1, "rate-limited");

    // Rotation through the file: takes effect on reload.
    std::fs::write(
        dir.0.join("jwks.json"),
        json!({"keys": [d.jwk("d")]}).to_string(),
    )
    .unwrap();
    assert!(open(d.sign(Some("d"), &ok)).await.is_err());
    let r = admin_request(admin, "POST", "/reload", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    open(d.sign(Some("d"), &ok))
        .await
        .expect("key d after the reload");
    assert!(open(c.sign(Some("c"), &ok)).await.is_err(), "key c is gone");
    // The URL's keys carried over the reload.
    open(b.sign(Some("b"), &ok))
        .await
        .expect("key b still known");

    // The identity provider fails: the last good keys stay, the failure counts.
    *idp.doc.lock().unwrap() = "not json".into();
    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap()).unwrap();
    let r = admin_request(admin, "POST", "/reload", None).await;
    assert_eq!(r.status, 200);
    wait_metric(
        admin,
        "upgate_auth_jwks_refresh_failures_total",
        "route=\"r\"",
        1,
    )
    .await;
    open(a.sign(Some("a"), &ok))
        .await
        .expect("last good keys kept");
}

#[tokio::test]
async fn an_hmac_secret_from_the_environment_and_an_access_log_without_tokens() {
    let be = echo_backends(&["a"]).await;
    let dir = TempDir::new("auth-hmac");
    let cfg = dir.0.join("routes.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://{}] }}\nroutes:\n  - name: r\n    path: /chat\n    pool: p\n    auth:\n      jwt:\n        keys: [{{ hmac_secret_env: TEST_JWT_SECRET }}]\n        token_from: [header, 'query:access_token']\n",
            be.addrs[0]
        ),
    )
    .unwrap();
    let secret = "0123456789abcdef0123456789abcdef-test";
    let mut up = process::Upgate::start_with_env(&cfg, &[("TEST_JWT_SECRET", secret)]);
    let addr = up.listening_addr().await;
    let good = hmac_token(
        secret.as_bytes(),
        Algorithm::HS256,
        None,
        &claims("erin", ISS, "chat"),
    );
    let bad = hmac_token(
        b"another secret, long enough 1234",
        Algorithm::HS256,
        None,
        &claims("erin", ISS, "chat"),
    );
    let mut ws = ws_with(addr, "x", &format!("/chat?access_token={good}"), &[])
        .await
        .expect("hmac token");
    assert_eq!(roundtrip(&mut ws, "hi").await, "hi");
    let _ = ws.close(None).await;
    drop(ws);
    let (s, _) = refused(addr, &format!("/chat?access_token={bad}"), &[]).await;
    assert_eq!(s, 401);
    // Both lines, in whatever order they come: the session's and the refusal's.
    up.wait_all(&["user=\"erin\"", "auth=\"bad_signature\""])
        .await;
    let log = up.log();
    assert!(
        log.contains("erin"),
        "the access log names the subject:\n{log}"
    );
    assert!(
        !log.contains(&good) && !log.contains(&bad),
        "a token was logged:\n{log}"
    );
    assert!(
        !log.contains("access_token"),
        "the query was logged:\n{log}"
    );
    up.term();
    let _ = up.exit().await;
}

#[tokio::test]
async fn a_missing_key_file_or_secret_is_a_config_error_naming_file_and_line() {
    let dir = TempDir::new("auth-badkey");
    let cfg = dir.0.join("routes.yaml");
    std::fs::write(
        &cfg,
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  p: { backends: [ws://127.0.0.1:1] }\nroutes:\n  - name: r\n    path: /chat\n    pool: p\n    auth:\n      jwt:\n        keys:\n          - { file: nowhere.pem }\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_upgate"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("routes.yaml") && err.contains("line 12") && err.contains("nowhere.pem"),
        "{err}"
    );
    let cfg_config = upgate::Config::parse(
        std::path::Path::new("routes.yaml"),
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  p: { backends: [ws://127.0.0.1:1] }\nroutes:\n  - name: r\n    pool: p\n    auth:\n      jwt:\n        keys: [{ file: a.pem, jwks_url: 'https://x' }]\n",
    );
    let e = cfg_config.expect_err("two kinds in one key").to_string();
    assert!(e.contains(":10:") && e.contains("exactly one"), "{e}");
}

/// A forward-auth service: `session=good` → 200 with `X-User-Id: bob`;
/// `session=slow` → no answer for 3 s; else 403 "go away". Counts its requests.
async fn auth_service() -> (SocketAddr, Arc<AtomicUsize>) {
    use hyper::service::service_fn;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    h.fetch_add(1, Ordering::SeqCst);
                    let cookie = req
                        .headers()
                        .get("cookie")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    let uri = req
                        .headers()
                        .get("x-forwarded-uri")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    async move {
                        let mut resp = http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b""),
                        ));
                        if cookie.contains("session=good") && uri.starts_with("/chat") {
                            resp.headers_mut()
                                .insert("x-user-id", "bob".parse().unwrap());
                        } else if cookie.contains("session=slow") {
                            tokio::time::sleep(Duration::from_secs(3)).await;
                        } else {
                            *resp.status_mut() = http::StatusCode::FORBIDDEN;
                            *resp.body_mut() =
                                http_body_util::Full::new(bytes::Bytes::from_static(b"go away\n"));
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

#[tokio::test]
async fn forward_auth_allows_denies_times_out_and_caches() {
    let be = echo_backends(&["a"]).await;
    let (svc, hits) = auth_service().await;
    let gw = gateway(&route_yaml(
        be.addrs[0],
        &format!("      forward: {{ url: 'http://{svc}/check', timeout: 500ms, copy_headers: [X-User-Id], cache: 30s }}\n"),
    ))
    .await;
    let admin = gw.admin.expect("admin");
    let mut ws = ws_with(
        gw.addr(),
        "x",
        "/chat",
        &[("cookie", "session=good"), ("x-user-id", "root")],
    )
    .await
    .expect("allowed");
    let who = whoami(&mut ws).await;
    assert!(
        who.contains("x-user-id: bob\n") && !who.contains("root"),
        "{who}"
    );
    // The same credential again: from the cache.
    let mut ws = ws_with(gw.addr(), "x", "/chat", &[("cookie", "session=good")])
        .await
        .expect("allowed again");
    assert!(whoami(&mut ws).await.contains("x-user-id: bob"));
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the second decision came from the cache"
    );
    assert_eq!(
        metric(admin, "upgate_auth_forward_cache_hits_total", "route=\"r\"").await,
        1
    );
    // Denied: the service's status and body.
    let tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let req = http::Request::get("/chat")
        .header("host", "x")
        .header("cookie", "session=bad")
        .body(String::new())
        .unwrap();
    let r = http1(tcp, req).await;
    assert_eq!((r.status, r.body.as_str()), (403, "go away\n"));
    // Too slow: 503, fail closed.
    let (s, _) = refused(gw.addr(), "/chat", &[("cookie", "session=slow")]).await;
    assert_eq!(s, 503);
    assert_eq!(
        metric(admin, "upgate_auth_refused_total", "reason=\"unavailable\"").await,
        1
    );
    assert_eq!(
        metric(admin, "upgate_auth_refused_total", "reason=\"denied\"").await,
        1
    );

    // The service as a pool: balancing and failover past a dead server.
    let dead = dead_addr().await;
    let gw = gateway(&format!(
        "admin: {{ addr: '127.0.0.1:0' }}\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://{}] }}\n  authp: {{ balance: round_robin, backends: [ws://{dead}, ws://{svc}] }}\nroutes:\n  - name: r\n    path: /chat\n    pool: p\n    auth:\n      forward: {{ pool: authp, path: /check, copy_headers: [X-User-Id] }}\n",
        be.addrs[0]
    ))
    .await;
    for _ in 0..4 {
        let mut ws = ws_with(gw.addr(), "x", "/chat", &[("cookie", "session=good")])
            .await
            .expect("allowed through the pool");
        assert!(whoami(&mut ws).await.contains("x-user-id: bob"));
    }
    let m = admin_request(gw.admin.expect("admin"), "GET", "/metrics", None).await;
    assert!(
        m.body
            .lines()
            .any(|l| l.starts_with("upgate_backend_failures_total")
                && l.contains("pool=\"authp\"")
                && l.contains(&dead.to_string())
                && !l.ends_with(" 0")),
        "the dead auth server is blamed:\n{}",
        m.body
    );

    // Unreachable service: 503 as well; with fail_open: let in.
    let dead = dead_addr().await;
    for (fail_open, want) in [(false, Some(503)), (true, None)] {
        let gw = gateway(&route_yaml(
            be.addrs[0],
            &format!("      forward: {{ url: 'http://{dead}/check', timeout: 1s, fail_open: {fail_open} }}\n"),
        ))
        .await;
        let r = ws_with(gw.addr(), "x", "/chat", &[]).await;
        match want {
            Some(code) => match r {
                Err(e) => assert_eq!(refusal(e).0, code),
                Ok(_) => panic!("let in with the auth service unreachable"),
            },
            None => assert!(r.is_ok(), "fail_open lets the request in"),
        }
    }
}

#[tokio::test]
async fn upgate_check_shows_each_routes_auth() {
    let dir = TempDir::new("auth-check");
    let cfg = dir.0.join("routes.yaml");
    std::fs::write(
        &cfg,
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  p: { backends: [ws://127.0.0.1:1] }\nroutes:\n  - name: r\n    path: /chat\n    pool: p\n    auth:\n      jwt:\n        keys: [{ hmac_secret_env: S }]\n        token_from: [header, subprotocol]\n        audience: chat\n      forward: { url: 'http://127.0.0.1:1/check' }\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_upgate"))
        .arg("check")
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("auth jwt (hmac $S; from header subprotocol; aud chat; closes on expiry)"),
        "{text}"
    );
    assert!(
        text.contains("auth forward http://127.0.0.1:1/check"),
        "{text}"
    );
}

#[tokio::test]
#[cfg_attr(no_browser, ignore = "needs chromium (apt-get install chromium)")]
async fn a_browser_authenticates_with_a_cookie_and_with_the_subprotocol_convention() {
    let be = echo_backends(&["a"]).await;
    let dir = TempDir::new("auth-browser");
    let key = SigningKey::generate(Algorithm::ES256);
    key.write_public(&dir.0, "ec.pem");
    let token = key.sign(None, &claims("grace", ISS, "chat"));
    // The page sets a cookie and opens a WebSocket (cookies go along), then
    // drops the cookie and offers the token as a subprotocol instead (a
    // browser cannot set headers on a WebSocket).
    let page = format!(
        "<body><script>\
        const keep = setInterval(() => fetch('/busy').catch(() => {{}}), 50);\
        document.cookie = 'session={token}; path=/';\
        const a = new WebSocket('ws://' + location.host + '/chat');\
        a.onopen = () => a.send('/whoami');\
        a.onmessage = e => {{ document.body.dataset.cookie = e.data.split(' ')[0]; a.close();\
          document.cookie = 'session=; max-age=0; path=/';\
          const b = new WebSocket('ws://' + location.host + '/chat', ['bearer.{token}']);\
          b.onopen = () => {{ document.body.dataset.protocol = b.protocol === 'bearer.{token}' ? 'token' : b.protocol; b.send('/whoami'); }};\
          b.onmessage = e => {{ document.body.dataset.sub = e.data.split(' ')[0]; b.close(); clearInterval(keep); }};\
          b.onerror = () => {{ document.body.dataset.sub = 'error'; }};\
        }};\
        a.onerror = () => {{ document.body.dataset.cookie = 'error'; }};\
        </script></body>"
    );
    let web = static_http("text/html", page).await;
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://{}] }}\n  web: {{ backends: [http://{web}] }}\nroutes:\n  - name: r\n    path: /chat\n    pool: p\n    auth:\n      jwt:\n        keys: [{{ file: ec.pem }}]\n        token_from: [cookie:session, subprotocol]\n  - {{ name: page, path: /, pool: web }}\n",
        be.addrs[0]
    );
    let gw = gateway_in(&dir.0, &yaml).await;
    let url = format!("http://localhost:{}/", gw.addr().port());
    let dom = browser_dom(&url).await;
    assert!(dom.contains(r#"data-cookie="backend=a""#), "cookie: {dom}");
    assert!(
        dom.contains(r#"data-protocol="token""#),
        "selected protocol: {dom}"
    );
    assert!(
        dom.contains(r#"data-sub="backend=a""#),
        "subprotocol: {dom}"
    );
}

#[tokio::test]
async fn a_rotated_key_file_is_picked_up_without_a_reload_command() {
    let be = echo_backends(&["a"]).await;
    let dir = TempDir::new("auth-watch");
    let (a, b) = (
        SigningKey::generate(Algorithm::ES256),
        SigningKey::generate(Algorithm::ES256),
    );
    a.write_public(&dir.0, "issuer.pem");
    let cfg = dir.0.join("routes.yaml");
    std::fs::write(
        &cfg,
        format!(
            "server: {{ watch_interval: 100ms }}\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://{}] }}\nroutes:\n  - name: r\n    path: /chat\n    pool: p\n    auth: {{ jwt: {{ keys: [{{ file: issuer.pem }}] }} }}\n",
            be.addrs[0]
        ),
    )
    .unwrap();
    let gw = gateway_file(&cfg).await;
    let ok = claims("heidi", ISS, "chat");
    let try_with = |k: &SigningKey| {
        let auth = bearer(&k.sign(None, &ok));
        let addr = gw.addr();
        async move {
            ws_with(addr, "x", "/chat", &[("authorization", &auth)])
                .await
                .is_ok()
        }
    };
    assert!(try_with(&a).await);
    assert!(!try_with(&b).await);
    // The issuer rotates its key; the file watcher reloads.
    b.write_public(&dir.0, "issuer.pem");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !try_with(&b).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the new key was never picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!try_with(&a).await, "the old key is gone");
}
