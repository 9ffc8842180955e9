//! Entry points for the fuzz targets in `fuzz/` (one per parser of bytes a
//! peer controls). Each takes arbitrary bytes and must return without
//! panicking; the few checks here are the parsers' own promises (a frame
//! stays inside its buffer, a size stays under its limit). Not a public API.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Request};

/// The PROXY protocol header (v1 and v2) at the start of a connection.
pub fn proxy_header(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    if let Ok(crate::server::proxy_protocol::Parsed::Complete(h)) =
        crate::server::proxy_protocol::parse(data)
    {
        assert!(h.len <= data.len(), "header longer than its input");
    }
}

/// A fan-out client's frames, fed in pieces of the size the first byte picks
/// (so frames straddle reads), with and without permessage-deflate.
pub fn client_frames(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(first & 0x3f) + 1;
    let deflate = first & 0x40 != 0;
    let max = if first & 0x80 != 0 { 125 } else { 64 * 1024 };
    let mut r = crate::ws::reader::Reader::new(Vec::new(), max, deflate);
    for piece in rest.chunks(step) {
        r.inbuf.extend_from_slice(piece);
        while let Some(input) = r.next_input() {
            match input {
                crate::ws::reader::Input::Bad(_) => return,
                crate::ws::reader::Input::Message(_, p, _) => {
                    assert!(p.len() <= max, "message over max_message")
                }
                crate::ws::reader::Input::Ping(p) => assert!(p.len() <= 125),
                crate::ws::reader::Input::Close(_) => {}
            }
        }
    }
}

/// The splice's frame watch (close codes for the access log), in pieces:
/// fed in pieces (headers straddling reads) it must see what it sees fed
/// at once (headers read in place).
pub fn frame_watch(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mut pieces = crate::session::FrameWatch::default();
    for piece in rest.chunks(usize::from(first) + 1) {
        pieces.feed(piece);
    }
    let mut whole = crate::session::FrameWatch::default();
    whole.feed(rest);
    assert_eq!(pieces.seen, whole.seen, "close seen differs by read sizes");
    assert_eq!(
        pieces.messages, whole.messages,
        "messages differ by read sizes"
    );
    if pieces.seen.is_none() {
        assert_eq!(pieces.to_boundary(), whole.to_boundary());
    }
}

/// permessage-deflate data from a client, inflated under a limit.
pub fn inflate(data: &[u8]) {
    const MAX: usize = 64 * 1024;
    if let Ok(out) = crate::ws::deflate::inflate(data, MAX) {
        assert!(out.len() <= MAX, "inflated past the limit");
    }
}

/// A backend's answer to an upgrade (head and refusal body), as the
/// gateway reads it from a socket.
pub fn upgrade_answer(data: &[u8]) {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime");
    }
    RT.with(|rt| {
        rt.block_on(async {
            let head = b"GET / HTTP/1.1\r\n\r\n";
            for raw_101 in [false, true] {
                let mut io = tokio::io::join(data, tokio::io::sink());
                let answer = crate::backend::upgrade::exchange_with(
                    &mut io,
                    head,
                    Duration::from_secs(5),
                    16 * 1024,
                    raw_101,
                )
                .await;
                // A 101 relayed as it came is exactly the start of what the backend sent.
                if let Ok(a) = answer {
                    if let Some(h) = a.head {
                        assert!(raw_101 && data.starts_with(&h) && a.headers.is_empty());
                    }
                }
            }
        })
    });
}

/// upgate's own checks on a request head, in both forms a WebSocket comes
/// in: an HTTP/1.1 upgrade, and an HTTP/2 extended CONNECT (RFC 8441) with
/// `:protocol` (hyper and h2 parse the frames; what follows is ours):
/// handshake validation, the Origin check, forwarded headers, the query.
pub fn request_head(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mut raw = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Request::new(&mut raw);
    let Ok(httparse::Status::Complete(_)) = parsed.parse(rest) else {
        return;
    };
    let h2 = first & 1 != 0;
    let mut req = Request::builder()
        .method(if h2 {
            Method::CONNECT
        } else {
            Method::from_bytes(parsed.method.unwrap_or("GET").as_bytes()).unwrap_or(Method::GET)
        })
        .uri(parsed.path.unwrap_or("/"))
        .version(if h2 {
            http::Version::HTTP_2
        } else if parsed.version == Some(0) {
            http::Version::HTTP_10
        } else {
            http::Version::HTTP_11
        });
    for h in parsed.headers.iter() {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            req = req.header(n, v);
        }
    }
    let Ok(mut req) = req.body(()) else {
        return;
    };
    if h2 {
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
    }
    let _ = crate::ws::wants_websocket(&req);
    let _ = crate::ws::validate(&req);
    let _ = crate::ws::deflate::negotiate(req.headers());
    if let Some(o) = req
        .headers()
        .get(http::header::ORIGIN)
        .and_then(|o| o.to_str().ok())
    {
        let allowed: Vec<crate::config::origin::OriginPattern> =
            ["https://*.example.com", "http://a.test:8080", "null"]
                .iter()
                .filter_map(|p| crate::config::origin::OriginPattern::parse(p).ok())
                .collect();
        let _ = crate::config::origin::allowed(&allowed, o);
    }
    for v in crate::ws::query_values(req.uri(), "token") {
        let _ = v.len();
    }
    let forwarded = crate::ws::Forwarded {
        peer: ([127, 0, 0, 1], 4000).into(),
        tls: first & 2 != 0,
        host: req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok()),
    };
    let direct = crate::ws::upgrade_request_head("/", req.headers(), forwarded, Some("b:1"));
    assert!(direct.ends_with(b"\r\n\r\n"));
    // The direct head says what the header-map path says.
    let via_map = map_path_head("/", req.headers(), forwarded, "b:1");
    let sent = header_set(&direct);
    assert_eq!(sent, header_set(&via_map));
    // And no header the client's `Connection` names, or one that is always
    // hop-by-hop, is passed on (checked naively, token by token).
    let listed: Vec<String> = req
        .headers()
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|t| String::from_utf8_lossy(t.trim_ascii()).to_ascii_lowercase())
        .collect();
    const OURS: [&str; 7] = [
        "host",
        "connection",
        "upgrade",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
    ];
    const HOP: [&str; 7] = [
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "keep-alive",
        "proxy-connection",
    ];
    for (name, _) in &sent {
        if !OURS.contains(&name.as_str()) {
            assert!(!listed.contains(name), "{name} is listed in Connection");
            assert!(!HOP.contains(&name.as_str()), "{name} is hop-by-hop");
        }
    }
}

/// The backend's upgrade head as the header-map path builds it (hyper's
/// path): the client's headers copied, hop-by-hop ones stripped,
/// `add_forwarded`, then `Connection`, `Upgrade` and `Host` set. What
/// `ws::upgrade_request_head` must equal, header for header.
pub fn map_path_head(
    path: &str,
    src: &http::HeaderMap,
    f: crate::ws::Forwarded<'_>,
    host: &'static str,
) -> Vec<u8> {
    let mut h = src.clone();
    crate::ws::strip_hop_by_hop(&mut h);
    crate::ws::add_forwarded(&mut h, f);
    h.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(http::header::HOST, HeaderValue::from_static(host));
    let pq = path
        .parse::<http::uri::PathAndQuery>()
        .unwrap_or_else(|_| http::uri::PathAndQuery::from_static("/"));
    crate::backend::upgrade::request_head(pq.as_str(), &h)
}

/// A request head's headers, sorted (names lower case): what a backend sees.
pub fn header_set(head: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut raw = [httparse::EMPTY_HEADER; 80];
    let mut r = httparse::Request::new(&mut raw);
    assert!(matches!(r.parse(head), Ok(httparse::Status::Complete(_))));
    let mut v: Vec<_> = r
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect();
    v.sort();
    v
}

/// The server's own reading of a connection's first request (the direct
/// upgrade path), the bytes arriving in pieces of the sizes the first
/// byte picks: whatever it decides, every byte read is kept for hyper or
/// the session, in order.
pub fn first_head(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime");
    }
    let piece = usize::from(first % 16) + 1;
    RT.with(|rt| {
        rt.block_on(async {
            let mut b = tokio_test_io(rest, piece);
            let _ = crate::server::fuzz_first_head(&mut b, first & 0x80 != 0, rest).await;
        })
    });
}

/// `data` as a reader that hands out at most `piece` bytes per read.
fn tokio_test_io(data: &[u8], piece: usize) -> impl tokio::io::AsyncRead + Unpin + '_ {
    struct Pieces<'a>(&'a [u8], usize);
    impl tokio::io::AsyncRead for Pieces<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = self.0.len().min(self.1).min(buf.remaining());
            let (now, later) = self.0.split_at(n);
            buf.put_slice(now);
            self.0 = later;
            std::task::Poll::Ready(Ok(()))
        }
    }
    Pieces(data, piece)
}

/// `routes.yaml` text: parsed and validated, never a panic.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::config::Config::parse(std::path::Path::new("routes.yaml"), &text);
}

/// A JWKS document as an identity provider (or a JWKS file) serves it.
pub fn jwks(data: &[u8]) {
    if let Ok(keys) = crate::auth::jwks::parse(data) {
        assert!(keys.iter().all(|k| !k.algs.is_empty()));
    }
}

/// A request's token in every place upgate looks (Authorization, a cookie,
/// a query parameter, an offered subprotocol), split out of the input at
/// 0xff bytes, checked against an HMAC key: a refusal or a grant, never a
/// panic, and never the token in the refusal's words.
pub fn auth_token(data: &[u8]) {
    use crate::config::auth::{JwtConfig, OnExpiry, TokenSource};
    use futures_util::FutureExt;
    crate::auth::crypto::install();
    let mut parts = data.split(|b| *b == 0xff);
    let mut next = || parts.next().unwrap_or_default();
    let (auth, cookie, query, proto) = (next(), next(), next(), next());
    let cfg = JwtConfig {
        keys: Vec::new(),
        issuer: vec!["i".into()],
        audience: vec!["a".into()],
        leeway: Duration::from_secs(30),
        token_from: vec![
            TokenSource::Header,
            TokenSource::Cookie("s".into()),
            TokenSource::Query("t".into()),
            TokenSource::Subprotocol,
        ],
        forward_claims: vec![("sub".into(), "x-user".into())],
        require: vec![("role".into(), "r".into())],
        on_expiry: OnExpiry::Close,
        log_claim: Some("sub".into()),
        require_exp: true,
    };
    let Ok(key) = jsonwebtoken::DecodingKey::from_secret(b"fuzzing-secret-fuzzing-secret-32")
    else {
        return;
    };
    let key = crate::auth::jwt::Key {
        kid: None,
        algs: crate::auth::jwt::algs_for(&key),
        key,
    };
    let jwt = crate::auth::jwt::Jwt::from_keys(cfg, vec![key]);
    let mut headers = http::HeaderMap::new();
    for (name, v) in [
        (http::header::AUTHORIZATION, auth),
        (http::header::COOKIE, cookie),
        (http::header::SEC_WEBSOCKET_PROTOCOL, proto),
    ] {
        if let Ok(v) = HeaderValue::from_bytes(v) {
            headers.insert(name, v);
        }
    }
    let uri = std::str::from_utf8(query)
        .ok()
        .and_then(|q| format!("/p?{q}").parse::<http::Uri>().ok())
        .unwrap_or_else(|| http::Uri::from_static("/p"));
    let Some(r) = jwt.check(&uri, &headers).now_or_never() else {
        panic!("a check without JWKS URLs must not wait");
    };
    // A refusal's words are upgate's own, never a piece of the request.
    if let Err(refusal) = r {
        let d = refusal.description.as_str();
        let known = crate::auth::jwt::REFUSAL_TEXTS.contains(&d)
            || (d.starts_with("algorithm ") && d.ends_with(" is not allowed for this key"))
            || d == "the token's `role` claim does not allow this";
        assert!(known, "refusal text not upgate's own: {d}");
    }
}

/// The edge's TLS stream (its sans-IO core) against a real rustls client,
/// in memory. With the first byte's top bit clear, the rest is raw bytes
/// from a "client" (a hostile handshake, fed in pieces); set, a handshake
/// completes and the rest is a script of operations: the client writes,
/// updates its keys, closes, the wire is delivered in pieces of the sizes
/// the script picks (or with a flipped byte), the server reads into buffers
/// of those sizes and writes back. Plaintext must arrive whole and in order
/// both ways until a byte is flipped, and no buffer may outgrow its bound.
pub fn tls_stream(data: &[u8]) {
    use crate::tls::stream::{memory, Step};
    use std::io::{Read, Write};
    use tokio::io::ReadBuf;

    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let (mut core, mut client) = memory::pair();
    let mut space = [0u8; 256];
    if first & 0x80 == 0 {
        let step = usize::from(first & 0x3f) + 1;
        for piece in rest.chunks(step) {
            let Ok(room) = core.room() else { return };
            let n = piece.len().min(room.len());
            room[..n].copy_from_slice(&piece[..n]);
            core.received(n);
            let mut dst = ReadBuf::new(&mut space);
            if core.process(&mut dst).is_err() {
                return;
            }
            core.rest();
            core.check_bounds();
        }
        return;
    }
    if !memory::handshake(&mut core, &mut client) {
        panic!("the in-memory handshake failed");
    }
    let (mut sent_up, mut got_up) = (Vec::new(), Vec::new());
    let (mut sent_down, mut got_down) = (Vec::new(), Vec::new());
    let mut wire: Vec<u8> = Vec::new();
    let mut intact = true;
    let mut counter = 0u8;
    let mut key_updates = 0;
    let mut ops = rest.iter();
    while let Some(&op) = ops.next() {
        let arg = usize::from(ops.next().copied().unwrap_or(0));
        match op % 8 {
            0 if !client.is_handshaking() => {
                let bytes: Vec<u8> = (0..arg * 67)
                    .map(|_| {
                        counter = counter.wrapping_add(1);
                        counter
                    })
                    .collect();
                let n = client.writer().write(&bytes).unwrap_or(0);
                sent_up.extend_from_slice(&bytes[..n]);
                if n > 0 {
                    key_updates = 0;
                }
            }
            // rustls refuses a run of key updates with no data between
            // them (a peer misbehaving): the script stays below its limit.
            1 if key_updates < 4 => {
                if client.refresh_traffic_keys().is_ok() {
                    key_updates += 1;
                }
            }
            2 => {
                while client.wants_write() {
                    if client.write_tls(&mut wire).is_err() {
                        break;
                    }
                }
            }
            3 => {
                // Deliver up to `arg * 31 + 1` bytes of the wire to the server.
                let n = (arg * 31 + 1).min(wire.len());
                let mut piece: Vec<u8> = wire.drain(..n).collect();
                if arg == 255 && !piece.is_empty() {
                    piece[0] ^= 0x40;
                    intact = false;
                }
                let mut at = 0;
                while at < piece.len() {
                    let Ok(room) = core.room() else { return };
                    let k = (piece.len() - at).min(room.len());
                    room[..k].copy_from_slice(&piece[at..at + k]);
                    core.received(k);
                    at += k;
                }
                core.check_bounds();
            }
            4 => {
                let size = (arg % space.len()) + 1;
                loop {
                    let mut dst = ReadBuf::new(&mut space[..size]);
                    if !core.take_plain(&mut dst) {
                        match core.process(&mut dst) {
                            Ok(Step::Data) => {}
                            Ok(_) => {
                                got_up.extend_from_slice(dst.filled());
                                break;
                            }
                            Err(_) if !intact => return,
                            Err(e) => panic!("an intact stream failed: {e}"),
                        }
                    }
                    got_up.extend_from_slice(dst.filled());
                }
                core.rest();
                core.check_bounds();
            }
            5 => {
                let bytes = vec![arg as u8; arg * 131];
                match core.encrypt(&bytes) {
                    Ok(n) => sent_down.extend_from_slice(&bytes[..n]),
                    Err(_) if !intact || core.peer_closed() => return,
                    Err(e) => panic!("an intact stream failed to write: {e}"),
                }
            }
            6 => {
                let out = core.pending().to_vec();
                core.sent(out.len());
                let mut rd = &out[..];
                while !rd.is_empty() {
                    if client.read_tls(&mut rd).is_err() || client.process_new_packets().is_err() {
                        return;
                    }
                }
                let _ = client.reader().read_to_end(&mut got_down);
            }
            _ => {
                if arg == 0 {
                    client.send_close_notify();
                }
            }
        }
        if intact {
            assert!(
                sent_up.starts_with(&got_up),
                "the server read what the client did not send"
            );
            assert!(
                sent_down.starts_with(&got_down),
                "the client read what the server did not send"
            );
        }
    }
}
