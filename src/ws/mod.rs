//! WebSocket where upgate speaks it itself. This file: the handshake (RFC
//! 6455 §4.2.1) and the headers a proxy forwards, pure functions over `http`
//! types, tested without sockets. Beside it, upgate's own endpoint codec,
//! used by fan-out clients and `mode: frames` sessions: `frame` (encoding,
//! parsing, close codes, UTF-8 as it arrives), `reader` (a client's frames
//! assembled into messages) and `deflate` (RFC 7692).

pub mod deflate;
pub mod frame;
pub mod reader;

use std::net::SocketAddr;

use base64::Engine;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request};

/// Why an upgrade request is not a valid WebSocket handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("a WebSocket handshake must use GET")]
    NotGet,
    #[error("the `Upgrade` header must be `websocket`")]
    NotWebSocket,
    #[error("the `Connection` header must contain `upgrade`")]
    NoConnectionUpgrade,
    #[error("`Sec-WebSocket-Key` must be 16 bytes in base64")]
    BadKey,
    #[error("only WebSocket version 13 is supported")]
    UnsupportedVersion,
    /// RFC 9110 §7.8: Upgrade means nothing in HTTP/1.0, and RFC 6455 §4.1 asks for 1.1.
    #[error("a WebSocket handshake needs HTTP/1.1 or later (this request is HTTP/1.0)")]
    OldHttp,
}

/// Whether the request asks to switch to WebSocket: an HTTP/1.1 upgrade, or
/// an HTTP/2 extended CONNECT with `:protocol websocket` (RFC 8441). Other
/// upgrades (such as `h2c`) are ignored, as RFC 9110 allows, and the request
/// is proxied as plain HTTP.
pub fn wants_websocket<B>(req: &Request<B>) -> bool {
    is_h2_websocket(req) || has_token(req.headers(), header::UPGRADE, "websocket")
}

/// An HTTP/2 extended CONNECT for a WebSocket (RFC 8441): answered with
/// `200` instead of `101`, with no `Sec-WebSocket-Key`/`-Accept`.
pub fn is_h2_websocket<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// A fresh `Sec-WebSocket-Key` for the backend leg of an HTTP/2 client's
/// WebSocket (the client sends none). It only has to differ between
/// connections (RFC 6455 §4.1), so no cryptographic source is needed.
pub fn new_key() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let s = std::collections::hash_map::RandomState::new();
    let mut bytes = [0u8; 16];
    for (i, half) in bytes.chunks_mut(8).enumerate() {
        let mut h = s.build_hasher();
        h.write_u64(n);
        h.write_usize(i);
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| lists_token(v.as_bytes(), token.as_bytes()))
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
fn lists_token(value: &[u8], token: &[u8]) -> bool {
    // The usual value is the token alone (`Upgrade: websocket`).
    value.eq_ignore_ascii_case(token)
        || value
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Checks an HTTP/1.1 upgrade request against RFC 6455, or an HTTP/2
/// extended CONNECT against RFC 8441 (only the version header applies).
pub fn validate<B>(req: &Request<B>) -> Result<(), HandshakeError> {
    let h = req.headers();
    if is_h2_websocket(req) {
        return version_13(h);
    }
    if req.version() < http::Version::HTTP_11 {
        return Err(HandshakeError::OldHttp);
    }
    if req.method() != Method::GET {
        return Err(HandshakeError::NotGet);
    }
    if !has_token(h, header::UPGRADE, "websocket") {
        return Err(HandshakeError::NotWebSocket);
    }
    if !has_token(h, header::CONNECTION, "upgrade") {
        return Err(HandshakeError::NoConnectionUpgrade);
    }
    let key_ok = h.get(header::SEC_WEBSOCKET_KEY).is_some_and(|k| {
        let mut out = [0u8; 18];
        k.len() == 24
            && base64::engine::general_purpose::STANDARD
                .decode_slice(k.as_bytes(), &mut out)
                .is_ok_and(|n| n == 16)
    });
    if !key_ok {
        return Err(HandshakeError::BadKey);
    }
    version_13(h)
}

fn version_13(h: &HeaderMap) -> Result<(), HandshakeError> {
    if h.get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err(HandshakeError::UnsupportedVersion);
    }
    Ok(())
}

/// Names that describe one hop and are never forwarded: RFC 9110 §7.6.1's
/// list, `Keep-Alive` and `Proxy-Connection` (lower case, as `HeaderName`
/// keeps them).
const HOP_NAMES: [&str; 9] = [
    "connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "keep-alive",
    "proxy-connection",
];

/// Whether `name` (lower case) is one of [`HOP_NAMES`].
fn always_hop_by_hop(name: &str) -> bool {
    HOP_NAMES.contains(&name)
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the names present, no lookup per hop-by-hop name.
    let hop = HopByHop::of(h);
    let gone: Vec<HeaderName> = h.keys().filter(|n| hop.contains(n)).cloned().collect();
    for n in gone {
        h.remove(n);
    }
}

/// Who asked, as the backend should be told.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded<'a> {
    pub peer: SocketAddr,
    pub tls: bool,
    pub host: Option<&'a str>,
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Appends `X-Forwarded-For` and `Forwarded`, and sets `X-Forwarded-Proto` and `X-Forwarded-Host`.
pub fn add_forwarded(h: &mut HeaderMap, f: Forwarded<'_>) {
    let v = forwarded_values(h, &HopByHop::of(h), f);
    let mut xff = Vec::new();
    v.write_xff(&mut xff);
    let mut fwd = Vec::new();
    v.write_fwd(&mut fwd);
    let (proto, host) = (
        v.proto,
        v.host.and_then(|host| HeaderValue::from_str(host).ok()),
    );
    if let Ok(xff) = HeaderValue::from_maybe_shared(bytes::Bytes::from(xff)) {
        h.insert(X_FORWARDED_FOR, xff);
    }
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(host) = host {
        h.insert(X_FORWARDED_HOST, host);
    }
    if let Ok(fwd) = HeaderValue::from_maybe_shared(bytes::Bytes::from(fwd)) {
        h.insert(header::FORWARDED, fwd);
    }
}

/// What [`add_forwarded`] sets, given the client's headers: the parts,
/// borrowed, so the direct path writes them straight into the backend's
/// head (no buffer of their own).
struct ForwardedValues<'a> {
    /// The client's `X-Forwarded-For` and `Forwarded`, appended to.
    prev_xff: Option<&'a str>,
    prev_fwd: Option<&'a str>,
    /// The client's address as text: `ip[..ip_len]`.
    ip: [u8; 48],
    ip_len: usize,
    v6: bool,
    proto: &'static str,
    /// For `X-Forwarded-Host`.
    host: Option<&'a str>,
    /// For `Forwarded: host="…"` (no quote or backslash to escape).
    fwd_host: Option<&'a str>,
}

impl<'a> ForwardedValues<'a> {
    /// `prev_xff`, `prev_fwd`: the client's first `X-Forwarded-For` and
    /// `Forwarded` values, when they are forwarded.
    fn new(
        prev_xff: Option<&'a str>,
        prev_fwd: Option<&'a str>,
        f: Forwarded<'a>,
    ) -> ForwardedValues<'a> {
        let ip = f.peer.ip();
        // The address as text once, on the stack (this runs on every upgrade).
        let mut text = [0u8; 48];
        let ip_len = ip_text(ip, &mut text).len();
        ForwardedValues {
            prev_xff,
            prev_fwd,
            ip: text,
            ip_len,
            v6: ip.is_ipv6(),
            proto: if f.tls { "https" } else { "http" },
            host: f.host.filter(|host| value_ok(host.as_bytes())),
            fwd_host: f.host.filter(|host| {
                host.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
            }),
        }
    }

    fn ip(&self) -> &[u8] {
        self.ip.get(..self.ip_len).unwrap_or_default()
    }

    /// `X-Forwarded-For`'s value.
    fn write_xff(&self, out: &mut Vec<u8>) {
        if let Some(prev) = self.prev_xff {
            out.extend_from_slice(prev.as_bytes());
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(self.ip());
    }

    /// `Forwarded`'s value (RFC 7239).
    fn write_fwd(&self, out: &mut Vec<u8>) {
        if let Some(prev) = self.prev_fwd {
            out.extend_from_slice(prev.as_bytes());
            out.extend_from_slice(b", ");
        }
        if self.v6 {
            out.extend_from_slice(b"for=\"[");
            out.extend_from_slice(self.ip());
            out.extend_from_slice(b"]\"");
        } else {
            out.extend_from_slice(b"for=");
            out.extend_from_slice(self.ip());
        }
        out.extend_from_slice(b";proto=");
        out.extend_from_slice(self.proto.as_bytes());
        if let Some(host) = self.fwd_host {
            out.extend_from_slice(b";host=\"");
            out.extend_from_slice(host.as_bytes());
            out.push(b'"');
        }
    }
}

/// `hop`: what is hop-by-hop in `h`, looked up by the caller once.
fn forwarded_values<'a>(
    h: &'a HeaderMap,
    hop: &HopByHop<'_>,
    f: Forwarded<'a>,
) -> ForwardedValues<'a> {
    // (A value the client's `Connection` names is not forwarded, so not appended to.)
    let prev = |name: &HeaderName| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|_| !hop.contains(name))
    };
    ForwardedValues::new(prev(&X_FORWARDED_FOR), prev(&header::FORWARDED), f)
}

/// Whether `v` is a valid header value, as `HeaderValue::from_bytes` decides
/// (visible ASCII, obs-text, spaces and tabs), without making one.
pub fn value_ok(v: &[u8]) -> bool {
    v.iter().all(|&b| (b >= 32 && b != 127) || b == b'\t')
}

/// The request head for a WebSocket upgrade to a backend, written straight
/// from the client's headers: the same headers as stripping the
/// hop-by-hop ones from a copy, [`add_forwarded`], `Connection: upgrade`,
/// `Upgrade: websocket` and `host`, without building that copy (the direct
/// path, every upgrade). `host` must be a valid header value.
pub fn upgrade_request_head(
    path: &str,
    src: &HeaderMap,
    f: Forwarded<'_>,
    host: Option<&str>,
) -> Vec<u8> {
    let hop = HopByHop::of(src);
    let mut out = Vec::with_capacity(256 + path.len() + src.len() * 48);
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = host {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // The client's `X-Forwarded-For` and `Forwarded` (their first values)
    // are found on the way, appended to below.
    let (mut prev_xff, mut prev_fwd) = (None, None);
    let forwarded_host = f.host.is_some_and(|host| value_ok(host.as_bytes()));
    for (name, value) in src {
        let replaced = match name.as_str() {
            "host" | "x-forwarded-proto" => true,
            n @ "x-forwarded-host" => forwarded_host || hop.lists(n),
            n @ "x-forwarded-for" => {
                if !hop.lists(n) {
                    prev_xff.get_or_insert(value);
                }
                true
            }
            n @ "forwarded" => {
                if !hop.lists(n) {
                    prev_fwd.get_or_insert(value);
                }
                true
            }
            n => always_hop_by_hop(n) || hop.lists(n),
        };
        if replaced {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let v = ForwardedValues::new(
        prev_xff.and_then(|v: &HeaderValue| v.to_str().ok()),
        prev_fwd.and_then(|v: &HeaderValue| v.to_str().ok()),
        f,
    );
    out.extend_from_slice(b"connection: upgrade\r\nupgrade: websocket\r\nx-forwarded-for: ");
    v.write_xff(&mut out);
    out.extend_from_slice(b"\r\nx-forwarded-proto: ");
    out.extend_from_slice(v.proto.as_bytes());
    if let Some(host) = v.host {
        out.extend_from_slice(b"\r\nx-forwarded-host: ");
        out.extend_from_slice(host.as_bytes());
    }
    out.extend_from_slice(b"\r\nforwarded: ");
    v.write_fwd(&mut out);
    out.extend_from_slice(b"\r\n\r\n");
    out
}

/// What is hop-by-hop in one request: [`always_hop_by_hop`], and the names
/// its `Connection` header lists. The `Connection` header is looked up
/// once per request, not once per header, and read per header only when
/// it lists a name beyond the fixed ones (`Connection: Upgrade` and
/// `Connection: keep-alive, Upgrade` name none).
struct HopByHop<'a> {
    connection: http::header::GetAll<'a, HeaderValue>,
    /// Whether `connection` lists a name `always_hop_by_hop` does not cover.
    more: bool,
}

impl<'a> HopByHop<'a> {
    fn of(h: &'a HeaderMap) -> HopByHop<'a> {
        let connection = h.get_all(header::CONNECTION);
        let more = connection.iter().any(|v| {
            v.as_bytes().split(|b| *b == b',').any(|t| {
                let t = t.trim_ascii();
                !t.is_empty()
                    && !HOP_NAMES
                        .iter()
                        .any(|n| t.eq_ignore_ascii_case(n.as_bytes()))
            })
        });
        HopByHop { connection, more }
    }

    fn contains(&self, name: &HeaderName) -> bool {
        always_hop_by_hop(name.as_str()) || self.lists(name.as_str())
    }

    /// Whether the `Connection` header lists `name` (lower case).
    fn lists(&self, name: &str) -> bool {
        self.more
            && self
                .connection
                .iter()
                .any(|v| lists_token(v.as_bytes(), name.as_bytes()))
    }
}

/// `ip` as text in `buf`: dotted decimal written by hand for IPv4 (every
/// upgrade), the standard form for IPv6.
fn ip_text(ip: std::net::IpAddr, buf: &mut [u8; 48]) -> &[u8] {
    match ip {
        std::net::IpAddr::V4(a) => {
            let mut n = 0;
            for (i, octet) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    buf[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    buf[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                buf[n] = b'0' + octet % 10;
                n += 1;
            }
            &buf[..n]
        }
        std::net::IpAddr::V6(a) => {
            use std::io::Write;
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            // An IPv6 address is at most 45 characters: it fits.
            let n = match write!(cursor, "{a}") {
                Ok(()) => cursor.position() as usize,
                Err(_) => 0,
            };
            &buf[..n]
        }
    }
}

/// The values of query parameter `name` in `uri`, in order (raw, not percent-decoded).
pub fn query_values<'a>(uri: &'a http::Uri, name: &'a str) -> impl Iterator<Item = &'a str> {
    uri.query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(move |kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then_some(v)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_direct_upgrade_head_carries_what_the_header_map_path_sends() {
        use crate::fuzzing::{header_set, map_path_head};
        let cases: &[&[(&str, &str)]] = &[
            &[
                ("host", "chat.example"),
                ("upgrade", "websocket"),
                ("connection", "Upgrade"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("sec-websocket-version", "13"),
            ],
            &[
                ("host", "a"),
                ("connection", "keep-alive, Upgrade, X-Trace"),
                ("x-trace", "1"),
                ("te", "trailers"),
                ("proxy-connection", "x"),
                ("keep-alive", "5"),
                ("cookie", "a=1"),
                ("cookie", "b=2"),
            ],
            &[
                ("host", "a"),
                ("x-forwarded-for", "10.0.0.1"),
                ("x-forwarded-for", "10.0.0.2"),
                ("forwarded", "for=10.0.0.1"),
                ("x-forwarded-host", "old"),
                ("x-forwarded-proto", "https"),
            ],
            &[("host", "with space\tand tab"), ("x-forwarded-host", "old")],
            &[
                ("host", "a"),
                ("connection", "x-forwarded-for, forwarded"),
                ("x-forwarded-for", "1.1.1.1"),
                ("forwarded", "for=1.1.1.1"),
            ],
            &[("connection", "upgrade"), ("upgrade", "websocket")],
            &[
                ("host", "a"),
                ("connection", "Keep-Alive, UPGRADE, X-Forwarded-For"),
                ("x-forwarded-for", "1.1.1.1"),
                ("forwarded", "for=2.2.2.2"),
                ("keep-alive", "5"),
            ],
            &[
                ("connection", "X-Forwarded-Host, upgrade"),
                ("x-forwarded-host", "old"),
            ],
            &[
                ("host", "a"),
                ("connection", " TE ,close,, Upgrade"),
                ("close", "x"),
                ("te", "trailers"),
                ("x-kept", "1"),
            ],
        ];
        let peers = [
            "192.0.2.7:5000",
            "[2001:db8::1]:443",
            "0.0.0.0:1",
            "255.255.255.255:9",
        ];
        for (i, case) in cases.iter().enumerate() {
            let mut src = HeaderMap::new();
            for (n, v) in case.iter() {
                src.append(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_bytes(v.as_bytes()).unwrap(),
                );
            }
            let host = src.get(header::HOST).and_then(|h| h.to_str().ok());
            for (j, peer) in peers.iter().enumerate() {
                let f = Forwarded {
                    peer: peer.parse().unwrap(),
                    tls: j % 2 == 1,
                    host,
                };
                let direct = upgrade_request_head("/p?q=1", &src, f, Some("backend:9000"));
                let via_map = map_path_head("/p?q=1", &src, f, "backend:9000");
                assert!(direct.starts_with(b"GET /p?q=1 HTTP/1.1\r\n"));
                assert_eq!(
                    header_set(&direct),
                    header_set(&via_map),
                    "case {i}, peer {peer}"
                );
            }
        }
    }

    #[test]
    fn the_fixed_hop_by_hop_names_are_one_list() {
        for n in HOP_NAMES {
            assert!(always_hop_by_hop(n), "{n}");
        }
        for n in [
            "host",
            "upgrade-insecure-requests",
            "t",
            "tes",
            "connections",
        ] {
            assert!(!always_hop_by_hop(n), "{n}");
        }
        assert!(lists_token(b"websocket", b"websocket"));
        assert!(lists_token(b"WebSocket", b"websocket"));
        assert!(lists_token(b"h2c, websocket ", b"websocket"));
        assert!(!lists_token(b"websockets", b"websocket"));
        assert!(!lists_token(b"", b"websocket"));
    }

    #[test]
    fn ip_text_writes_every_octet_width() {
        let mut buf = [0u8; 48];
        for (ip, want) in [
            ("0.0.0.0", "0.0.0.0"),
            ("10.20.100.255", "10.20.100.255"),
            ("2001:db8::1", "2001:db8::1"),
            ("::ffff:1.2.3.4", "::ffff:1.2.3.4"),
            (
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            ),
        ] {
            assert_eq!(ip_text(ip.parse().unwrap(), &mut buf), want.as_bytes());
        }
    }

    fn req() -> http::request::Builder {
        Request::get("/chat")
            .header("upgrade", "WebSocket")
            .header("connection", "keep-alive, Upgrade")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13")
    }

    #[test]
    fn accepts_a_valid_handshake() {
        assert_eq!(validate(&req().body(()).unwrap()), Ok(()));
    }

    #[test]
    fn rejects_each_broken_part() {
        let mut r = req().body(()).unwrap();
        *r.method_mut() = Method::POST;
        assert_eq!(validate(&r), Err(HandshakeError::NotGet));
        let mut r = req().body(()).unwrap();
        r.headers_mut()
            .insert("upgrade", HeaderValue::from_static("h2c"));
        assert_eq!(validate(&r), Err(HandshakeError::NotWebSocket));
        let mut r = req().body(()).unwrap();
        r.headers_mut()
            .insert("connection", HeaderValue::from_static("keep-alive"));
        assert_eq!(validate(&r), Err(HandshakeError::NoConnectionUpgrade));
        for bad in [
            "short",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZSE=",
            "!!!!!!!!!!!!!!!!!!!!!!==",
        ] {
            let mut r = req().body(()).unwrap();
            r.headers_mut()
                .insert("sec-websocket-key", HeaderValue::from_static(bad));
            assert_eq!(validate(&r), Err(HandshakeError::BadKey), "{bad}");
        }
        let mut r = req().body(()).unwrap();
        r.headers_mut().remove("sec-websocket-key");
        assert_eq!(validate(&r), Err(HandshakeError::BadKey));
        let mut r = req().body(()).unwrap();
        r.headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("8"));
        assert_eq!(validate(&r), Err(HandshakeError::UnsupportedVersion));
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("cookie", HeaderValue::from_static("a=b"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("cookie"));
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        let peer: SocketAddr = "[::1]:5555".parse().unwrap();
        add_forwarded(
            &mut h,
            Forwarded {
                peer,
                tls: true,
                host: Some("chat.example.com"),
            },
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, ::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "chat.example.com");
        assert_eq!(
            h["forwarded"],
            "for=\"[::1]\";proto=https;host=\"chat.example.com\""
        );
    }
}
