//! A connection's first bytes, read by the server itself: the HTTP/2
//! preface, or the first HTTP/1.1 request head, parsed into an
//! `http::Request` whose header values share the read buffer.
//!
//! A WebSocket upgrade on a splice route is then served without hyper
//! (`proxy::direct`); everything else is handed to hyper with these bytes
//! put back in front of the socket, so hyper sees the connection exactly as
//! the client sent it, and answers a malformed or oversized head itself.

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Most headers the direct path parses; a head with more goes to hyper
/// (which answers it by `max_headers`).
const MAX_HEADERS: usize = 128;

/// What a connection opened with. (Returned once per connection, inside a
/// boxed future: boxing the request would only add an allocation.)
#[allow(clippy::large_enum_variant)]
pub(super) enum First {
    /// A complete HTTP/1.1 request head, parsed; `raw` holds every byte
    /// read, the head's `len` first.
    Head {
        req: Request<()>,
        raw: Bytes,
        len: usize,
    },
    /// The HTTP/2 preface (`PRI`), with the bytes read.
    H2(Bytes),
    /// For hyper: a head that does not parse or that `http` refuses, one
    /// over the limits, or the end of the stream before a head's end.
    Other(Bytes),
}

/// Reads until the first request head is complete (or it is clear that
/// hyper should see the connection). `h2`: whether the HTTP/2 preface is
/// possible (plain TCP; over TLS, ALPN decided). `max_bytes` and
/// `max_headers` are the server's limits: past them, hyper answers 431.
pub(super) async fn read_first<I: AsyncRead + Unpin>(
    io: &mut I,
    h2: bool,
    max_bytes: usize,
    max_headers: usize,
) -> std::io::Result<First> {
    let mut buf = BytesMut::with_capacity(2048);
    loop {
        if io.read_buf(&mut buf).await? == 0 {
            return Ok(First::Other(buf.freeze()));
        }
        if h2 {
            match &buf[..] {
                [b'P'] | [b'P', b'R'] => continue,
                [b'P', b'R', b'I', ..] => return Ok(First::H2(buf.freeze())),
                _ => {}
            }
        }
        // Parsed once, from the frozen buffer the header values then share.
        let raw = buf.freeze();
        match parse(&raw, max_headers) {
            Parsed::Head(req, len) => return Ok(First::Head { req, raw, len }),
            Parsed::Partial if raw.len() <= max_bytes => {}
            Parsed::Partial | Parsed::Other => return Ok(First::Other(raw)),
        }
        buf = raw
            .try_into_mut()
            .unwrap_or_else(|raw| BytesMut::from(&raw[..]));
        if buf.len() == buf.capacity() {
            buf.reserve(buf.len().min(max_bytes));
        }
    }
}

/// A parse of what was read so far.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    /// A complete head the direct path may take, and its length.
    Head(Request<()>, usize),
    /// Not complete yet.
    Partial,
    /// For hyper.
    Other,
}

/// The request head at the start of `raw`: `Other` for one hyper should
/// answer (malformed; a method other than GET, HTTP/1.0, a URI or a header
/// `http` refuses).
fn parse(raw: &Bytes, max_headers: usize) -> Parsed {
    // Left uninitialised: httparse writes the ones it fills (zeroing the
    // whole array cost more than parsing a typical upgrade's headers).
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let n = max_headers.min(MAX_HEADERS);
    let mut p = httparse::Request::new(&mut []);
    let len = match p.parse_with_uninit_headers(raw, &mut headers[..n]) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    build(raw, &p).map_or(Parsed::Other, |req| Parsed::Head(req, len))
}

/// Only what a WebSocket upgrade can be: a GET over HTTP/1.1 in origin form.
fn build(raw: &Bytes, p: &httparse::Request<'_, '_>) -> Option<Request<()>> {
    if p.method != Some("GET") || p.version != Some(1) {
        return None;
    }
    let path = p.path.filter(|path| path.starts_with('/'))?;
    let mut req = Request::new(());
    *req.method_mut() = Method::GET;
    *req.version_mut() = Version::HTTP_11;
    *req.uri_mut() = Uri::from_maybe_shared(raw.slice_ref(path.as_bytes())).ok()?;
    let map = req.headers_mut();
    map.reserve(p.headers.len());
    for h in p.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_maybe_shared(raw.slice_ref(h.value)).ok()?;
        map.append(name, value);
    }
    Some(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn first(chunks: &[&[u8]], h2: bool) -> First {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let chunks: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for c in chunks {
                b.write_all(&c).await.unwrap();
                tokio::task::yield_now().await;
            }
            // Dropped: what was written stays readable, then the end of the stream.
        });
        let f = read_first(&mut a, h2, 16 << 10, 100).await.unwrap();
        writer.await.unwrap();
        f
    }

    #[tokio::test]
    async fn a_head_in_pieces_is_parsed_with_what_follows_it_kept() {
        let f = first(
            &[
                b"GET /chat?room=1 HTTP/1.1\r\nHo",
                b"st: example.com\r\nUpgrade: websocket\r\nX-A: 1\r\nX-A: 2\r\n\r",
                b"\n\x81\x00",
            ],
            true,
        )
        .await;
        let First::Head { req, raw, len } = f else {
            panic!("not a head")
        };
        assert_eq!(req.uri().path(), "/chat");
        assert_eq!(req.uri().query(), Some("room=1"));
        assert_eq!(req.headers()["host"], "example.com");
        assert_eq!(req.headers().get_all("x-a").iter().count(), 2);
        assert_eq!(&raw[len..], b"\x81\x00");
    }

    #[tokio::test]
    async fn the_http2_preface_is_told_apart_from_the_first_byte_on() {
        assert!(
            matches!(first(&[b"P", b"R", b"I * HTTP/2.0\r\n"], true).await, First::H2(b) if &b[..] == b"PRI * HTTP/2.0\r\n")
        );
        // Over TLS, ALPN decided: a PRI head is hyper's to refuse.
        assert!(matches!(
            first(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"], false).await,
            First::Other(_)
        ));
        assert!(matches!(
            first(&[b"PUT / HTTP/1.1\r\n\r\n"], true).await,
            First::Other(_)
        ));
    }

    #[tokio::test]
    async fn what_the_direct_path_does_not_take_goes_to_hyper_whole() {
        let cases: &[&[u8]] = &[
            b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a",
            b"\r\n\r\n",
        ];
        for c in cases {
            match first(&[c], true).await {
                First::Other(b) => assert_eq!(&b[..], *c),
                _ => panic!("{:?} taken", String::from_utf8_lossy(c)),
            }
        }
    }

    #[tokio::test]
    async fn a_head_over_the_limits_goes_to_hyper() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(20_000, b'a');
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let w = tokio::spawn(async move { b.write_all(&big).await.map(|_| b) });
        match read_first(&mut a, true, 16 << 10, 100).await.unwrap() {
            First::Other(b) => assert!(b.len() > 16 << 10),
            _ => panic!("an oversized head was taken"),
        }
        drop(w);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..5 {
            many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        b.write_all(&many).await.unwrap();
        assert!(matches!(
            read_first(&mut a, true, 16 << 10, 4).await.unwrap(),
            First::Other(_)
        ));
    }
}
