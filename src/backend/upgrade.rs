//! The upgrade exchange with a backend, written by hand: one request head
//! out, one response head in (httparse), on the socket we connected.
//!
//! hyper's client would spawn a connection task and a request channel per
//! session and hand back a wrapped socket; this keeps the raw socket, costs
//! one write and usually one read, and leaves nothing behind once the
//! session starts. A backend that refuses the upgrade has its answer, body
//! included, relayed to the client.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::backend::BackendError;

/// Largest body of a refused upgrade that is relayed; a bigger one is a 502.
const MAX_REFUSAL_BODY: usize = 1 << 20;
const MAX_HEADERS: usize = 100;

/// The backend's answer to the upgrade request.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    /// Empty when `head` holds a 101 as it came.
    pub headers: HeaderMap,
    /// A 101's head as the backend sent it (status line to the blank line),
    /// when asked for by [`exchange_with`] and the answer is HTTP/1.1.
    pub head: Option<BytesMut>,
    /// After a 101: bytes the backend sent right behind its head.
    /// Otherwise: the response body.
    pub rest: Bytes,
}

/// Serialises the request head: `GET path HTTP/1.1` and the headers.
pub fn request_head(pq: &str, headers: &HeaderMap) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + headers.len() * 48);
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(pq.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Sends `head` and reads the answer within `timeout`; the response head may
/// be at most `max_head` bytes.
pub async fn exchange<S>(
    io: &mut S,
    head: &[u8],
    timeout: Duration,
    max_head: usize,
) -> Result<Answer, BackendError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    exchange_with(io, head, timeout, max_head, false).await
}

/// [`exchange`]; with `raw_101`, an HTTP/1.1 101 comes back as its head's
/// bytes (`Answer::head`) instead of a header map, for a caller that
/// relays it as it came (the direct path: no map built, none rendered).
pub async fn exchange_with<S>(
    io: &mut S,
    head: &[u8],
    timeout: Duration,
    max_head: usize,
    raw_101: bool,
) -> Result<Answer, BackendError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(timeout, async {
        io.write_all(head).await.map_err(BackendError::Io)?;
        io.flush().await.map_err(BackendError::Io)?;
        let mut buf = BytesMut::with_capacity(1024);
        let (status, headers, used) = loop {
            if io.read_buf(&mut buf).await.map_err(BackendError::Io)? == 0 {
                return Err(BackendError::Protocol(
                    "connection closed before a response",
                ));
            }
            if let Some(parsed) = parse_head(&buf, raw_101)? {
                break parsed;
            }
            if buf.len() > max_head {
                return Err(BackendError::Protocol("response head too large"));
            }
        };
        if status == StatusCode::SWITCHING_PROTOCOLS {
            // Copy: the rest is usually empty or tiny, and `buf` must not stay alive with it.
            let rest = Bytes::copy_from_slice(buf.get(used..).unwrap_or_default());
            // A map is built unless the raw head was asked for (and is
            // HTTP/1.1); then the buffer it was read into is that head (no
            // second allocation to split it off).
            let head = headers.is_none().then(|| {
                buf.truncate(used);
                buf
            });
            return Ok(Answer {
                status,
                headers: headers.unwrap_or_default(),
                head,
                rest,
            });
        }
        bytes::Buf::advance(&mut buf, used);
        let headers = headers.unwrap_or_default();
        let rest = read_body(io, status, &headers, buf).await?;
        Ok(Answer {
            status,
            headers,
            head: None,
            rest,
        })
    })
    .await
    .map_err(|_| BackendError::Timeout(timeout))?
}

/// The status, the headers (`None`: a raw 101 was asked for and is
/// HTTP/1.1, so none are built) and the head's length.
type Head = (StatusCode, Option<HeaderMap>, usize);

fn parse_head(buf: &[u8], raw_101: bool) -> Result<Option<Head>, BackendError> {
    // Left uninitialised: httparse writes the ones it fills.
    let mut raw = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut raw);
    let used = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(BackendError::Protocol("malformed response head")),
    };
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(BackendError::Protocol("malformed status code"))?;
    if raw_101 && status == StatusCode::SWITCHING_PROTOCOLS && resp.version == Some(1) {
        return Ok(Some((status, None, used)));
    }
    let mut headers = HeaderMap::with_capacity(resp.headers.len());
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| BackendError::Protocol("malformed header name"))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| BackendError::Protocol("malformed header value"))?;
        headers.append(name, value);
    }
    Ok(Some((status, Some(headers), used)))
}

fn is_chunked(h: &HeaderMap) -> bool {
    h.get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .last()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
}

/// Reads a refusal's body (RFC 9112 §6.3): none, chunked, by length, or to EOF.
async fn read_body<S>(
    io: &mut S,
    status: StatusCode,
    h: &HeaderMap,
    mut buf: BytesMut,
) -> Result<Bytes, BackendError>
where
    S: AsyncRead + Unpin,
{
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Bytes::new());
    }
    let too_big = || BackendError::Protocol("refusal body too large to relay");
    if is_chunked(h) {
        let mut body = BytesMut::new();
        loop {
            match httparse::parse_chunk_size(&buf) {
                Ok(httparse::Status::Complete((used, size))) => {
                    let size = usize::try_from(size).map_err(|_| too_big())?;
                    if size == 0 {
                        return Ok(body.freeze()); // trailers, if any, are not relayed
                    }
                    // `size` is the peer's number: compare without adding to it.
                    if size > MAX_REFUSAL_BODY.saturating_sub(body.len()) {
                        return Err(too_big());
                    }
                    // Bounded now: `used` <= buf.len() (what was read), `size` <= the limit.
                    let need = used + size + 2;
                    while buf.len() < need {
                        if io.read_buf(&mut buf).await.map_err(BackendError::Io)? == 0 {
                            return Err(BackendError::Protocol("truncated chunked body"));
                        }
                    }
                    body.extend_from_slice(&buf[used..used + size]);
                    let _ = buf.split_to(used + size + 2);
                }
                Ok(httparse::Status::Partial) => {
                    if buf.len() > 1024 {
                        return Err(BackendError::Protocol("malformed chunk size"));
                    }
                    if io.read_buf(&mut buf).await.map_err(BackendError::Io)? == 0 {
                        return Err(BackendError::Protocol("truncated chunked body"));
                    }
                }
                Err(_) => return Err(BackendError::Protocol("malformed chunk size")),
            }
        }
    }
    let length = match h.get(http::header::CONTENT_LENGTH) {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or(BackendError::Protocol("malformed Content-Length"))?,
        ),
        None => None,
    };
    if length.is_some_and(|n| n > MAX_REFUSAL_BODY) {
        return Err(too_big());
    }
    loop {
        if length.is_some_and(|n| buf.len() >= n) {
            buf.truncate(length.unwrap_or(0));
            return Ok(buf.freeze());
        }
        if buf.len() > MAX_REFUSAL_BODY {
            return Err(too_big());
        }
        if io.read_buf(&mut buf).await.map_err(BackendError::Io)? == 0 {
            return match length {
                Some(_) => Err(BackendError::Protocol("truncated body")),
                None => Ok(buf.freeze()), // delimited by the close
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn answer(reply: &'static [u8]) -> Result<Answer, BackendError> {
        answer_with(reply, false).await
    }

    async fn answer_with(reply: &'static [u8], raw_101: bool) -> Result<Answer, BackendError> {
        let (mut gw, mut backend) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut req = [0u8; 1024];
            let _ = backend.read(&mut req).await;
            // Dribble the reply to exercise partial parses.
            for chunk in reply.chunks(7) {
                let _ = backend.write_all(chunk).await;
            }
        });
        exchange_with(
            &mut gw,
            b"GET / HTTP/1.1\r\n\r\n",
            Duration::from_secs(5),
            16 * 1024,
            raw_101,
        )
        .await
    }

    #[tokio::test]
    async fn a_raw_101_comes_back_as_sent_and_only_then() {
        let head: &[u8] =
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nX-Odd-Case: v\r\n\r\n";
        let a = answer_with(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nX-Odd-Case: v\r\n\r\n\x81\x00", true)
            .await
            .unwrap();
        assert_eq!(a.head.as_deref(), Some(head));
        assert!(a.headers.is_empty());
        assert_eq!(&a.rest[..], b"\x81\x00");
        // HTTP/1.0, a refusal, or not asked: a header map, no raw head.
        for (reply, raw) in [
            (
                &b"HTTP/1.0 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"[..],
                true,
            ),
            (
                &b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno"[..],
                true,
            ),
            (
                &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"[..],
                false,
            ),
        ] {
            let a = answer_with(reply, raw).await.unwrap();
            assert!(a.head.is_none());
            assert!(!a.headers.is_empty());
        }
        // Malformed stays an error either way.
        assert!(answer_with(b"HTTP/1.1 101 OK\r\nBad Name: x\r\n\r\n", true)
            .await
            .is_err());
    }

    #[test]
    fn request_head_keeps_every_header_value() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("a.example"));
        h.append("cookie", HeaderValue::from_static("a=1"));
        h.append("cookie", HeaderValue::from_static("b=2"));
        let head = request_head("/x?y=1", &h);
        assert_eq!(
            head,
            b"GET /x?y=1 HTTP/1.1\r\nhost: a.example\r\ncookie: a=1\r\ncookie: b=2\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn switching_protocols_keeps_early_frames() {
        let a = answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: x\r\n\r\n\x81\x02hi").await.unwrap();
        assert_eq!(a.status, 101);
        assert_eq!(a.headers["sec-websocket-accept"], "x");
        assert_eq!(&a.rest[..], b"\x81\x02hi");
    }

    #[tokio::test]
    async fn refusals_carry_their_body() {
        let a = answer(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\n\r\nnope!extra")
            .await
            .unwrap();
        assert_eq!((a.status.as_u16(), &a.rest[..]), (403, &b"nope!"[..]));
        let a = answer(b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nlog \r\n3\r\nin!\r\n0\r\n\r\n").await.unwrap();
        assert_eq!((a.status.as_u16(), &a.rest[..]), (401, &b"log in!"[..]));
        let a = answer(b"HTTP/1.1 500 Oops\r\n\r\nuntil close")
            .await
            .unwrap();
        assert_eq!(&a.rest[..], b"until close");
        let a = answer(b"HTTP/1.1 204 No Content\r\n\r\n").await.unwrap();
        assert!(a.rest.is_empty());
    }

    #[tokio::test]
    async fn broken_answers_are_errors() {
        assert!(matches!(
            answer(b"SSH-2.0-OpenSSH\r\n\r\n").await,
            Err(BackendError::Protocol(_))
        ));
        assert!(matches!(
            answer(b"HTTP/1.1 101 Switching").await,
            Err(BackendError::Protocol(_))
        ));
        assert!(matches!(
            answer(b"HTTP/1.1 403 No\r\nContent-Length: 10\r\n\r\nshort").await,
            Err(BackendError::Protocol(_))
        ));
        assert!(matches!(
            answer(b"HTTP/1.1 403 No\r\nContent-Length: 99999999\r\n\r\n").await,
            Err(BackendError::Protocol(_))
        ));
    }

    /// A chunk size near 2^64 once overflowed `body.len() + size` (a panic in
    /// debug builds, a wrapped bound in release ones).
    #[tokio::test]
    async fn huge_chunk_sizes_are_refused_not_added() {
        for size in [
            "ffffffffffffffff",
            "fffffffffffffffe",
            "fffffffffff00000",
            "100001",
        ] {
            let reply = format!(
                "HTTP/1.1 403 No\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n{size}\r\nxyz"
            );
            let reply: &'static [u8] = Box::leak(reply.into_bytes().into_boxed_slice());
            assert!(
                matches!(answer(reply).await, Err(BackendError::Protocol(_))),
                "chunk size {size}"
            );
        }
    }
}
