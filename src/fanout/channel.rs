//! The upstream side of a channel: one connection per source pool, opened
//! through the pool's failover order, re-opened with backoff and jitter when
//! lost, and every message framed once and published to the clients.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::StatusCode;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;

use crate::supervise::Kind;

use super::{Channel, Hub, State};
use crate::backend::pool::{Backend, BackendGuard, Pool};
use crate::backend::upstream::BackendIo;
use crate::backend::BackendError;
use crate::error::ProxyError;
use crate::lifecycle::Lifecycle;
use crate::ws::frame;

/// An open upstream, counted as a live session on its backend.
struct Upstream {
    ws: WebSocketStream<BackendIo>,
    guard: BackendGuard,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Spawns the channel's task on the gateway's tracker, supervised: if it
/// panics, clients waiting for it get a 502, its clients are closed with
/// 1011, it leaves the route's channels (the next client opens a fresh
/// one), and an eager channel is opened again after a backoff.
pub(super) fn spawn(
    hub: Arc<Hub>,
    life: &Lifecycle,
    ch: Arc<Channel>,
    fwd: mpsc::Receiver<Message>,
    eager: bool,
) {
    let stop = life.hard_stop.clone();
    let shutdown = life.shutdown.clone();
    let span = tracing::info_span!("fanout", route = %hub.route, channel = %ch.key);
    let life2 = life.clone();
    life.tasks.spawn(
        async move {
            let end = Ended {
                hub: hub.clone(),
                ch: ch.clone(),
            };
            let run = AssertUnwindSafe(run(hub.clone(), ch.clone(), fwd, (stop, shutdown), eager));
            let Err(payload) = run.catch_unwind().await else {
                return;
            };
            let name = format!("route {} channel {}", hub.route, ch.key);
            life2.panics.record(Kind::FanoutChannel, &name, &*payload);
            drop(end);
            ch.failed.cancel();
            if eager && !life2.shutdown.is_cancelled() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = life2.shutdown.cancelled() => return,
                }
                hub.reopen_eager(&life2, &ch);
            }
        }
        .instrument(span),
    );
}

/// However the channel task ends (a panic included): clients still waiting
/// for the upstream learn that it failed, and the channel leaves the route.
struct Ended {
    hub: Arc<Hub>,
    ch: Arc<Channel>,
}

impl Drop for Ended {
    fn drop(&mut self) {
        let ch = &self.ch;
        if matches!(*ch.state.borrow(), State::Connecting) {
            ch.state
                .send_replace(State::Failed(Arc::new(ProxyError::ChannelFailed)));
        }
        self.hub.remove(ch, false);
    }
}

async fn run(
    hub: Arc<Hub>,
    ch: Arc<Channel>,
    fwd: mpsc::Receiver<Message>,
    (stop, shutdown): (CancellationToken, CancellationToken),
    eager: bool,
) {
    // Lets the crate's own tests exercise the supervision above.
    #[cfg(test)]
    if ch.key.ends_with("panic-before-connect") {
        panic!("injected by a test");
    }
    // First connects: one pass over each source pool's failover order.
    let pools = hub.pools();
    let mut first = Vec::with_capacity(pools.len());
    let mut last_err = None;
    for pool in pools.iter() {
        match tokio::select! {
            r = connect(&hub, pool, &ch) => r,
            _ = stop.cancelled() => return,
        } {
            Ok(up) => first.push(Some(up)),
            Err(e) => {
                warn!(pool = %pool.name, error = %e, "cannot open the upstream");
                first.push(None);
                last_err = Some(e);
            }
        }
    }
    if first.iter().all(Option::is_none) && !eager {
        hub.remove(&ch, false);
        if let Some(e) = last_err {
            ch.state.send_replace(State::Failed(Arc::new(e)));
        }
        return;
    }
    ch.state.send_replace(State::Up);
    info!("channel open");

    let end = CancellationToken::new();
    let mut fwd = Some(fwd);
    let sources = futures_util::future::join_all(first.into_iter().enumerate().map(|(i, up)| {
        source(
            &hub,
            &ch,
            i,
            up,
            if i == 0 { fwd.take() } else { None },
            &end,
        )
    }));
    tokio::pin!(sources);
    tokio::select! {
        _ = &mut sources => {}
        _ = stop.cancelled() => {}
        _ = hub.retired.cancelled() => {
            hub.remove(&ch, false);
            end.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), sources).await;
            info!("channel closed: route removed by a reload");
        }
        _ = linger(&hub, &ch, eager, &shutdown) => {
            end.cancel();
            // Sources close their upstreams with a Close frame, briefly.
            let _ = tokio::time::timeout(Duration::from_secs(2), sources).await;
            info!("channel closed: no clients");
        }
    }
}

/// Returns once the channel has had no client for `linger` and was removed.
/// An eager channel lingers only once the gateway is shutting down, and
/// then not at all: a channel nobody listens to must not hold up the drain.
async fn linger(hub: &Hub, ch: &Arc<Channel>, eager: bool, shutdown: &CancellationToken) {
    loop {
        let stopping = shutdown.is_cancelled();
        if ch.clients.load(Ordering::Acquire) == 0 && (!eager || stopping) {
            if !stopping {
                tokio::select! {
                    _ = tokio::time::sleep(hub.cfg.linger) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            if hub.remove(ch, true) {
                return;
            }
        }
        tokio::select! {
            _ = ch.idle.notified() => {}
            _ = shutdown.cancelled(), if !stopping => {}
        }
    }
}

/// Why an upstream connection ended.
enum Lost {
    /// The channel is closing.
    End,
    Error(String),
}

/// One source's loop: pump its upstream, reconnect when it is lost.
async fn source(
    hub: &Hub,
    ch: &Channel,
    idx: usize,
    mut up: Option<Upstream>,
    mut fwd: Option<mpsc::Receiver<Message>>,
    end: &CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let mut reconnecting = up.is_none();
    loop {
        // The current pool: a reload may have rebuilt it.
        let pool = hub.pool(idx);
        let mut u = match up.take() {
            Some(u) => u,
            None => {
                let jitter = crate::backend::balance::jitter(backoff);
                tokio::select! {
                    _ = tokio::time::sleep(jitter) => {}
                    _ = end.cancelled() => return,
                }
                backoff = (backoff * 2).min(hub.cfg.reconnect_max);
                match tokio::select! {
                    r = connect(hub, &pool, ch) => r,
                    _ = end.cancelled() => return,
                } {
                    Ok(u) => u,
                    Err(e) => {
                        warn!(pool = %pool.name, error = %e, retry_in = ?backoff, "upstream reconnect failed");
                        continue;
                    }
                }
            }
        };
        if reconnecting {
            hub.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            info!(pool = %pool.name, backend = %u.guard.backend().url, "upstream reconnected");
        }
        backoff = BACKOFF_MIN;
        super::lock(&ch.upstreams).insert(idx, u.guard.backend().url.to_string());
        let lost = pump(hub, ch, idx, &mut u, fwd.as_mut(), end).await;
        super::lock(&ch.upstreams).remove(&idx);
        match lost {
            Lost::End => {
                let close = u.ws.close(None);
                let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
                return;
            }
            Lost::Error(why) => {
                warn!(pool = %pool.name, backend = %u.guard.backend().url, why, "upstream lost; reconnecting");
                if let Some(text) = &hub.cfg.on_upstream_lost {
                    ch.publish(frame::OP_TEXT, text.as_bytes(), 0);
                    ch.flush_direct(&hub.stats);
                }
                reconnecting = true;
            }
        }
    }
}

async fn recv_opt(r: Option<&mut mpsc::Receiver<Message>>) -> Option<Message> {
    match r {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// Moves messages until the upstream is lost or the channel ends.
async fn pump(
    hub: &Hub,
    ch: &Channel,
    idx: usize,
    u: &mut Upstream,
    mut fwd: Option<&mut mpsc::Receiver<Message>>,
    end: &CancellationToken,
) -> Lost {
    let cfg = &hub.cfg;
    for m in &cfg.subscribe {
        let m = m.replace("{channel}", &ch.key);
        if let Err(e) = u.ws.send(Message::text(m)).await {
            return Lost::Error(format!("sending subscribe: {e}"));
        }
    }
    let down = u.guard.backend().down_token();
    let retired = u.guard.backend().retired().clone();
    let mut ping = tokio::time::interval(cfg.ping_interval);
    ping.tick().await;
    let mut heard = Instant::now();
    loop {
        tokio::select! {
            m = u.ws.next() => {
                heard = Instant::now();
                // What the upstream sent at once goes out together: one
                // write per direct client for the batch.
                let mut lost = on_message(hub, ch, idx, u, m).await;
                for _ in 1..super::direct::BATCH {
                    if lost.is_some() {
                        break;
                    }
                    let Some(m) = u.ws.next().now_or_never() else {
                        break;
                    };
                    lost = on_message(hub, ch, idx, u, m).await;
                }
                ch.flush_direct(&hub.stats);
                if let Some(lost) = lost {
                    return lost;
                }
            }
            m = recv_opt(fwd.as_deref_mut()) => {
                if let Some(m) = m {
                    if let Err(e) = u.ws.send(m).await {
                        return Lost::Error(format!("forwarding: {e}"));
                    }
                    hub.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() > cfg.ping_interval + cfg.pong_timeout {
                    return Lost::Error(format!("no answer to pings for {:?}", heard.elapsed()));
                }
                if let Err(e) = u.ws.send(Message::Ping(Default::default())).await {
                    return Lost::Error(e.to_string());
                }
            }
            _ = down.cancelled() => return Lost::Error(if retired.is_cancelled() {
                "backend removed by a reload"
            } else {
                "backend marked down by health checks"
            }.into()),
            _ = retired.cancelled() => return Lost::Error("backend removed by a reload".into()),
            _ = end.cancelled() => return Lost::End,
        }
    }
}

/// Publishes one message from the upstream (or answers its ping); `Some`
/// when the upstream is lost.
async fn on_message(
    hub: &Hub,
    ch: &Channel,
    idx: usize,
    u: &mut Upstream,
    m: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> Option<Lost> {
    match m {
        Some(Ok(Message::Text(t))) => publish(hub, ch, idx, frame::OP_TEXT, t.as_bytes()),
        Some(Ok(Message::Binary(b))) => publish(hub, ch, idx, frame::OP_BINARY, &b),
        Some(Ok(Message::Ping(_))) => {
            // tungstenite queued the pong; send it now.
            if let Err(e) = u.ws.flush().await {
                return Some(Lost::Error(e.to_string()));
            }
        }
        Some(Ok(Message::Pong(_) | Message::Frame(_))) => {}
        Some(Ok(Message::Close(c))) => {
            return Some(Lost::Error(match c {
                Some(c) => format!(
                    "closed by the upstream ({} {})",
                    u16::from(c.code),
                    c.reason
                ),
                None => "closed by the upstream".into(),
            }))
        }
        Some(Err(e)) => return Some(Lost::Error(e.to_string())),
        None => return Some(Lost::Error("connection closed".into())),
    }
    None
}

/// Frames one upstream message (tagging it with its source when asked) and publishes it.
fn publish(hub: &Hub, ch: &Channel, idx: usize, opcode: u8, payload: &[u8]) {
    hub.stats.messages_in.fetch_add(1, Ordering::Relaxed);
    ch.counts.messages_in.fetch_add(1, Ordering::Relaxed);
    let tagged_text;
    let body = if hub.cfg.tag && opcode == frame::OP_TEXT {
        tagged_text = tagged(&hub.pool(idx).name, payload);
        tagged_text.as_bytes()
    } else {
        payload
    };
    ch.publish(opcode, body, hub.cfg.replay_last);
}

/// `{"source": NAME, "data": ...}`: the message itself when it is JSON, else as a string.
fn tagged(source: &str, text: &[u8]) -> String {
    let name = serde_json::Value::from(source);
    if serde_json::from_slice::<serde::de::IgnoredAny>(text).is_ok() {
        format!(
            r#"{{"source":{name},"data":{}}}"#,
            String::from_utf8_lossy(text)
        )
    } else {
        let data = serde_json::Value::from(String::from_utf8_lossy(text).into_owned());
        format!(r#"{{"source":{name},"data":{data}}}"#)
    }
}

/// Opens the channel's upstream on the first backend of `pool` that answers.
async fn connect(hub: &Hub, pool: &Pool, ch: &Channel) -> Result<Upstream, ProxyError> {
    let key = pool
        .hash_key
        .as_ref()
        .map(|_| crate::backend::balance::fnv1a(ch.key.as_bytes()));
    let mut tried = 0;
    let mut last = None;
    for backend in pool.try_order(key).take(pool.max_attempts) {
        tried += 1;
        match handshake(hub, pool, &backend, &ch.target).await {
            Ok(ws) => {
                pool.note_outcome(&backend, true);
                return Ok(Upstream {
                    ws,
                    guard: BackendGuard::new(backend),
                });
            }
            Err(e) if e.is_local() => {
                warn!(error = %e, "out of local resources: the upstream is not opened, the backend is not blamed");
                return Err(ProxyError::Local(e));
            }
            Err(e) => {
                warn!(backend = %backend.url, failure = e.kind(), error = %e, "upstream failed, trying the next");
                pool.note_outcome(&backend, false);
                last = Some(e);
            }
        }
    }
    Err(ProxyError::exhausted(pool, tried, last))
}

/// Connects to one backend and performs the client side of the WebSocket handshake.
async fn handshake(
    hub: &Hub,
    pool: &Pool,
    b: &Backend,
    target: &str,
) -> Result<WebSocketStream<BackendIo>, BackendError> {
    let mut io = pool.connect(b).await?;
    let pq = PathAndQuery::try_from(format!("{}{target}", b.url.base_path))
        .map_err(|_| BackendError::Protocol("invalid upstream path"))?;
    let key = crate::backend::balance::ws_key();
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(b.authority.as_str()) {
        h.insert(header::HOST, v);
    }
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&key) {
        h.insert(header::SEC_WEBSOCKET_KEY, v);
    }
    h.insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    h.insert(
        header::USER_AGENT,
        HeaderValue::from_static("upgate-fanout"),
    );
    let head = crate::backend::upgrade::request_head(pq.as_str(), &h);
    let s = &hub.settings;
    let answer =
        crate::backend::upgrade::exchange(&mut io, &head, s.handshake_timeout, s.max_header_bytes)
            .await?;
    if answer.status != StatusCode::SWITCHING_PROTOCOLS {
        return Err(BackendError::Protocol("the upstream refused the upgrade"));
    }
    let expected = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    if answer
        .headers
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .map(|v| v.as_bytes())
        != Some(expected.as_bytes())
    {
        return Err(BackendError::Protocol("wrong Sec-WebSocket-Accept"));
    }
    let config = WebSocketConfig::default().max_message_size(Some(64 << 20));
    Ok(
        WebSocketStream::from_partially_read(io, answer.rest.to_vec(), Role::Client, Some(config))
            .await,
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::supervise::Kind;

    /// A channel task that dies before its upstream opened: the client
    /// waiting for it gets a 502 at once, and so does the next one (a fresh
    /// channel, not a wait on the dead one); the panic is counted.
    #[tokio::test]
    async fn a_dead_channel_task_answers_its_waiters() {
        let yaml = "listen:\n  - addr: 127.0.0.1:0\npools:\n  feed: { backends: ['ws://127.0.0.1:9'] }\nroutes:\n  - { name: f, path: /feed, pool: feed, mode: fanout, strip_prefix: true }\n";
        let cfg = crate::Config::parse(std::path::Path::new("routes.yaml"), yaml).expect("config");
        let gw = crate::Gateway::bind(&cfg).await.expect("bind");
        let addr = gw.local_addrs()[0];
        let panics = gw.shared.life.panics.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(gw.run(async {
            let _ = rx.await;
        }));
        for n in 1..=2 {
            let url = format!("ws://{addr}/feed/x-panic-before-connect");
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_tungstenite::connect_async(url),
            )
            .await
            .expect("an answer, not a wait on a dead task");
            match r {
                Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                    assert_eq!(resp.status(), 502);
                    let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
                        .to_string();
                    assert!(body.contains("the channel failed"), "{body}");
                }
                other => panic!("expected a 502, got {other:?}"),
            }
            assert_eq!(panics.count(Kind::FanoutChannel), n);
        }
        let _ = tx.send(());
        let _ = running.await;
    }
}
