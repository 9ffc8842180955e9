//! Fan-out (`mode: fanout`): one upstream WebSocket per channel, every
//! upstream message broadcast to every client of that channel.
//!
//! Data flow: a client's upgrade names a channel (its path and query after
//! the route prefix, or a query parameter or header the route names). The
//! first client of a channel opens the upstream connection(s) before its
//! 101 is sent, so an unreachable feed is an honest 502/503; later clients
//! join the open channel. The channel task reads upstream messages, frames
//! each **once** into `Bytes` and publishes it on a bounded broadcast ring
//! (`max_lag` messages): a client's queue is only its position in that
//! shared ring, so its memory is bounded whatever it does. Each client task
//! writes what it has received with one vectored write, answers pings, and
//! applies the slow-client policy. The upstream reconnects with backoff and
//! fails over through the pool while clients stay connected; the channel
//! closes `linger` after its last client left.
//!
//! - [`frame`]: server frame encoding and client frame parsing.
//! - `channel`: the upstream side (connect, subscribe, reconnect, publish).
//! - `client`: one client's write/read/keepalive loop.

mod accept;
mod channel;
mod client;
mod direct;

pub use accept::accept;
use accept::route_channel;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tokio_tungstenite::tungstenite::Message;

use crate::backend::pool::Pool;
use crate::config::{FanoutConfig, ServerSettings};
use crate::error::ProxyError;
use crate::lifecycle::Lifecycle;
use crate::router::Route;
use crate::ws::{deflate, frame};

/// Counters of one fan-out route (atomics: clients add theirs in batches).
#[derive(Debug, Default)]
pub struct Stats {
    /// Connected clients.
    pub clients: AtomicU64,
    /// Messages received from upstreams.
    pub messages_in: AtomicU64,
    /// Messages handed to clients' sockets.
    pub delivered: AtomicU64,
    /// Messages skipped for clients that fell `max_lag` behind.
    pub dropped: AtomicU64,
    /// Clients closed for falling behind (`slow_client: disconnect`).
    pub slow_disconnects: AtomicU64,
    /// Upstream connections re-established after a loss.
    pub reconnects: AtomicU64,
    /// Client messages sent on to the upstream.
    pub forwarded: AtomicU64,
    /// Client messages dropped because the upstream queue was full (or no upstream was connected long enough).
    pub forward_dropped: AtomicU64,
    /// New channels refused: `max_channels` reached, key not in `channels`,
    /// or the client address over `channel_opens_per_ip`.
    pub refused_full: AtomicU64,
    pub refused_key: AtomicU64,
    pub refused_rate: AtomicU64,
}

/// The fan-out side of one route: its channels and counters.
pub struct Hub {
    pub route: String,
    pub cfg: Arc<FanoutConfig>,
    /// The source pools, in `sources` order (a reload may swap in rebuilt ones).
    pools: arc_swap::ArcSwap<Vec<Arc<Pool>>>,
    settings: ServerSettings,
    channels: Mutex<HashMap<String, Arc<Channel>>>,
    /// New-channel allowance per client address (`channel_opens_per_ip`);
    /// touched only when a client opens a channel.
    opens: Mutex<HashMap<std::net::IpAddr, Allowance>>,
    pub stats: Stats,
    /// Cancelled when a reload removed (or changed) the route and the drain
    /// period is over: clients get 1001, channels close.
    pub retired: tokio_util::sync::CancellationToken,
}

/// Where a channel's upstream stands; clients wait while it is `Connecting`.
#[derive(Clone)]
enum State {
    Connecting,
    Up,
    Failed(Arc<ProxyError>),
}

/// One channel: the broadcast ring its clients read from.
pub struct Channel {
    key: String,
    /// The upstream request target (before the backend's base path).
    target: String,
    tx: broadcast::Sender<Bytes>,
    /// Plain-TCP clients that caught up, written by the channel's task itself.
    direct: direct::Direct,
    /// The same messages for clients that negotiated permessage-deflate,
    /// compressed once each (only while such a client is subscribed).
    tx_z: broadcast::Sender<Bytes>,
    /// The last `replay_last` messages; publishing and subscribing both hold
    /// the lock so a late joiner gets each message exactly once.
    replay: Mutex<VecDeque<Bytes>>,
    clients: AtomicUsize,
    /// Signalled when the last client leaves.
    idle: Notify,
    state: watch::Sender<State>,
    /// Cancelled if the channel's task died (a panic): its clients get 1011.
    failed: tokio_util::sync::CancellationToken,
    /// Client messages for the first source's upstream (`client_messages: forward`).
    to_upstream: mpsc::Sender<Message>,
    /// This channel's share of the route's counters, for the dashboard.
    counts: ChannelCounts,
    /// The backend each source's upstream is connected to now.
    upstreams: Mutex<std::collections::BTreeMap<usize, String>>,
}

/// Counters of one channel.
#[derive(Debug, Default)]
struct ChannelCounts {
    messages_in: AtomicU64,
    dropped: AtomicU64,
    slow_disconnects: AtomicU64,
}

/// What the admin API and the dashboard show of one open channel.
#[derive(Debug, Clone)]
pub struct ChannelView {
    pub key: String,
    pub clients: usize,
    /// Messages received from its upstreams.
    pub messages_in: u64,
    /// Messages skipped for its clients that fell behind.
    pub dropped: u64,
    pub slow_disconnects: u64,
    /// The backends its upstreams are connected to (empty while connecting).
    pub upstreams: Vec<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Holds a client's place in a channel; leaving may start the linger.
struct Member {
    hub: Arc<Hub>,
    ch: Arc<Channel>,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.hub.stats.clients.fetch_sub(1, Ordering::Relaxed);
        if self.ch.clients.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.ch.idle.notify_one();
        }
    }
}

impl Hub {
    pub fn new(
        route: &Route,
        cfg: Arc<FanoutConfig>,
        pools: &[Arc<Pool>],
        settings: &ServerSettings,
    ) -> Hub {
        Hub {
            route: route.name.clone(),
            pools: arc_swap::ArcSwap::from_pointee(
                cfg.sources.iter().map(|&i| pools[i].clone()).collect(),
            ),
            cfg,
            settings: settings.clone(),
            channels: Mutex::new(HashMap::new()),
            opens: Mutex::new(HashMap::new()),
            stats: Stats::default(),
            retired: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// How long a channel keeps its upstream after its last client left.
    pub fn linger(&self) -> std::time::Duration {
        self.cfg.linger
    }

    /// The source pools' names, in order.
    pub fn source_names(&self) -> Vec<String> {
        self.pools().iter().map(|p| p.name.clone()).collect()
    }

    fn pools(&self) -> Arc<Vec<Arc<Pool>>> {
        self.pools.load_full()
    }

    /// Source pool `i` as it is now.
    fn pool(&self, i: usize) -> Arc<Pool> {
        self.pools.load()[i].clone()
    }

    /// Whether a reload may keep this hub (and its channels and clients) for
    /// a route with `cfg` over `pools`: the same settings and source names.
    pub fn can_keep(&self, cfg: &FanoutConfig, pools: &[Arc<Pool>]) -> bool {
        let names: Vec<&str> = cfg
            .sources
            .iter()
            .map(|&i| pools[i].name.as_str())
            .collect();
        let strip = |c: &FanoutConfig| FanoutConfig {
            sources: Vec::new(),
            ..c.clone()
        };
        names == self.source_names() && strip(cfg) == strip(&self.cfg)
    }

    /// Points the hub at the pools of a new config (same names).
    pub fn set_pools(&self, cfg: &FanoutConfig, pools: &[Arc<Pool>]) {
        self.pools.store(Arc::new(
            cfg.sources.iter().map(|&i| pools[i].clone()).collect(),
        ));
    }

    /// Open channels, their clients, counters and upstreams, by key.
    pub fn channel_list(&self) -> Vec<ChannelView> {
        let mut v: Vec<_> = lock(&self.channels)
            .values()
            .map(|c| ChannelView {
                key: c.key.clone(),
                clients: c.clients.load(Ordering::Relaxed),
                messages_in: c.counts.messages_in.load(Ordering::Relaxed),
                dropped: c.counts.dropped.load(Ordering::Relaxed),
                slow_disconnects: c.counts.slow_disconnects.load(Ordering::Relaxed),
                upstreams: lock(&c.upstreams).values().cloned().collect(),
            })
            .collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Opens the route's own channel at start (`eager: true`); it stays open.
    pub fn open_eager(self: &Arc<Self>, life: &Lifecycle, route: &Route) {
        let (key, target) = route_channel(route, &self.cfg);
        let mut map = lock(&self.channels);
        self.open(life, &mut map, key, target, true);
    }

    /// Opens an eager channel again after its task died (unless a client
    /// opened it meanwhile).
    fn reopen_eager(self: &Arc<Self>, life: &Lifecycle, old: &Channel) {
        let mut map = lock(&self.channels);
        if !map.contains_key(&old.key) {
            self.open(life, &mut map, old.key.clone(), old.target.clone(), true);
        }
    }

    /// Open channels (each holds one upstream connection per source).
    pub fn channel_count(&self) -> usize {
        lock(&self.channels).len()
    }

    /// Creates the channel `key` in `map` and starts its task.
    fn open(
        self: &Arc<Self>,
        life: &Lifecycle,
        map: &mut HashMap<String, Arc<Channel>>,
        key: String,
        target: String,
        eager: bool,
    ) -> Arc<Channel> {
        let (ch, fwd) = Channel::new(key.clone(), target, &self.cfg);
        map.insert(key, ch.clone());
        channel::spawn(self.clone(), life, ch.clone(), fwd, eager);
        ch
    }

    /// Joins the channel `key`, or opens it if the route's limits allow:
    /// the key is allowed (`channels`), fewer than `max_channels` are open,
    /// and `ip` has not opened `channel_opens_per_ip` in the last minute.
    fn join(
        self: &Arc<Self>,
        life: &Lifecycle,
        key: String,
        target: String,
        ip: std::net::IpAddr,
    ) -> Result<Member, ProxyError> {
        let mut map = lock(&self.channels);
        let ch = match map.get(&key) {
            Some(ch) => ch.clone(),
            None => {
                self.may_open(&key, map.len(), ip)?;
                self.open(life, &mut map, key, target, false)
            }
        };
        self.stats.clients.fetch_add(1, Ordering::Relaxed);
        // Counted under the map's lock, so a lingering channel cannot be removed meanwhile.
        ch.clients.fetch_add(1, Ordering::AcqRel);
        Ok(Member {
            hub: self.clone(),
            ch,
        })
    }

    /// Whether a new channel `key` may open with `open` channels open.
    fn may_open(&self, key: &str, open: usize, ip: std::net::IpAddr) -> Result<(), ProxyError> {
        let cfg = &self.cfg;
        if let Some(allowed) = &cfg.channels {
            // A path key starts with `/`; the pattern may leave it out.
            let bare = key.strip_prefix('/').unwrap_or(key);
            if !allowed.iter().any(|p| glob(p, key) || glob(p, bare)) {
                self.stats.refused_key.fetch_add(1, Ordering::Relaxed);
                return Err(ProxyError::ChannelNotAllowed(key.to_string()));
            }
        }
        if open >= cfg.max_channels {
            self.stats.refused_full.fetch_add(1, Ordering::Relaxed);
            return Err(ProxyError::ChannelLimit {
                route: self.route.clone(),
                limit: cfg.max_channels,
            });
        }
        let now = tokio::time::Instant::now();
        let mut opens = lock(&self.opens);
        if opens.len() >= 10_000 {
            // Addresses whose allowance has refilled carry no information.
            opens.retain(|_, a| !a.refilled(now, cfg.channel_opens_per_ip));
        }
        let a = opens.entry(ip).or_insert(Allowance {
            left: f64::from(cfg.channel_opens_per_ip),
            at: now,
        });
        if !a.take(now, cfg.channel_opens_per_ip) {
            self.stats.refused_rate.fetch_add(1, Ordering::Relaxed);
            return Err(ProxyError::ChannelRate {
                ip,
                route: self.route.clone(),
                limit: cfg.channel_opens_per_ip,
            });
        }
        Ok(())
    }

    /// Removes `ch` from the open channels, unless `only_if_idle` and a
    /// client joined meanwhile (then false).
    fn remove(&self, ch: &Arc<Channel>, only_if_idle: bool) -> bool {
        let mut map = lock(&self.channels);
        if only_if_idle && ch.clients.load(Ordering::Acquire) != 0 {
            return false;
        }
        if map.get(&ch.key).is_some_and(|c| Arc::ptr_eq(c, ch)) {
            map.remove(&ch.key);
        }
        true
    }
}

/// A token bucket of new channels for one client address: `per_minute`
/// tokens, refilled continuously.
struct Allowance {
    left: f64,
    at: tokio::time::Instant,
}

impl Allowance {
    fn refill(&mut self, now: tokio::time::Instant, per_minute: u32) {
        let cap = f64::from(per_minute);
        let gained = now.duration_since(self.at).as_secs_f64() * cap / 60.0;
        self.left = (self.left + gained).min(cap);
        self.at = now;
    }

    fn take(&mut self, now: tokio::time::Instant, per_minute: u32) -> bool {
        self.refill(now, per_minute);
        if self.left >= 1.0 {
            self.left -= 1.0;
            true
        } else {
            false
        }
    }

    fn refilled(&mut self, now: tokio::time::Instant, per_minute: u32) -> bool {
        self.refill(now, per_minute);
        self.left >= f64::from(per_minute)
    }
}

/// Whether `key` matches `pattern`, where `*` stands for any run of
/// characters (possibly empty) and everything else for itself.
fn glob(pattern: &str, key: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = key.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no `*`: an exact match
    };
    for p in middle {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

impl Channel {
    fn new(
        key: String,
        target: String,
        cfg: &FanoutConfig,
    ) -> (Arc<Channel>, mpsc::Receiver<Message>) {
        let (fwd_tx, fwd_rx) = mpsc::channel(1024);
        let ch = Arc::new(Channel {
            key,
            target,
            tx: broadcast::channel(cfg.max_lag.max(2)).0,
            direct: direct::Direct::default(),
            // Unused (never subscribed) without `compression`: keep it small.
            tx_z: broadcast::channel(if cfg.compression {
                cfg.max_lag.max(2)
            } else {
                2
            })
            .0,
            replay: Mutex::new(VecDeque::with_capacity(cfg.replay_last)),
            clients: AtomicUsize::new(0),
            idle: Notify::new(),
            state: watch::channel(State::Connecting).0,
            failed: tokio_util::sync::CancellationToken::new(),
            to_upstream: fwd_tx,
            counts: ChannelCounts::default(),
            upstreams: Mutex::new(Default::default()),
        });
        (ch, fwd_rx)
    }

    /// Frames one message once for every plain client and, only while a
    /// client that negotiated permessage-deflate is subscribed, compresses it
    /// once for all of those (a message that would not shrink goes to them
    /// as it is).
    fn publish(&self, opcode: u8, body: &[u8], replay_last: usize) {
        let frame = frame::encode(opcode, body);
        // Decided under the replay lock (when there is one), so a deflate
        // client joining right now gets this message either replayed or live.
        let send = |frame: Bytes| {
            if self.tx_z.receiver_count() > 0 {
                let z = deflate::compress(body)
                    .map_or_else(|| frame.clone(), |z| frame::encode_compressed(opcode, &z));
                let _ = self.tx_z.send(z);
            }
            self.direct.publish(&self.tx, frame);
        };
        if replay_last == 0 {
            send(frame);
            return;
        }
        let mut r = lock(&self.replay);
        if r.len() == replay_last {
            r.pop_front();
        }
        r.push_back(frame.clone());
        send(frame);
    }

    /// Writes what was published since the last flush to the direct
    /// clients (see `direct`), counting it as delivered.
    fn flush_direct(&self, stats: &Stats) {
        let n = self.direct.flush(&self.tx);
        if n > 0 {
            stats.delivered.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// A receiver (of compressed messages with `deflate`), and the messages
    /// a late joiner gets first (uncompressed, which a deflate client takes too).
    fn subscribe(
        &self,
        replay_last: usize,
        deflate: bool,
    ) -> (broadcast::Receiver<Bytes>, Vec<Bytes>) {
        let tx = if deflate { &self.tx_z } else { &self.tx };
        if replay_last == 0 {
            return (tx.subscribe(), Vec::new());
        }
        let r = lock(&self.replay);
        (tx.subscribe(), r.iter().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn channel_patterns() {
        for (p, k, want) in [
            ("EURUSD", "EURUSD", true),
            ("EURUSD", "EURUSDX", false),
            ("EUR*", "EURUSD", true),
            ("EUR*", "USDEUR", false),
            ("*USD", "EURUSD", true),
            ("*USD", "USDX", false),
            ("room-*-live", "room-42-live", true),
            ("room-*-live", "room-42-dead", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "acb", false),
            ("*", "anything", true),
            ("ab*ba", "aba", false),
        ] {
            assert_eq!(glob(p, k), want, "{p} vs {k}");
        }
    }
}
