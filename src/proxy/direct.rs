//! A WebSocket upgrade served without hyper: the first request of an
//! HTTP/1.1 connection, read and parsed by the server, when it is a valid
//! upgrade on a splice route without `auth:` and its `Origin` is allowed.
//!
//! The same admission, failover and upgrade exchange as hyper's path
//! (`upgrade`), counted and logged the same; the difference is who writes
//! the answer and how the session gets the socket. Here the answer is
//! written to the socket directly and the session is handed the socket
//! itself: no hyper dispatcher, no oneshot for the upgrade. A refusal
//! (limits, no backend, the backend's own answer) is written with its
//! length, and the connection then goes on with hyper for its next request,
//! as it would have on hyper's path.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tracing::{debug, Instrument};

use super::{admit, answered, origin_ok, request_host, upgrade, ws_span, Client};
use crate::error::Body;
use crate::session::conn::{ConnInfo, IntoLeg, Leg};
use crate::session::Pending;
use crate::state::{Shared, Snapshot};
use crate::ws;

/// A request the direct path takes: the configuration it was matched
/// against and its route.
pub struct Ticket {
    snapshot: Arc<Snapshot>,
    route: usize,
}

/// Whether the direct path serves `req`; `None` leaves it to hyper (plain
/// HTTP, HTTP/2, a malformed upgrade, no route, a refused `Origin`, a route
/// with `auth:`, fan-out or frames, a request with a body).
pub fn takes(shared: &Shared, req: &Request<()>) -> Option<Ticket> {
    let h = req.headers();
    // (`validate` also asks for `Upgrade: websocket`.)
    if ws::validate(req).is_err()
        || h.contains_key(header::CONTENT_LENGTH)
        || h.contains_key(header::TRANSFER_ENCODING)
    {
        return None;
    }
    let snapshot = shared.snapshot.load_full();
    let host = request_host(req.uri(), h).unwrap_or("");
    let route = snapshot.routes.find_index(host, req.uri().path())?;
    let (r, state) = snapshot.route(route);
    let plain_splice = state.auth.is_none() && state.hub.is_none() && r.frames.is_none();
    (plain_splice && origin_ok(r, h)).then_some(Ticket { snapshot, route })
}

/// How a direct upgrade ended.
pub enum Served<I> {
    /// A 101 was written: the session to run, and the client's leg.
    Session(Box<Pending>, Leg),
    /// Another answer was written: the client's socket and the bytes read
    /// past the head, for hyper and the connection's next request.
    Answered(I, Bytes),
    /// The client went away before its answer was written.
    Gone,
}

/// Answers the upgrade `takes` accepted, as hyper's path would: admission,
/// the pool's failover order, the backend's answer written to the client.
#[allow(clippy::manual_async_fn)] // on purpose: see `proxy::upgrade::upgrade`
pub fn serve<'a, I>(
    shared: &'a Arc<Shared>,
    conn: &'a Arc<ConnInfo>,
    ticket: Ticket,
    req: &'a Request<()>,
    mut io: I,
    rest: Bytes,
) -> impl std::future::Future<Output = Served<I>> + 'a
where
    I: AsyncWrite + IntoLeg + Unpin + 'a,
{
    async move {
        let (resp, session, raw) = answer(shared, conn, ticket, req).await;
        let answer = match raw {
            Some(raw) => raw,
            None => whole(resp, session.is_none()).await,
        };
        let sent = async {
            io.write_all(&answer).await?;
            io.flush().await
        };
        if let Err(e) = sent.await {
            debug!(peer = %conn.peer, error = %e, "client went away before the upgrade's answer");
            return Served::Gone;
        }
        match session {
            Some(session) => Served::Session(session, io.into_leg(rest)),
            None => Served::Answered(io, rest),
        }
    }
}

/// Admission and the backend's answer, as on hyper's path.
/// The answer, the session after a 101, and the 101's head as the backend
/// wrote it.
#[allow(clippy::manual_async_fn)] // on purpose: see `proxy::upgrade::upgrade`
fn answer<'a>(
    shared: &'a Arc<Shared>,
    conn: &'a Arc<ConnInfo>,
    ticket: Ticket,
    req: &'a Request<()>,
) -> impl std::future::Future<Output = (Response<Body>, Option<Box<Pending>>, Option<BytesMut>)> + 'a
{
    async move {
        conn.requests.fetch_add(1, Ordering::Relaxed);
        let _busy = conn.busy();
        let snapshot = &ticket.snapshot;
        let (r, state) = snapshot.route(ticket.route);
        let stats = &state.stats;
        let started = tokio::time::Instant::now();
        let host = request_host(req.uri(), req.headers()).unwrap_or("");
        let span = ws_span(conn, host, req.uri().path(), r, false);
        let (resp, session, raw) = match admit(r, stats, conn, req.headers(), None) {
            Err(e) => (Err(e), None, None),
            Ok(a) => {
                let switched = upgrade(
                    shared,
                    conn,
                    snapshot,
                    a,
                    &state.retired,
                    req,
                    Client::Direct,
                )
                .instrument(span)
                .await;
                match switched {
                    Ok(s) => (Ok(s.response), s.session, s.head),
                    Err(e) => (Err(e), None, None),
                }
            }
        };
        (answered(stats, conn, resp, false, started), session, raw)
    }
}

/// The answer as written: its head, and its body when it has one
/// (`with_body`: a refusal, framed by `Content-Length`; a 101 has none), in
/// one buffer, so they leave in one write (a client reading the head with
/// one `read` also gets the reason, and the gateway makes one system call).
async fn whole(resp: Response<Body>, with_body: bool) -> BytesMut {
    use http_body_util::BodyExt;
    let (parts, body) = resp.into_parts();
    let body = if with_body {
        // Our bodies are whole already (an error's text, a refusal read to its end).
        body.collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default()
    } else {
        Bytes::new()
    };
    let length = with_body.then_some(body.len());
    let mut out = render_head(parts.status, &parts.headers, length);
    out.extend_from_slice(&body);
    out
}

/// `HTTP/1.1 status reason`, the headers, and `Content-Length` when given.
fn render_head(status: StatusCode, headers: &HeaderMap, length: Option<usize>) -> BytesMut {
    let mut out = BytesMut::with_capacity(64 + headers.len() * 48 + length.unwrap_or(0));
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if length.is_some() && name == header::CONTENT_LENGTH {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(n) = length {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(n.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// A refusal's head and reason are one buffer, written at once: a client
    /// reading once after the head (tungstenite does, for a failed
    /// handshake) gets the reason too (written apart, a client on another
    /// core sometimes read the head alone).
    #[tokio::test]
    async fn a_refusal_is_written_whole() {
        let resp = crate::error::text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "503 Service Unavailable: busy\n".into(),
        );
        let out = whole(resp, true).await;
        assert_eq!(
            &out[..],
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 30\r\n\r\n503 Service Unavailable: busy\n"
        );
    }

    #[test]
    fn a_refusal_head_carries_its_length_once() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        let out = render_head(StatusCode::SERVICE_UNAVAILABLE, &h, Some(12));
        assert_eq!(
            String::from_utf8(out.to_vec()).unwrap(),
            "HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 12\r\n\r\n"
        );
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let out = render_head(StatusCode::SWITCHING_PROTOCOLS, &h, None);
        assert_eq!(
            String::from_utf8(out.to_vec()).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"
        );
    }
}
