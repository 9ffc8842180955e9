//! `routes.yaml`: parse once into validated types, or fail with an error that
//! names the file, the line and the key, and says how to fix it.
//!
//! Every `serde_yaml` call lives in this module, so the YAML crate can be
//! swapped by editing one place.

pub mod auth;
mod hints;
mod locate;
pub mod origin;
mod partial;
pub mod raw;
mod summary;
mod validate;
mod values;

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
    /// Move live sessions towards an even spread (`rebalance:`).
    pub rebalance: Option<Rebalance>,
}

/// A pool's `rebalance:` settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rebalance {
    /// Sessions asked to move per second, at most, over the whole pool.
    pub max_moves_per_second: u32,
    /// The spread is even enough when no backend holds more than the mean
    /// times `1 + tolerance` (plus one session).
    pub tolerance: f64,
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
    /// Set on `mode: frames` routes.
    pub frames: Option<std::sync::Arc<FramesConfig>>,
    /// Origins whose pages may open WebSockets here (a handshake with
    /// another `Origin` gets 403); `None`: any.
    pub origins: Option<Vec<origin::OriginPattern>>,
    /// `max_sessions`, `max_sessions_per_ip`.
    pub limits: Limits,
    /// Who may connect (`auth:`); `None`: anyone.
    pub auth: Option<auth::AuthConfig>,
    /// `rebalance: close`: sessions the pool's rebalancer asks to leave close
    /// with 1012 at a frame boundary, so their clients reconnect elsewhere.
    pub rebalance_close: bool,
}

/// A `mode: frames` route: upgate speaks WebSocket to the client and to the
/// backend, and may move the session to another backend (`resume`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramesConfig {
    /// Move the session to another backend when its backend leg ends
    /// without the client asking.
    pub resume: bool,
    /// The first N client messages, replayed to each new backend.
    pub replay_first: usize,
    /// Client message bytes held while no backend is connected; beyond, 1013.
    pub resume_buffer: usize,
    /// How long a session may go without a backend before the client is closed.
    pub resume_timeout: Duration,
    /// A text message to the client after each resume.
    pub on_resume: Option<String>,
    /// Offer permessage-deflate to clients (the backend leg stays plain).
    pub compression: bool,
    /// Largest client message (1009 beyond).
    pub max_message: usize,
    /// Client messages per second (1008 beyond); `None`: no limit.
    pub client_rate: Option<u32>,
    /// Pings on both legs; a leg silent for `ping_interval + pong_timeout` is dead.
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
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
    /// Several mistakes, in file order: one line each, then how many.
    #[error("{}", many(.0))]
    Many(Vec<ConfigError>),
}

fn many(errors: &[ConfigError]) -> String {
    let mut out: Vec<String> = errors.iter().map(ToString::to_string).collect();
    out.push(format!("{} errors", errors.len()));
    out.join("\n")
}

impl ConfigError {
    /// The 1-based line the error points at, when it has one.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { line, .. } | ConfigError::Invalid { line, .. } => Some(*line),
            ConfigError::Many(all) => all.first().and_then(ConfigError::line),
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
        let (raw, mut errs) = partial::parse(file, text)?;
        let cx = Ctx { file, text };
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };

        let server = server_settings(&cx, raw.server).unwrap_or_else(|e| {
            errs.push(e);
            ServerSettings::default()
        });
        let no_listener = raw.listen.is_empty() && !raw.listen_broken;
        let no_route = raw.routes.is_empty() && !raw.routes_broken;
        let listeners = listeners(&cx, raw.listen, &resolve, &mut errs);
        if no_listener {
            errs.push(cx.err(
                &[Seg::Key("listen")],
                "add at least one listener, e.g. `- addr: 127.0.0.1:8080`",
            ));
        }
        let named: Vec<String> = raw.pools.iter().map(|(n, _)| n.clone()).collect();
        let pools = pools(&cx, raw.pools, &resolve, &mut errs);
        // Pools that failed are reported once, not again by each route using them.
        let mut broken = raw.broken_pools;
        broken.extend(
            named
                .iter()
                .filter(|n| !pools.iter().any(|p| p.name == **n))
                .cloned(),
        );
        let mut every: Vec<&str> = named.iter().map(String::as_str).collect();
        every.extend(
            broken
                .iter()
                .map(String::as_str)
                .filter(|b| !named.iter().any(|n| n == b)),
        );
        let mut route_errs = Vec::new();
        let routes = routes(&cx, raw.routes, &pools, &resolve, &mut route_errs);
        for e in &mut route_errs {
            // Name every pool of the file, also those that failed.
            if let ConfigError::Invalid { message, .. } = e {
                if let Some((head, _)) = message.split_once("; defined pools: ") {
                    *message = format!("{head}; defined pools: {}", every.join(", "));
                }
            }
        }
        errs.extend(route_errs.into_iter().filter(|e| {
            let ConfigError::Invalid { message, .. } = e else {
                return true;
            };
            !broken
                .iter()
                .any(|b| message.starts_with(&format!("no pool named `{b}`")))
        }));
        if no_route {
            errs.push(cx.err(&[Seg::Key("routes")], "add at least one route"));
        }
        let admin = admin(&cx, raw.admin).unwrap_or_else(|e| {
            errs.push(e);
            None
        });
        errs.sort_by_key(|e| e.line().unwrap_or(0));
        match errs.len() {
            0 => Ok(Config {
                admin,
                source: file.to_path_buf(),
                server,
                listeners,
                pools,
                routes,
            }),
            1 => Err(errs.remove(0)),
            _ => Err(ConfigError::Many(errs)),
        }
    }
}

/// serde_yaml prints "… at line L column C"; we print the location first, like a compiler.
fn syntax_error(file: &Path, text: &str, e: &serde_yaml::Error) -> ConfigError {
    syntax_error_in(file, text, e, |l| l)
}

/// The same for an error in a piece of `text` whose line `l` is the file's
/// line `line_of(l)`.
fn syntax_error_in(
    file: &Path,
    text: &str,
    e: &serde_yaml::Error,
    line_of: impl Fn(usize) -> usize,
) -> ConfigError {
    let (at, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
    let mut message = e.to_string();
    let suffix = format!(" at line {at} column {column}");
    if let Some(i) = message.find(&suffix) {
        message.replace_range(i..i + suffix.len(), "");
    }
    let line = if at == 0 { 0 } else { line_of(at) };
    let message = hints::teach(&message, text, line);
    ConfigError::Syntax {
        file: file.to_path_buf(),
        line,
        column,
        message,
    }
}

#[cfg(test)]
mod tests;
