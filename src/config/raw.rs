//! The shape of `routes.yaml` as written by a user: serde structs with
//! `deny_unknown_fields`, and value types that validate themselves while
//! deserializing so that their errors carry the YAML line and column.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::de::{self, Deserializer};
use serde::Deserialize;

pub use super::values::{BackendUrl, Dur, HostPattern, PathPrefix};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub listen: Vec<RawListener>,
    pub pools: indexmap_lite::OrderedMap<RawPool>,
    pub routes: Vec<RawRoute>,
    pub admin: Option<RawAdmin>,
}

/// The admin listener: health, readiness and state for operators.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub addr: SocketAddr,
    /// When set, every endpoint but /healthz and /readyz wants `Authorization: Bearer TOKEN`.
    pub token: Option<String>,
    /// Host names (besides IP addresses and `localhost`) the admin answers to.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Serve a token-less admin on a non-loopback address anyway.
    #[serde(default)]
    pub insecure: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub handshake_timeout: Option<Dur>,
    pub max_connections: Option<usize>,
    pub max_header_bytes: Option<usize>,
    pub max_headers: Option<usize>,
    pub request_timeout: Option<Dur>,
    pub shutdown_grace: Option<Dur>,
    pub half_close_timeout: Option<Dur>,
    pub drain_timeout: Option<Dur>,
    pub watch_interval: Option<Dur>,
    pub tcp_keepalive: Option<Dur>,
    pub idle_timeout: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub addr: SocketAddr,
    pub tls: Option<RawTls>,
    #[serde(default)]
    pub proxy_protocol: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub certs: Vec<RawCert>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    #[serde(default)]
    pub balance: Balance,
    pub connect_timeout: Option<Dur>,
    /// For `balance: hash`: what in the request is hashed.
    pub hash_key: Option<HashKey>,
    pub backends: Vec<RawBackend>,
    /// PEM file of CA certificates trusted for `wss://` backends, instead of the system roots.
    pub ca_file: Option<PathBuf>,
    pub health: Option<RawHealth>,
    /// Passive checks: consecutive failures that eject a backend (0 turns them off).
    pub eject_after: Option<u32>,
    pub eject_for: Option<Dur>,
    /// Try every backend even when all are marked down, instead of answering 503.
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default)]
    pub on_backend_down: OnBackendDown,
    /// Backends tried per request at most (the retry budget).
    pub max_attempts: Option<usize>,
    /// A backend that comes (back) up receives a growing share over this long.
    pub slow_start: Option<Dur>,
    /// How often `discover: dns` backends are resolved again.
    pub dns_refresh: Option<Dur>,
    /// Move live sessions towards an even spread (frames routes with resume).
    pub rebalance: Option<RawRebalance>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRebalance {
    pub max_moves_per_second: Option<u32>,
    pub tolerance: Option<f64>,
}

/// What happens to live sessions when active checks mark their backend down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBackendDown {
    /// Close them, so clients reconnect to a healthy backend.
    #[default]
    Close,
    /// Leave them running.
    Keep,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub interval: Option<Dur>,
    pub timeout: Option<Dur>,
    /// HTTP GET expecting 2xx; without it a TCP connect (or `ws: true`) is the check.
    pub path: Option<String>,
    /// Check with a real WebSocket handshake (at `path`, or `/`).
    #[serde(default)]
    pub ws: bool,
    pub healthy_after: Option<u32>,
    pub unhealthy_after: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    #[serde(default)]
    pub host: HostPattern,
    pub path: Option<PathPrefix>,
    /// Required, except on a fan-out route that lists `sources`.
    pub pool: Option<String>,
    #[serde(default)]
    pub strip_prefix: bool,
    pub preserve_host: Option<bool>,
    #[serde(default)]
    pub mode: Mode,
    /// Web origins allowed to open WebSockets; absent: any.
    pub origins: Option<Vec<String>>,
    pub max_sessions: Option<u64>,
    pub max_sessions_per_ip: Option<u32>,
    /// Who may connect: `jwt:` and/or `forward:`.
    pub auth: Option<super::auth::RawAuth>,
    // The keys below are for `mode: fanout` only (an error on a splice route).
    pub sources: Option<Vec<String>>,
    pub tag: Option<bool>,
    pub channel: Option<ChannelKey>,
    pub upstream_path: Option<String>,
    pub eager: Option<bool>,
    pub linger: Option<Dur>,
    pub max_lag: Option<usize>,
    pub slow_client: Option<SlowClient>,
    pub replay_last: Option<usize>,
    pub on_upstream_lost: Option<String>,
    pub subscribe: Option<Vec<String>>,
    pub client_messages: Option<ClientMessages>,
    pub client_rate: Option<u32>,
    pub compression: Option<bool>,
    pub max_message: Option<usize>,
    pub ping_interval: Option<Dur>,
    pub pong_timeout: Option<Dur>,
    pub reconnect_max: Option<Dur>,
    pub max_channels: Option<usize>,
    pub channels: Option<Vec<String>>,
    pub channel_opens_per_ip: Option<u32>,
    /// `close`: sessions the pool's rebalancer asks to leave are closed with
    /// 1012 so their clients reconnect (splice, and frames without resume).
    pub rebalance: Option<RouteRebalance>,
    // `mode: frames` only.
    pub resume: Option<bool>,
    pub replay_first: Option<usize>,
    pub resume_buffer: Option<usize>,
    pub resume_timeout: Option<Dur>,
    pub on_resume: Option<String>,
}

impl RawRoute {
    /// The `mode: frames` keys this route sets, by name.
    pub fn frames_keys(&self) -> Vec<&'static str> {
        [
            ("resume", self.resume.is_some()),
            ("replay_first", self.replay_first.is_some()),
            ("resume_buffer", self.resume_buffer.is_some()),
            ("resume_timeout", self.resume_timeout.is_some()),
            ("on_resume", self.on_resume.is_some()),
        ]
        .into_iter()
        .filter(|(_, s)| *s)
        .map(|(k, _)| k)
        .collect()
    }

    /// Keys shared by fan-out and frames routes (their client-leg guards).
    pub const SHARED_KEYS: [&'static str; 5] = [
        "max_message",
        "ping_interval",
        "pong_timeout",
        "client_rate",
        "compression",
    ];

    /// The fan-out keys this route sets, by name (to refuse them on a splice route).
    pub fn fanout_keys(&self) -> Vec<&'static str> {
        let set = [
            ("sources", self.sources.is_some()),
            ("tag", self.tag.is_some()),
            ("channel", self.channel.is_some()),
            ("upstream_path", self.upstream_path.is_some()),
            ("eager", self.eager.is_some()),
            ("linger", self.linger.is_some()),
            ("max_lag", self.max_lag.is_some()),
            ("slow_client", self.slow_client.is_some()),
            ("replay_last", self.replay_last.is_some()),
            ("on_upstream_lost", self.on_upstream_lost.is_some()),
            ("subscribe", self.subscribe.is_some()),
            ("client_messages", self.client_messages.is_some()),
            ("client_rate", self.client_rate.is_some()),
            ("compression", self.compression.is_some()),
            ("max_message", self.max_message.is_some()),
            ("ping_interval", self.ping_interval.is_some()),
            ("pong_timeout", self.pong_timeout.is_some()),
            ("reconnect_max", self.reconnect_max.is_some()),
            ("max_channels", self.max_channels.is_some()),
            ("channels", self.channels.is_some()),
            ("channel_opens_per_ip", self.channel_opens_per_ip.is_some()),
        ];
        set.into_iter()
            .filter(|(_, s)| *s)
            .map(|(k, _)| k)
            .collect()
    }
}

/// What a route's sessions do when the pool's rebalancer asks some to leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteRebalance {
    /// Close with 1012 Service Restart at a frame boundary; the client reconnects.
    Close,
}

/// What a route does with an upgraded connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One backend connection per client; bytes are spliced.
    #[default]
    Splice,
    /// One upstream connection per channel, broadcast to every client on it.
    Fanout,
    /// One backend connection per client, with upgate speaking WebSocket on
    /// both legs (message guards; `resume` moves the session to another backend).
    Frames,
}

/// What a fan-out client does when it falls `max_lag` messages behind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowClient {
    /// Skip ahead to the oldest message still kept, counting what was skipped.
    #[default]
    DropOldest,
    /// Close it with 1008 and a reason.
    Disconnect,
}

/// What happens to messages fan-out clients send.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientMessages {
    #[default]
    Ignore,
    /// Sent on the channel's shared upstream connection (chat-like feeds).
    Forward,
}

/// What identifies a fan-out channel within a route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ChannelKey {
    /// The request path after the route prefix, plus the query.
    #[default]
    Path,
    /// A query parameter's value.
    Query(String),
    /// A request header's value.
    Header(http::HeaderName),
}

impl FromStr for ChannelKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("channel `{s}` must be `path`, `query:NAME` or `header:NAME`");
        match s {
            "path" => Ok(ChannelKey::Path),
            _ => match named(s, "channel", &bad)? {
                Named::Header(h) => Ok(ChannelKey::Header(h)),
                Named::Query(q) => Ok(ChannelKey::Query(q)),
                Named::Cookie(_) => Err(bad()),
            },
        }
    }
}

/// A request value named `KIND:NAME`.
enum Named {
    Header(http::HeaderName),
    Cookie(String),
    Query(String),
}

/// Parses `header:NAME`, `cookie:NAME` or `query:NAME`; `bad` words the
/// error for anything else, `what` names the key in a header-name error.
fn named(s: &str, what: &str, bad: &dyn Fn() -> String) -> Result<Named, String> {
    let (kind, name) = s.split_once(':').ok_or_else(bad)?;
    let name = name.trim();
    if name.is_empty() {
        return Err(bad());
    }
    match kind.trim() {
        "header" => http::HeaderName::from_bytes(name.as_bytes())
            .map(Named::Header)
            .map_err(|_| format!("{what} `{s}`: `{name}` is not a valid header name")),
        "cookie" => Ok(Named::Cookie(name.to_string())),
        "query" => Ok(Named::Query(name.to_string())),
        _ => Err(bad()),
    }
}

/// How a pool picks the backend for a new connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Weighted round robin.
    #[default]
    RoundRobin,
    /// Fewest live sessions.
    LeastConn,
    /// Power of two random choices on live sessions.
    P2c,
    /// Consistent (rendezvous) hashing of `hash_key`.
    Hash,
}

/// What `balance: hash` hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The client's IP address.
    Ip,
    /// A request header (the whole value).
    Header(http::HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// A query parameter's value.
    Query(String),
}

impl FromStr for HashKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("hash_key `{s}` must be `ip`, `header:NAME`, `cookie:NAME` or `query:NAME`");
        if s == "ip" {
            return Ok(HashKey::Ip);
        }
        Ok(match named(s, "hash_key", &bad)? {
            Named::Header(h) => HashKey::Header(h),
            Named::Cookie(c) => HashKey::Cookie(c),
            Named::Query(q) => HashKey::Query(q),
        })
    }
}

/// A backend as written: a URL, or `{ url: URL, weight: N, drain: BOOL }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawBackend {
    pub url: BackendUrl,
    pub weight: u32,
    /// Out of rotation for new sessions; live ones continue.
    pub drain: bool,
    /// `discover: dns`: every address the host resolves to is a backend.
    pub discover: bool,
}

impl<'de> Deserialize<'de> for RawBackend {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = RawBackend;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a backend URL, or `{ url: URL, weight: N }`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawBackend, E> {
                Ok(RawBackend {
                    url: v.parse().map_err(E::custom)?,
                    weight: 1,
                    drain: false,
                    discover: false,
                })
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut a: A) -> Result<RawBackend, A::Error> {
                let (mut url, mut weight, mut drain, mut discover) = (None, None, false, false);
                while let Some(k) = a.next_key::<String>()? {
                    match k.as_str() {
                        "url" => url = Some(a.next_value::<BackendUrl>()?),
                        "weight" => {
                            let w: u32 = a.next_value()?;
                            if !(1..=1000).contains(&w) {
                                return Err(de::Error::custom(format!(
                                    "weight {w} must be between 1 and 1000"
                                )));
                            }
                            weight = Some(w);
                        }
                        "drain" => drain = a.next_value()?,
                        "discover" => {
                            let v: String = a.next_value()?;
                            if v != "dns" {
                                return Err(de::Error::custom(format!(
                                    "discover `{v}`: the only method is `dns`"
                                )));
                            }
                            discover = true;
                        }
                        other => {
                            return Err(de::Error::unknown_field(
                                other,
                                &["url", "weight", "drain", "discover"],
                            ))
                        }
                    }
                }
                Ok(RawBackend {
                    url: url.ok_or_else(|| de::Error::missing_field("url"))?,
                    weight: weight.unwrap_or(1),
                    drain,
                    discover,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// A YAML mapping that keeps its keys in file order and rejects duplicates,
/// so pools are listed (and reported) in the order the user wrote them.
pub mod indexmap_lite {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};

    #[derive(Debug)]
    pub struct OrderedMap<V>(pub Vec<(String, V)>);

    impl<V> Default for OrderedMap<V> {
        fn default() -> Self {
            OrderedMap(Vec::new())
        }
    }

    impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct M<V>(PhantomData<V>);
            impl<'de, V: Deserialize<'de>> Visitor<'de> for M<V> {
                type Value = OrderedMap<V>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a mapping of names")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                    let mut out: Vec<(String, V)> = Vec::new();
                    while let Some(k) = a.next_key::<String>()? {
                        if out.iter().any(|(n, _)| *n == k) {
                            return Err(de::Error::custom(format!("duplicate name `{k}`")));
                        }
                        let v = a.next_value()?;
                        out.push((k, v));
                    }
                    Ok(OrderedMap(out))
                }
            }
            d.deserialize_map(M(PhantomData))
        }
    }
}
