//! Test builders: a gateway on port 0 from a YAML string, demo echo
//! backends, WebSocket and HTTP clients (plain and TLS). Everything binds
//! 127.0.0.1:0, so tests run in parallel in any order.
#![allow(dead_code)]

pub mod feed;
pub mod jwt;
pub mod process;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use upgate::server::Drained;
use upgate::{demo, Config, Gateway};

/// A running gateway; shut it down with [`TestGateway::shutdown`] (or drop it).
pub struct TestGateway {
    /// Bound addresses in config order.
    pub addrs: Vec<SocketAddr>,
    /// The admin listener, when configured.
    pub admin: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Drained>>,
}

impl TestGateway {
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }
    /// Triggers shutdown and waits for the drain to finish.
    pub async fn shutdown(mut self) -> Drained {
        self.trigger_shutdown();
        self.task
            .take()
            .expect("running")
            .await
            .expect("gateway task")
    }
    pub fn trigger_shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
    pub fn join(&mut self) -> JoinHandle<Drained> {
        self.task.take().expect("running")
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.trigger_shutdown();
    }
}

/// Starts a gateway from YAML text. Relative paths resolve against `dir`.
pub async fn gateway_in(dir: &std::path::Path, yaml: &str) -> TestGateway {
    let cfg =
        Config::parse(&dir.join("routes.yaml"), yaml).unwrap_or_else(|e| panic!("config: {e}"));
    let gw = Gateway::bind(&cfg)
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    start(gw)
}

fn start(gw: Gateway) -> TestGateway {
    let addrs = gw.local_addrs();
    let admin = gw.admin_addr();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(gw.run(async {
        let _ = rx.await;
    }));
    TestGateway {
        addrs,
        admin,
        stop: Some(tx),
        task: Some(task),
    }
}

/// Starts a gateway from a config file (so that it can be reloaded).
pub async fn gateway_file(path: &std::path::Path) -> TestGateway {
    let cfg = Config::load(path).unwrap_or_else(|e| panic!("config: {e}"));
    let gw = Gateway::bind(&cfg)
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    start(gw)
}

/// A request to the admin listener (`Authorization: Bearer token` when given).
pub async fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Reply {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    admin_request_with(addr, method, path, &headers).await
}

/// A request to the admin listener with `headers` (`Host` is the listener's
/// address unless given).
pub async fn admin_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let tcp = TcpStream::connect(addr).await.expect("connect admin");
    let mut req = http::Request::builder().method(method).uri(path);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", addr.to_string());
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    http1(tcp, req.body(String::new()).expect("request")).await
}

/// A loopback port held for a listener that a config names by number: a
/// socket bound (not listening) with `SO_REUSEPORT`, so upgate, which sets
/// it too, can bind the port while no other program can take it, and no
/// connection is ever queued on the test's socket. Released on drop.
pub struct ReservedPort {
    _socket: socket2::Socket,
    pub port: u16,
}

pub fn reserve_port() -> ReservedPort {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket.set_reuse_port(true).expect("SO_REUSEPORT");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    socket.bind(&any.into()).expect("bind 127.0.0.1:0");
    let port = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.port())
        .expect("a port");
    ReservedPort {
        _socket: socket,
        port,
    }
}

/// The value of the first `/metrics` series named `name` whose labels contain `labels`.
pub async fn metric(admin: SocketAddr, name: &str, labels: &str) -> u64 {
    let body = admin_request(admin, "GET", "/metrics", None).await.body;
    body.lines()
        .find(|l| l.starts_with(name) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}{{{labels}}} in\n{body}"))
}

/// Waits (polling `/metrics`, up to 10 s) until the series reads `want`.
pub async fn wait_metric(admin: SocketAddr, name: &str, labels: &str, want: u64) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let v = metric(admin, name, labels).await;
        if v == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}{{{labels}}} is {v}, not {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

pub async fn gateway(yaml: &str) -> TestGateway {
    gateway_in(std::path::Path::new("."), yaml).await
}

/// Demo backends that live as long as this value.
pub struct Backends {
    pub addrs: Vec<SocketAddr>,
    stop: CancellationToken,
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Backends {
    /// Stops these backends (their listeners close).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// Starts echo backends named `names` on ephemeral ports.
pub async fn echo_backends(names: &[&str]) -> Backends {
    let stop = CancellationToken::new();
    let mut addrs = Vec::new();
    for n in names {
        let b = demo::Backend {
            name: n.to_string(),
            kind: demo::Kind::Echo,
        };
        addrs.push(
            demo::spawn("127.0.0.1:0", b, stop.clone())
                .await
                .expect("backend"),
        );
    }
    Backends { addrs, stop }
}

/// An address on which nothing listens: connecting is refused.
pub async fn dead_addr() -> SocketAddr {
    dead_addrs(1).await[0]
}

/// `n` distinct addresses on which nothing listens. Each port stays bound
/// (never listening) until the test process exits, so no other test running
/// in parallel can be handed the same port and bring it to life.
pub async fn dead_addrs(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|_| {
            let sock = tokio::net::TcpSocket::new_v4().expect("socket");
            sock.bind("127.0.0.1:0".parse().expect("addr"))
                .expect("bind");
            let addr = sock.local_addr().expect("addr");
            std::mem::forget(sock); // hold the port for the life of the test process
            addr
        })
        .collect()
}

pub type Ws<S> = WebSocketStream<S>;

/// Opens a WebSocket to the gateway at `addr` with the given Host and path.
pub async fn ws(addr: SocketAddr, host: &str, path: &str) -> Ws<TcpStream> {
    ws_with(addr, host, path, &[])
        .await
        .expect("websocket handshake")
}

pub async fn ws_with(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Ws<TcpStream>, tokio_tungstenite::tungstenite::Error> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    ws_over(tcp, host, path, headers).await
}

pub async fn ws_over<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Ws<S>, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://{host}{path}").into_client_request()?;
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            http::HeaderValue::from_str(v).expect("value"),
        );
    }
    let cfg = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let (ws, _resp) = tokio_tungstenite::client_async_with_config(req, io, Some(cfg)).await?;
    Ok(ws)
}

/// Sends `text` and returns the next text reply.
pub async fn roundtrip<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut Ws<S>, text: &str) -> String {
    ws.send(Message::text(text)).await.expect("send");
    loop {
        match ws.next().await.expect("reply").expect("frame") {
            Message::Text(t) => return t.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The code of the next Close frame (other messages skipped), within `limit`.
pub async fn close_code<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut Ws<S>,
    limit: std::time::Duration,
) -> Option<u16> {
    tokio::time::timeout(limit, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                other => panic!("no Close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("closed in time")
}

/// Whether the session ends (close frame, EOF or error) within `limit`.
pub async fn ends_within<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut Ws<S>,
    limit: std::time::Duration,
) -> bool {
    tokio::time::timeout(limit, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// The backend name a `/whoami` reply starts with.
pub async fn whoami<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut Ws<S>) -> String {
    roundtrip(ws, "/whoami").await
}

pub fn backend_of(whoami: &str) -> &str {
    whoami
        .strip_prefix("backend=")
        .and_then(|s| s.split(' ').next())
        .unwrap_or("?")
}

/// A plain HTTP/1.1 response.
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

/// Sends one HTTP/1.1 request on a fresh connection.
pub async fn http1<S>(io: S, req: http::Request<String>) -> Reply
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let resp = send.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Reply {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let req = http::Request::get(path)
        .header("host", host)
        .body(String::new())
        .expect("request");
    http1(tcp, req).await
}

/// Sends raw bytes and returns everything the gateway answers until it closes or 2 s pass.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(bytes).await.expect("write");
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(2), tcp.read(&mut out))
        .await
        .expect("answer in time")
        .expect("read");
    String::from_utf8_lossy(&out[..n]).into_owned()
}

/// A self-signed certificate written into `dir`, returned as (cert path, key path, DER).
pub fn cert_files(
    dir: &std::path::Path,
    stem: &str,
    names: &[&str],
) -> (PathBuf, PathBuf, CertificateDer<'static>) {
    let (c, k) = upgate::tls::self_signed(names).expect("rcgen");
    let cp = dir.join(format!("{stem}.pem"));
    let kp = dir.join(format!("{stem}-key.pem"));
    std::fs::write(&cp, &c).expect("write cert");
    std::fs::write(&kp, &k).expect("write key");
    let der = CertificateDer::from_pem_slice(c.as_bytes()).expect("der");
    (cp, kp, der)
}

/// A TLS client config trusting only `roots`, with the given ALPN list.
pub fn client_config(
    roots: &[CertificateDer<'static>],
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}

/// TLS over `tcp` with `sni`, or the handshake's error.
pub async fn tls_over(
    tcp: TcpStream,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = ServerName::try_from(sni.to_string()).expect("sni");
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
}

/// TLS-connects to `addr` with `sni`, trusting only `roots`, with the given ALPN list.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    roots: &[CertificateDer<'static>],
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tls_over(tcp, sni, client_config(roots, alpn))
        .await
        .expect("TLS handshake")
}

/// The headless browser on PATH (Debian's `chromium`). Tests that call it
/// carry `#[cfg_attr(no_browser, ignore = …)]`: the build script marks them
/// ignored, visibly, on a machine without one.
pub fn chromium() -> &'static str {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("a chromium on PATH (the build script found one)")
}

/// The DOM of `url` after its scripts ran, from headless Chromium.
pub async fn browser_dom(url: &str) -> String {
    let out = headless(url, &["--dump-dom"]).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A PNG of `url` after its scripts ran (a `width`×`height` window), written to `png`.
pub async fn browser_screenshot(url: &str, png: &std::path::Path, width: u32, height: u32) {
    headless(
        url,
        &[
            &format!("--screenshot={}", png.display()),
            &format!("--window-size={width},{height}"),
            "--hide-scrollbars",
        ],
    )
    .await;
    let len = std::fs::metadata(png).map_or(0, |m| m.len());
    assert!(len > 10_000, "a screenshot of {url} at {}", png.display());
}

/// Runs headless Chromium on `url` with `args`; its stdout.
async fn headless(url: &str, args: &[&str]) -> Vec<u8> {
    let profile = TempDir::new("chromium");
    let out = tokio::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--ignore-certificate-errors",
            "--virtual-time-budget=5000",
        ])
        .args(args)
        .arg(format!("--user-data-dir={}", profile.0.display()))
        .arg(url)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), out)
        .await
        .expect("chromium finished in time")
        .expect("chromium ran");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A loopback HTTP/1.1 server answering every request with `200` and `body`
/// (`content-type` as given), keeping connections open; its address.
pub async fn static_http(content_type: &'static str, body: String) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let body: Arc<str> = body.into();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(reply.as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A server that answers every request head it reads with `reply`, byte
/// for byte (a broken or hostile backend), and keeps the connection open.
pub async fn raw_reply_server(reply: &'static [u8]) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// The status, `Retry-After` and body of a refused WebSocket handshake.
pub fn refusal(e: tokio_tungstenite::tungstenite::Error) -> (u16, String, String) {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) => (
            resp.status().as_u16(),
            resp.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).to_string(),
        ),
        e => panic!("expected an HTTP refusal, got {e}"),
    }
}

/// The empty body type for hyper requests that send none.
pub fn empty() -> Empty<bytes::Bytes> {
    Empty::new()
}

/// A unique scratch directory under the target dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("upgate-test-{}-{tag}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).expect("mkdir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
