//! `routes.yaml`: parse once into validated types, or fail with an error that
//! names the file, the line and the key, and says how to fix it.
//!
//! Every `serde_yaml` call lives in this module, so the YAML crate can be
//! swapped by editing one place.

mod locate;
pub mod origin;
pub mod raw;
mod summary;
mod validate;

use validate::{admin, listeners, pools, routes, server_settings};

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use raw::{
    BackendUrl, Balance, ChannelKey, ClientMessages, HashKey, HostPattern, Mode, OnBackendDown,
    SlowClient,
};

use locate::{locate, Seg};
use raw::RawConfig;

/// The whole gateway configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from; relative certificate paths were resolved against its directory.
    pub source: PathBuf,
    pub server: ServerSettings,
    pub listeners: Vec<ListenerConfig>,
    pub pools: Vec<PoolConfig>,
    pub routes: Vec<RouteConfig>,
    pub admin: Option<AdminConfig>,
}

/// The admin listener.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    pub token: Option<String>,
    /// Host names it answers to besides IP literals and `localhost` (a
    /// browser sends the name it resolved: checking it defeats DNS rebinding).
    pub hosts: Vec<String>,
    /// A token-less admin on a non-loopback address was asked for explicitly.
    pub insecure: bool,
}

/// Limits and timeouts that bound what a peer can make the gateway hold.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    /// TLS handshake plus the first request head must finish within this.
    pub handshake_timeout: Duration,
    /// Accepted connections beyond this wait in the kernel backlog.
    pub max_connections: usize,
    /// Largest request head (HTTP/1.1 buffer; HTTP/2 header list).
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Plain HTTP: time allowed for the backend's response head (504 after).
    pub request_timeout: Duration,
    /// On SIGTERM, how long live sessions may continue before being closed.
    pub shutdown_grace: Duration,
    /// After one side of a session ends, how long the other may stay open.
    pub half_close_timeout: Duration,
    /// After a reload removed their route or backend, how long sessions may continue.
    pub drain_timeout: Duration,
    /// How often the config and certificate files are checked for changes (zero: never).
    pub watch_interval: Duration,
    /// TCP keepalive on client and backend sockets: idle time before the
    /// first probe (zero: off). Finds peers that vanished without a FIN.
    pub tcp_keepalive: Duration,
    /// A client connection with no request in flight and no WebSocket
    /// session on it for this long is closed gracefully (zero: never).
    pub idle_timeout: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 100_000,
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            request_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            half_close_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            watch_interval: Duration::from_secs(2),
            tcp_keepalive: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub addr: SocketAddr,
    /// Certificates in file order; the first is served when SNI matches none.
    pub tls: Option<Vec<CertFiles>>,
    /// Every connection starts with a PROXY protocol header (v1 or v2)
    /// giving the client's address.
    pub proxy_protocol: bool,
}

#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Line of this entry in the config, for errors found when loading the files.
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub balance: Balance,
    /// Set exactly when `balance` is `hash`.
    pub hash_key: Option<HashKey>,
    pub connect_timeout: Duration,
    pub backends: Vec<BackendSpec>,
    pub ca_file: Option<PathBuf>,
    /// Active checks, when configured.
    pub health: Option<HealthCheck>,
    pub passive: PassivePolicy,
    pub fail_open: bool,
    pub on_backend_down: OnBackendDown,
    /// Backends tried per request at most.
    pub max_attempts: usize,
    /// Ramp-up period of a backend that comes (back) up; zero for none.
    pub slow_start: Duration,
    pub dns_refresh: Duration,
}

/// How a pool's backends are probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    pub kind: CheckKind,
    pub thresholds: Thresholds,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// A TCP connect (and TLS handshake for `wss://`).
    Connect,
    /// `GET path` expecting a 2xx answer.
    Http(String),
    /// A WebSocket handshake at the path, expecting 101.
    WebSocket(String),
}

/// One backend of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub url: BackendUrl,
    /// Relative share for `round_robin` and `hash` (1–1000).
    pub weight: u32,
    pub drain: bool,
    /// Resolve the host every `dns_refresh`; each address is a backend.
    pub discover: bool,
}

/// Most backends in one pool (the balancers order them on the stack).
pub const MAX_BACKENDS: usize = 256;

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub host: HostPattern,
    pub path: String,
    /// Index into [`Config::pools`].
    pub pool: usize,
    pub strip_prefix: bool,
    /// Send the client's `Host` to the backend (default) or the backend's own authority.
    pub preserve_host: bool,
    /// Set on `mode: fanout` routes.
    pub fanout: Option<std::sync::Arc<FanoutConfig>>,
    /// Origins whose pages may open WebSockets here (a handshake with
    /// another `Origin` gets 403); `None`: any.
    pub origins: Option<Vec<origin::OriginPattern>>,
    /// `max_sessions`, `max_sessions_per_ip`.
    pub limits: Limits,
}

/// A `mode: fanout` route: one upstream connection per channel, broadcast to its clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FanoutConfig {
    /// Pools whose feeds are merged (indexes into [`Config::pools`]); the
    /// first also receives forwarded client messages.
    pub sources: Vec<usize>,
    /// Wrap text messages as `{"source": POOL, "data": ...}`.
    pub tag: bool,
    pub channel: ChannelKey,
    /// The upstream request target, `{channel}` substituted; `None`: the
    /// client's own path (stripped per `strip_prefix`) and query.
    pub upstream_path: Option<String>,
    /// Open the route's own channel at start and keep it open.
    pub eager: bool,
    /// How long an upstream stays open after its last client left.
    pub linger: Duration,
    /// Messages a client may fall behind (the channel keeps this many).
    pub max_lag: usize,
    pub slow_client: SlowClient,
    /// Messages a new client receives first.
    pub replay_last: usize,
    /// Sent to clients (as text) when the upstream connection is lost.
    pub on_upstream_lost: Option<String>,
    /// Sent to the upstream (as text) after every (re)connect, `{channel}` substituted.
    pub subscribe: Vec<String>,
    pub client_messages: ClientMessages,
    /// Forwarded messages per second per client (also the burst).
    pub client_rate: u32,
    /// Offer permessage-deflate to clients (each message compressed once for all).
    pub compression: bool,
    /// Largest message a client may send.
    pub max_message: usize,
    /// Clients and the upstream are pinged this often...
    pub ping_interval: Duration,
    /// ...and dropped when nothing came back this long after a ping.
    pub pong_timeout: Duration,
    /// Reconnect backoff grows from 100 ms up to this.
    pub reconnect_max: Duration,
    /// Channels open at once (each holds an upstream connection per source);
    /// a new one beyond this is refused with 503.
    pub max_channels: usize,
    /// Channel keys that may be opened (`*` matches any run of characters);
    /// `None`: any key.
    pub channels: Option<Vec<String>>,
    /// New channels one client address may open per minute (also the burst).
    pub channel_opens_per_ip: u32,
}

/// Passive-check settings of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassivePolicy {
    /// Consecutive failures that eject a backend (0: never).
    pub eject_after: u32,
    /// First ejection period; doubles on each repeated ejection.
    pub eject_for: Duration,
}

/// Active-check thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub healthy_after: u32,
    pub unhealthy_after: u32,
}

/// A route's limits, from its config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_sessions: Option<u64>,
    pub max_sessions_per_ip: Option<u32>,
}

/// A config that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {message}", file.display())]
    Syntax {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}:{line}: {key}: {message}", file.display())]
    Invalid {
        file: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The 1-based line the error points at, when it has one.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { line, .. } | ConfigError::Invalid { line, .. } => Some(*line),
        }
    }
}

/// A key path such as `routes[1].pool`, printed the way users read it.
struct KeyPath<'a>(&'a [Seg<'a>]);

impl fmt::Display for KeyPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn err(&self, path: &[Seg], message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            line: locate(self.text, path),
            key: KeyPath(path).to_string(),
            message: message.into(),
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Parses config text; `file` names it in errors and anchors relative paths.
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| syntax_error(file, &e))?;
        let cx = Ctx { file, text };
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };

        let server = server_settings(&cx, raw.server)?;
        let listeners = listeners(&cx, raw.listen, &resolve)?;
        let pools = pools(&cx, raw.pools, &resolve)?;
        let routes = routes(&cx, raw.routes, &pools)?;
        let admin = admin(&cx, raw.admin)?;
        Ok(Config {
            admin,
            source: file.to_path_buf(),
            server,
            listeners,
            pools,
            routes,
        })
    }
}

/// serde_yaml prints "… at line L column C"; we print the location first, like a compiler.
fn syntax_error(file: &Path, e: &serde_yaml::Error) -> ConfigError {
    let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
    let mut message = e.to_string();
    let suffix = format!(" at line {line} column {column}");
    if let Some(i) = message.find(&suffix) {
        message.replace_range(i..i + suffix.len(), "");
    }
    ConfigError::Syntax {
        file: file.to_path_buf(),
        line,
        column,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("t/routes.yaml"), y)
    }

    const OK: &str = "\
listen:
  - addr: 127.0.0.1:0
pools:
  chat:
    balance: least_conn
    connect_timeout: 250ms
    backends: [ws://127.0.0.1:9001, 'ws://127.0.0.1:9002']
  ticker:
    backends:
      - ws://127.0.0.1:9101
routes:
  - name: chat
    host: Chat.Example.com
    path: /chat/
    pool: chat
  - name: ticker
    path: /ticker
    pool: ticker
    strip_prefix: true
";

    /// Found by the `config` fuzz target: this indexed an empty list.
    #[test]
    fn a_fanout_route_without_pool_or_sources_is_an_error() {
        let y = OK.replace("    pool: ticker\n", "    mode: fanout\n");
        let e = parse(&y).unwrap_err().to_string();
        assert!(
            e.contains("routes[1]: a fan-out route needs `pool: NAME` or `sources: [NAME, …]`"),
            "{e}"
        );
    }

    #[test]
    fn fanout_channel_limits() {
        let with = |k: &str| {
            parse(&OK.replace(
                "    pool: ticker\n",
                &format!("    pool: ticker\n    mode: fanout\n{k}"),
            ))
        };
        let c = with("").unwrap();
        let f = c.routes[1].fanout.as_ref().unwrap();
        assert_eq!(
            (f.max_channels, f.channel_opens_per_ip, f.channels.is_none()),
            (100, 30, true)
        );
        let e = with("    max_channels: 0\n").unwrap_err().to_string();
        assert!(
            e.contains("routes[1].max_channels: must be at least 1"),
            "{e}"
        );
        let e = with("    channels: []\n").unwrap_err().to_string();
        assert!(e.contains("routes[1].channels: list at least one"), "{e}");
        let e = with("    channel_opens_per_ip: 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("routes[1].channel_opens_per_ip: must be at least 1"),
            "{e}"
        );
        let e = parse(&OK.replace("    pool: chat\n", "    pool: chat\n    max_channels: 5\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`max_channels` is only used with `mode: fanout`"),
            "{e}"
        );
    }

    #[test]
    fn origins_and_proxy_protocol() {
        let y = OK
            .replace(
                "    pool: ticker\n",
                "    pool: ticker\n    origins:\n      - https://*.example.com\n      - app.example.com\n",
            );
        let e = parse(&y).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "t/routes.yaml:21: routes[1].origins[1]: `app.example.com` has no scheme"
            ),
            "{e}"
        );
        let c = parse(&y.replace("      - app.example.com\n", "")).unwrap();
        assert_eq!(
            c.routes[1].origins.as_ref().map(|o| o[0].to_string()),
            Some("https://*.example.com".to_string())
        );
        assert_eq!(c.routes[0].origins, None);
        let e = parse(&OK.replace("    pool: ticker\n", "    pool: ticker\n    origins: []\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("routes[1].origins: list at least one origin"),
            "{e}"
        );
        let c = parse(&OK.replace(
            "  - addr: 127.0.0.1:0\n",
            "  - { addr: 127.0.0.1:0, proxy_protocol: true }\n",
        ))
        .unwrap();
        assert!(c.listeners[0].proxy_protocol);
        assert!(!parse(OK).unwrap().listeners[0].proxy_protocol);
        let e = parse(&OK.replace("    pool: chat\n", "    pool: chat\n    max_sessions: 0\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("routes[0].max_sessions: must be at least 1"),
            "{e}"
        );
        let c = parse(&OK.replace(
            "    pool: chat\n",
            "    pool: chat\n    max_sessions: 500\n    max_sessions_per_ip: 5\n",
        ))
        .unwrap();
        assert_eq!(
            c.routes[0].limits,
            Limits {
                max_sessions: Some(500),
                max_sessions_per_ip: Some(5)
            }
        );
    }

    #[test]
    fn parses_a_full_config() {
        let c = parse(OK).unwrap();
        assert_eq!(c.pools.len(), 2);
        assert_eq!(c.pools[0].balance, Balance::LeastConn);
        assert_eq!(c.pools[0].connect_timeout, Duration::from_millis(250));
        assert_eq!(c.routes[0].path, "/chat");
        assert_eq!(
            c.routes[0].host,
            HostPattern::Exact("chat.example.com".into())
        );
        assert_eq!(c.routes[1].pool, 1);
        assert!(c.routes[1].strip_prefix);
    }

    fn err(y: &str) -> String {
        parse(y).unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = err(&OK.replace("strip_prefix: true", "strip_prefx: true"));
        assert!(e.starts_with("t/routes.yaml:19:"), "{e}");
        assert!(e.contains("strip_prefx"), "{e}");
    }

    #[test]
    fn missing_pool_names_line_and_lists_pools() {
        let e = err(&OK.replace("pool: ticker", "pool: tikcer"));
        assert_eq!(
            e,
            "t/routes.yaml:18: routes[1].pool: no pool named `tikcer`; defined pools: chat, ticker"
        );
    }

    #[test]
    fn bad_values_point_at_their_line() {
        let e = err(&OK.replace("- ws://127.0.0.1:9101", "- tcp://127.0.0.1:9101"));
        assert!(e.starts_with("t/routes.yaml:10:"), "{e}");
        let e = err(&OK.replace("250ms", "250"));
        assert!(e.starts_with("t/routes.yaml:6:"), "{e}");
        assert!(e.contains("needs a unit"), "{e}");
        let e = err(&OK.replace("least_conn", "fastest"));
        assert!(e.starts_with("t/routes.yaml:5:"), "{e}");
    }

    #[test]
    fn duplicates_are_errors() {
        let e = err(&OK.replace("name: ticker", "name: chat"));
        assert!(e.starts_with("t/routes.yaml:16: routes[1].name:"), "{e}");
        let dup = format!("{OK}  - name: again\n    path: /ticker/\n    pool: chat\n");
        let e = err(&dup);
        assert!(e.starts_with("t/routes.yaml:21: routes[2].path:"), "{e}");
        assert!(e.contains("could never match"), "{e}");
        let e = err(&OK.replace("  ticker:\n", "  chat:\n"));
        assert!(e.contains("duplicate pool name `chat`"), "{e}");
    }

    #[test]
    fn weights_and_hash_keys() {
        let y = OK
            .replace(
                "    balance: least_conn\n",
                "    balance: hash\n    hash_key: header:X-User\n",
            )
            .replace(
                "'ws://127.0.0.1:9002'",
                "{ url: 'ws://127.0.0.1:9002', weight: 3 }",
            );
        let c = parse(&y).unwrap();
        assert_eq!(c.pools[0].balance, Balance::Hash);
        assert_eq!(
            c.pools[0].hash_key,
            Some(HashKey::Header(http::HeaderName::from_static("x-user")))
        );
        assert_eq!(c.pools[0].backends[1].weight, 3);
        assert_eq!(c.pools[0].backends[0].weight, 1);

        let e = err(&OK.replace("least_conn", "hash"));
        assert!(
            e.starts_with("t/routes.yaml:5: pools.chat.balance:") && e.contains("needs `hash_key"),
            "{e}"
        );
        let e = err(&OK.replace("    balance: least_conn\n", "    hash_key: ip\n"));
        assert!(
            e.contains("pools.chat.hash_key") && e.contains("only used with"),
            "{e}"
        );
        let e = err(&OK.replace("least_conn", "hash\n    hash_key: body"));
        assert!(
            e.starts_with("t/routes.yaml:6:") && e.contains("hash_key `body`"),
            "{e}"
        );
        let e = err(&OK.replace(
            "'ws://127.0.0.1:9002'",
            "{ url: 'ws://127.0.0.1:9002', weight: 0 }",
        ));
        assert!(
            e.starts_with("t/routes.yaml:7:") && e.contains("between 1 and 1000"),
            "{e}"
        );
        let e = err(&OK.replace("'ws://127.0.0.1:9002'", "'ws://127.0.0.1:9001'"));
        assert!(e.contains("listed twice"), "{e}");
    }

    #[test]
    fn fanout_routes() {
        let y = OK.replace(
            "    strip_prefix: true\n",
            "    strip_prefix: true\n    mode: fanout\n    channel: query:pair\n    max_lag: 64\n    slow_client: disconnect\n    replay_last: 2\n    subscribe: ['{\"sub\":\"{channel}\"}']\n",
        );
        let c = parse(&y).unwrap();
        let f = c.routes[1].fanout.as_ref().unwrap();
        assert_eq!(f.sources, vec![1]);
        assert_eq!(f.channel, ChannelKey::Query("pair".into()));
        assert_eq!((f.max_lag, f.replay_last), (64, 2));
        assert_eq!(f.slow_client, SlowClient::Disconnect);
        assert!(c.routes[0].fanout.is_none());

        let e = err(&OK.replace(
            "    strip_prefix: true\n",
            "    strip_prefix: true\n    linger: 5s\n",
        ));
        assert_eq!(
            e,
            "t/routes.yaml:20: routes[1].linger: `linger` is only used with `mode: fanout`"
        );
        let e = err(&y.replace("replay_last: 2", "replay_last: 100"));
        assert!(
            e.contains("routes[1].replay_last: must not exceed max_lag (64)"),
            "{e}"
        );
        let e = err(&y.replace("channel: query:pair", "channel: cookie:x"));
        assert!(
            e.starts_with("t/routes.yaml:21:") && e.contains("must be `path`"),
            "{e}"
        );
        let e = err(&y.replace("max_lag: 64", "eager: true"));
        assert!(
            e.contains("routes[1].eager") && e.contains("channel: path"),
            "{e}"
        );
        let merged = y.replace("    pool: ticker\n", "    sources: [ticker, chat]\n");
        let c = parse(&merged).unwrap();
        assert_eq!(c.routes[1].fanout.as_ref().unwrap().sources, vec![1, 0]);
        assert_eq!(c.routes[1].pool, 1);
        let e = err(&y.replace("mode: fanout", "mode: fanout\n    sources: [chat]"));
        assert!(e.contains("either `pool` or `sources`"), "{e}");
        let e = err(&merged.replace("[ticker, chat]", "[ticker, nope]"));
        assert!(
            e.contains("routes[1].sources[1]: no pool named `nope`"),
            "{e}"
        );
    }

    #[test]
    fn empty_sections_are_errors() {
        let e = err("listen: []\npools: {}\nroutes: []\n");
        assert!(e.contains("listen: add at least one listener"), "{e}");
    }
}
