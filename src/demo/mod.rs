//! Built-in demo backends: echo servers and a ticker feed, on loopback.
//!
//! They speak WebSocket and plain HTTP through hyper, so the demo exercises
//! both of the gateway's paths, and the integration tests reuse them.
//!
//! Echo protocol (text messages): anything is echoed back, except
//! `/whoami` (answered with the backend's name, the request path and the
//! upgrade request's headers), `/close CODE REASON` (the backend closes
//! with that code) and `/restart` (a redeploy, simulated: the backend closes
//! every WebSocket session it holds with 1012 and refuses upgrades with 503
//! for [`RESTART_DOWN`]). Plain HTTP: `/` is the demo page, `/health`
//! answers `ok`, and any other request gets a dump of what the backend received.

mod page;

/// The repository's routes.yaml, used by `upgate demo` when no file is found.
const EMBEDDED_ROUTES: &str = include_str!("../../routes.yaml");

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Where `upgate demo` starts its backends; the repository's `routes.yaml` points at these.
pub const ECHO_ADDRS: [&str; 2] = ["127.0.0.1:9001", "127.0.0.1:9002"];
pub const TICKER_ADDR: &str = "127.0.0.1:9101";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Echo,
    Ticker,
}

/// A demo backend's identity.
#[derive(Debug, Clone)]
pub struct Backend {
    pub name: String,
    pub kind: Kind,
}

/// How long a demo backend refuses upgrades after `/restart`.
pub const RESTART_DOWN: Duration = Duration::from_secs(2);

/// A demo backend's restarts: each bumps the generation its sessions watch.
struct Restarts {
    generation: tokio::sync::watch::Sender<u64>,
    down_until: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Restarts {
    fn restart(&self) {
        if let Ok(mut d) = self.down_until.lock() {
            *d = Some(tokio::time::Instant::now() + RESTART_DOWN);
        }
        self.generation.send_modify(|g| *g += 1);
    }

    fn down(&self) -> bool {
        self.down_until
            .lock()
            .ok()
            .and_then(|d| *d)
            .is_some_and(|t| t > tokio::time::Instant::now())
    }
}

/// Serves `listener` until `stop` is cancelled. Upgraded WebSocket sessions
/// outlive `stop` (as a real server's would while it drains).
pub async fn serve(listener: TcpListener, backend: Backend, stop: CancellationToken) {
    serve_killable(listener, backend, stop, CancellationToken::new()).await
}

/// Like [`serve`]; cancelling `kill` also drops every live WebSocket session,
/// as when the backend process dies.
pub async fn serve_killable(
    listener: TcpListener,
    backend: Backend,
    stop: CancellationToken,
    kill: CancellationToken,
) {
    let backend = Arc::new(backend);
    let restarts = Arc::new(Restarts {
        generation: tokio::sync::watch::Sender::new(0),
        down_until: std::sync::Mutex::new(None),
    });
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = stop.cancelled() => return,
        };
        let _ = tcp.set_nodelay(true);
        let b = backend.clone();
        let stop = stop.clone();
        let kill = kill.clone();
        let r = restarts.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                handle(b.clone(), kill.clone(), r.clone(), peer, req)
            });
            let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                .into_owned();
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// Binds `addr` and serves a demo backend on it in the background.
pub async fn spawn(
    addr: &str,
    backend: Backend,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(addr).await?;
    let local = l.local_addr()?;
    tokio::spawn(serve(l, backend, stop));
    Ok(local)
}

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

fn text(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn describe(b: &Backend, peer: SocketAddr, req: &http::request::Parts) -> String {
    let mut s = format!(
        "backend={} method={} path={} peer={peer}\n",
        b.name,
        req.method,
        req.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    for (k, v) in &req.headers {
        s.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    s
}

async fn handle(
    b: Arc<Backend>,
    kill: CancellationToken,
    restarts: Arc<Restarts>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let is_ws = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if !is_ws {
        let (parts, body) = req.into_parts();
        return Ok(match parts.uri.path() {
            "/" => text(StatusCode::OK, "text/html; charset=utf-8", page::HTML),
            "/health" => text(StatusCode::OK, "text/plain", "ok\n"),
            _ => {
                let body = body
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let mut s = describe(&b, peer, &parts);
                s.push('\n');
                s.push_str(&String::from_utf8_lossy(&body));
                text(StatusCode::OK, "text/plain; charset=utf-8", s)
            }
        });
    }
    if restarts.down() {
        let mut r = text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "restarting\n",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        return Ok(r);
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "missing Sec-WebSocket-Key\n",
        ));
    };
    let accept = derive_accept_key(key.as_bytes());
    // Accept the first subprotocol the client offers, so negotiation is visible end to end.
    let protocol = req
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.split(',').next())
        .map(|s| s.trim().to_string());
    let whoami = {
        let (p, _) = clone_parts(&req);
        describe(&b, peer, &p)
    };
    let path_q = req.uri().query().unwrap_or("").to_string();
    let on_upgrade = hyper::upgrade::on(&mut req);
    let b2 = b.clone();
    tokio::spawn(async move {
        let Ok(up) = on_upgrade.await else { return };
        let cfg = WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, Some(cfg)).await;
        let session = async {
            match b2.kind {
                Kind::Echo => echo(ws, whoami, &restarts).await,
                Kind::Ticker => ticker(ws, &b2.name, &path_q).await,
            }
        };
        tokio::select! {
            _ = session => {}
            _ = kill.cancelled() => {}
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()).boxed_unsync());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(p) = protocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    Ok(resp)
}

fn clone_parts<B>(req: &Request<B>) -> (http::request::Parts, ()) {
    let mut r = Request::new(());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.headers_mut() = req.headers().clone();
    r.into_parts()
}

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

async fn echo(mut ws: Ws, whoami: String, restarts: &Restarts) {
    let mut generation = restarts.generation.subscribe();
    loop {
        let msg = tokio::select! {
            m = ws.next() => match m {
                Some(Ok(m)) => m,
                _ => return,
            },
            _ = generation.changed() => {
                // Going down for a redeploy, as a well-behaved server does.
                let _ = ws
                    .close(Some(CloseFrame {
                        code: CloseCode::Restart,
                        reason: "demo backend restarting".into(),
                    }))
                    .await;
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .await;
                return;
            }
        };
        let reply = match msg {
            Message::Text(t) if t.as_str() == "/whoami" => Message::text(whoami.clone()),
            Message::Text(t) if t.as_str() == "/restart" => {
                restarts.restart();
                continue;
            }
            Message::Text(t) if t.starts_with("/close ") => {
                let mut it = t.as_str()[7..].splitn(2, ' ');
                let code = it
                    .next()
                    .and_then(|c| c.parse::<u16>().ok())
                    .unwrap_or(1000);
                let reason = it.next().unwrap_or("").to_string();
                let _ = ws
                    .close(Some(CloseFrame {
                        code: CloseCode::from(code),
                        reason: reason.into(),
                    }))
                    .await;
                // Drain until the client's close reply arrives.
                while let Some(Ok(_)) = ws.next().await {}
                return;
            }
            m @ (Message::Text(_) | Message::Binary(_)) => m,
            // Pings are answered by tungstenite itself; a close is echoed by it too.
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            return;
        }
    }
}

async fn ticker(mut ws: Ws, name: &str, query: &str) {
    let pair = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("pair="))
        .unwrap_or("EURUSD")
        .to_string();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut seq: u64 = 0;
    let mut price: f64 = 1.0850;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                seq += 1;
                // A deterministic wiggle: enough to look alive.
                price += ((seq * 7919 % 13) as f64 - 6.0) * 0.0001;
                let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
                let msg = format!("{{\"source\":\"{name}\",\"pair\":\"{pair}\",\"seq\":{seq},\"bid\":{price:.4},\"ts\":{ts}}}");
                if ws.send(Message::text(msg)).await.is_err() { return; }
            }
            m = ws.next() => match m {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    }
}

/// The config `upgate demo` runs: the file at `path`, or the repository's
/// routes.yaml built into the binary; self-signed certificates are made for
/// its TLS listeners when missing.
pub fn config(path: &Path) -> Result<Config, String> {
    let config = if path.exists() {
        Config::load(path).map_err(|e| e.to_string())?
    } else {
        eprintln!(
            "upgate: {} not found; using the embedded demo routes.yaml",
            path.display()
        );
        Config::parse(Path::new("routes.yaml"), EMBEDDED_ROUTES).map_err(|e| e.to_string())?
    };
    ensure_demo_jwt_key(&config)?;
    for l in &config.listeners {
        for c in l.tls.iter().flatten() {
            let made = crate::tls::ensure_dev_cert(&c.cert, &c.key).map_err(|e| {
                format!(
                    "cannot write a dev certificate to {}: {e}",
                    c.cert.display()
                )
            })?;
            if made {
                eprintln!(
                    "upgate: generated a self-signed certificate {} (key {})",
                    c.cert.display(),
                    c.key.display()
                );
            }
        }
    }
    Ok(config)
}

/// The demo's JWT signing key: a `file:` key named `demo-jwt.pem` in the
/// config, its private half beside it as `demo-jwt-key.pem`.
fn demo_jwt_files(config: &Config) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    use crate::config::auth::KeyKind;
    config
        .routes
        .iter()
        .filter_map(|r| r.auth.as_ref()?.jwt.as_ref())
        .flat_map(|j| j.keys.iter())
        .find_map(|k| match &k.kind {
            KeyKind::Pem(p) if p.file_name().is_some_and(|n| n == "demo-jwt.pem") => {
                Some((p.clone(), p.with_file_name("demo-jwt-key.pem")))
            }
            _ => None,
        })
}

/// Makes the demo's ES256 key pair when the config names it and it is missing.
fn ensure_demo_jwt_key(config: &Config) -> Result<(), String> {
    let Some((public, private)) = demo_jwt_files(config) else {
        return Ok(());
    };
    if public.exists() && private.exists() {
        return Ok(());
    }
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("cannot make the demo JWT key: {e}"))?;
    if let Some(dir) = public.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    std::fs::write(&public, kp.public_key_pem())
        .map_err(|e| format!("cannot write {}: {e}", public.display()))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(&private)
        .and_then(|mut f| std::io::Write::write_all(&mut f, kp.serialize_pem().as_bytes()))
        .map_err(|e| format!("cannot write {}: {e}", private.display()))?;
    eprintln!(
        "upgate: generated the demo JWT key pair {} (private: {})",
        public.display(),
        private.display()
    );
    Ok(())
}

/// A token the demo's protected route accepts (`sub: demo-user`, valid 24 h),
/// signed with the demo key; `None` when the config has no demo key.
pub fn demo_token(config: &Config) -> Option<String> {
    let (_, private) = demo_jwt_files(config)?;
    let pem = std::fs::read(private).ok()?;
    crate::auth::crypto::install();
    let key = jsonwebtoken::EncodingKey::from_ec_pem(&pem).ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    let claims = serde_json::json!({ "sub": "demo-user", "iat": now, "exp": now + 24 * 3600 });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &key,
    )
    .ok()
}

/// Starts the demo's echo backends and ticker feed until `stop`.
pub async fn start_all(stop: &CancellationToken) -> Result<(), String> {
    for (i, addr) in ECHO_ADDRS.iter().enumerate() {
        let b = Backend {
            name: format!("echo-{}", i + 1),
            kind: Kind::Echo,
        };
        spawn(addr, b, stop.clone())
            .await
            .map_err(|e| format!("demo backend on {addr}: {e}"))?;
    }
    let b = Backend {
        name: "ticker".into(),
        kind: Kind::Ticker,
    };
    spawn(TICKER_ADDR, b, stop.clone())
        .await
        .map_err(|e| format!("demo backend on {TICKER_ADDR}: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_makes_its_jwt_key_and_a_token_its_private_route_accepts() {
        let dir = std::env::temp_dir().join(format!("upgate-demo-jwt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let text = EMBEDDED_ROUTES.replace("certs/dev", "tls/dev");
        let config = Config::parse(&dir.join("routes.yaml"), &text).unwrap();
        ensure_demo_jwt_key(&config).unwrap();
        assert!(dir.join("certs/demo-jwt.pem").exists());
        let token = demo_token(&config).expect("a token");
        let route = config.routes.iter().find(|r| r.name == "private").unwrap();
        let jwt = crate::auth::jwt::Jwt::load(
            "private",
            route.auth.as_ref().unwrap().jwt.as_ref().unwrap(),
        )
        .unwrap();
        let uri: http::Uri = format!("/private?access_token={token}").parse().unwrap();
        let grant = futures_util::FutureExt::now_or_never(jwt.check(&uri, &http::HeaderMap::new()))
            .expect("no wait")
            .expect("the demo token is accepted");
        assert_eq!(grant.who.as_deref(), Some("demo-user"));
        // A second run keeps the key (tokens printed before stay valid).
        let before = std::fs::read(dir.join("certs/demo-jwt.pem")).unwrap();
        ensure_demo_jwt_key(&config).unwrap();
        assert_eq!(
            std::fs::read(dir.join("certs/demo-jwt.pem")).unwrap(),
            before
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
