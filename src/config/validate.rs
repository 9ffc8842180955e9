//! One validating function per section of `routes.yaml` (`server`,
//! `listen`, `pools`, `routes` with their fan-out keys, `admin`): raw serde
//! structs in, typed config out, every error naming file, line and key.

use super::*;

/// `server:`: limits and timeouts, with their defaults.
pub(super) fn server_settings(cx: &Ctx, s: raw::RawServer) -> Result<ServerSettings, ConfigError> {
    let d = ServerSettings::default();
    let server = ServerSettings {
        handshake_timeout: s.handshake_timeout.map_or(d.handshake_timeout, |x| x.0),
        max_connections: s.max_connections.unwrap_or(d.max_connections),
        max_header_bytes: s.max_header_bytes.unwrap_or(d.max_header_bytes),
        max_headers: s.max_headers.unwrap_or(d.max_headers),
        request_timeout: s.request_timeout.map_or(d.request_timeout, |x| x.0),
        shutdown_grace: s.shutdown_grace.map_or(d.shutdown_grace, |x| x.0),
        half_close_timeout: s.half_close_timeout.map_or(d.half_close_timeout, |x| x.0),
        drain_timeout: s.drain_timeout.map_or(d.drain_timeout, |x| x.0),
        watch_interval: s.watch_interval.map_or(d.watch_interval, |x| x.0),
        tcp_keepalive: s.tcp_keepalive.map_or(d.tcp_keepalive, |x| x.0),
        idle_timeout: s.idle_timeout.map_or(d.idle_timeout, |x| x.0),
    };
    if !server.tcp_keepalive.is_zero() && server.tcp_keepalive < Duration::from_secs(1) {
        return Err(cx.err(
            &[Seg::Key("server"), Seg::Key("tcp_keepalive")],
            "must be at least 1s (or 0s for off)",
        ));
    }
    if server.max_connections == 0 {
        return Err(cx.err(
            &[Seg::Key("server"), Seg::Key("max_connections")],
            "must be at least 1",
        ));
    }
    if server.max_header_bytes < 8192 {
        return Err(cx.err(
            &[Seg::Key("server"), Seg::Key("max_header_bytes")],
            "must be at least 8192 (browsers send large cookies)",
        ));
    }
    Ok(server)
}

/// `listen:`: addresses, TLS certificate files (relative to the config's
/// directory), the PROXY protocol switch.
///
/// `listen` holds the items that parsed, with their index in the file;
/// errors go to `errs`, and the items without one are returned.
pub(super) fn listeners(
    cx: &Ctx,
    listen: Vec<(usize, raw::RawListener)>,
    resolve: &dyn Fn(&Path) -> PathBuf,
    errs: &mut Vec<ConfigError>,
) -> Vec<ListenerConfig> {
    let text = cx.text;
    let mut listeners = Vec::new();
    for (i, l) in listen {
        let item = (|| {
            if let Some(j) = listeners
                .iter()
                .position(|x: &ListenerConfig| x.addr == l.addr && l.addr.port() != 0)
            {
                return Err(cx.err(
                    &[Seg::Key("listen"), Seg::Index(i), Seg::Key("addr")],
                    format!("{} is already used by listen[{j}]", l.addr),
                ));
            }
            let tls = match l.tls {
                None => None,
                Some(t) if t.certs.is_empty() => {
                    return Err(cx.err(
                        &[
                            Seg::Key("listen"),
                            Seg::Index(i),
                            Seg::Key("tls"),
                            Seg::Key("certs"),
                        ],
                        "list at least one `{ cert: FILE, key: FILE }`",
                    ))
                }
                Some(t) => Some(
                    t.certs
                        .into_iter()
                        .enumerate()
                        .map(|(k, c)| CertFiles {
                            cert: resolve(&c.cert),
                            key: resolve(&c.key),
                            line: locate(
                                text,
                                &[
                                    Seg::Key("listen"),
                                    Seg::Index(i),
                                    Seg::Key("tls"),
                                    Seg::Key("certs"),
                                    Seg::Index(k),
                                ],
                            ),
                        })
                        .collect(),
                ),
            };
            Ok(ListenerConfig {
                addr: l.addr,
                tls,
                proxy_protocol: l.proxy_protocol,
            })
        })();
        match item {
            Ok(l) => listeners.push(l),
            Err(e) => errs.push(e),
        }
    }
    listeners
}

/// `pools:`: backends, balancing, health checks, passive ejection, discovery.
/// Errors go to `errs`; the pools without one are returned.
pub(super) fn pools(
    cx: &Ctx,
    raw_pools: Vec<(String, raw::RawPool)>,
    resolve: &dyn Fn(&Path) -> PathBuf,
    errs: &mut Vec<ConfigError>,
) -> Vec<PoolConfig> {
    let mut pools = Vec::new();
    for (name, p) in raw_pools {
        let item = (|| {
            if p.backends.is_empty() {
                return Err(cx.err(
                    &[Seg::Key("pools"), Seg::Key(&name), Seg::Key("backends")],
                    "list at least one backend, e.g. `- ws://127.0.0.1:9001`",
                ));
            }
            if p.backends.len() > MAX_BACKENDS {
                return Err(cx.err(
                    &[Seg::Key("pools"), Seg::Key(&name), Seg::Key("backends")],
                    format!("at most {MAX_BACKENDS} backends per pool"),
                ));
            }
            for (i, b) in p.backends.iter().enumerate() {
                if p.backends[..i].iter().any(|x| x.url == b.url) {
                    return Err(cx.err(
                        &[
                            Seg::Key("pools"),
                            Seg::Key(&name),
                            Seg::Key("backends"),
                            Seg::Index(i),
                        ],
                        format!(
                            "backend {} is listed twice; use `weight` to give it a larger share",
                            b.url
                        ),
                    ));
                }
            }
            match (p.balance, &p.hash_key) {
                (Balance::Hash, None) => return Err(cx.err(
                    &[Seg::Key("pools"), Seg::Key(&name), Seg::Key("balance")],
                    "`balance: hash` needs `hash_key: ip | header:NAME | cookie:NAME | query:NAME`",
                )),
                (b, Some(_)) if b != Balance::Hash => {
                    return Err(cx.err(
                        &[Seg::Key("pools"), Seg::Key(&name), Seg::Key("hash_key")],
                        "`hash_key` is only used with `balance: hash`",
                    ))
                }
                _ => {}
            }
            let health = match p.health {
                None => None,
                Some(h) => {
                    let path = h.path.clone().unwrap_or_else(|| "/".into());
                    if !path.starts_with('/') {
                        return Err(cx.err(
                            &[
                                Seg::Key("pools"),
                                Seg::Key(&name),
                                Seg::Key("health"),
                                Seg::Key("path"),
                            ],
                            "must start with `/`",
                        ));
                    }
                    let interval = h.interval.map_or(Duration::from_secs(5), |d| d.0);
                    let timeout = h.timeout.map_or(Duration::from_secs(2), |d| d.0);
                    if interval.is_zero() || timeout.is_zero() {
                        return Err(cx.err(
                            &[Seg::Key("pools"), Seg::Key(&name), Seg::Key("health")],
                            "interval and timeout must be above zero",
                        ));
                    }
                    Some(HealthCheck {
                        interval,
                        timeout,
                        kind: match (h.ws, h.path) {
                            (true, _) => CheckKind::WebSocket(path),
                            (false, Some(p)) => CheckKind::Http(p),
                            (false, None) => CheckKind::Connect,
                        },
                        thresholds: Thresholds {
                            healthy_after: h.healthy_after.unwrap_or(2).max(1),
                            unhealthy_after: h.unhealthy_after.unwrap_or(3).max(1),
                        },
                    })
                }
            };
            let passive = PassivePolicy {
                eject_after: p.eject_after.unwrap_or(5),
                eject_for: p.eject_for.map_or(Duration::from_secs(10), |d| d.0),
            };
            let max_attempts = p.max_attempts.unwrap_or(3);
            if max_attempts == 0 {
                return Err(cx.err(
                    &[Seg::Key("pools"), Seg::Key(&name), Seg::Key("max_attempts")],
                    "must be at least 1",
                ));
            }
            let connect_timeout = p.connect_timeout.map_or(Duration::from_secs(5), |d| d.0);
            if connect_timeout.is_zero() {
                return Err(cx.err(
                    &[
                        Seg::Key("pools"),
                        Seg::Key(&name),
                        Seg::Key("connect_timeout"),
                    ],
                    "must be above zero",
                ));
            }
            let ca_file = p.ca_file.as_deref().map(resolve);
            if let Some(ca) = &ca_file {
                if let Err(e) = std::fs::metadata(ca) {
                    return Err(cx.err(
                        &[Seg::Key("pools"), Seg::Key(&name), Seg::Key("ca_file")],
                        format!("cannot read {}: {e}", ca.display()),
                    ));
                }
            }
            let rebalance = match &p.rebalance {
                None => None,
                Some(r) => Some(rebalance(cx, &name, p.balance, r)?),
            };
            Ok(PoolConfig {
                rebalance,
                name,
                balance: p.balance,
                hash_key: p.hash_key,
                connect_timeout,
                backends: p
                    .backends
                    .into_iter()
                    .map(|b| BackendSpec {
                        url: b.url,
                        weight: b.weight,
                        drain: b.drain,
                        discover: b.discover,
                    })
                    .collect(),
                ca_file,
                health,
                passive,
                fail_open: p.fail_open,
                on_backend_down: p.on_backend_down,
                max_attempts,
                slow_start: p.slow_start.map_or(Duration::ZERO, |d| d.0),
                dns_refresh: p
                    .dns_refresh
                    .map_or(Duration::from_secs(10), |d| d.0)
                    .max(Duration::from_millis(10)),
            })
        })();
        match item {
            Ok(p) => pools.push(p),
            Err(e) => errs.push(e),
        }
    }
    pools
}

/// `routes:`: host and path, the pool, origins, limits, and fan-out settings.
///
/// `raw_routes` holds the routes that parsed, with their index in the file;
/// errors go to `errs`, and the routes without one are returned.
pub(super) fn routes(
    cx: &Ctx,
    raw_routes: Vec<(usize, raw::RawRoute)>,
    pools: &[PoolConfig],
    resolve: &dyn Fn(&Path) -> PathBuf,
    errs: &mut Vec<ConfigError>,
) -> Vec<RouteConfig> {
    let mut routes: Vec<RouteConfig> = Vec::new();
    for (i, r) in raw_routes {
        let item = (|| {
            let at = |k| [Seg::Key("routes"), Seg::Index(i), Seg::Key(k)];
            if r.name.trim().is_empty() {
                return Err(cx.err(&at("name"), "a route needs a non-empty name"));
            }
            if let Some(j) = routes.iter().position(|x| x.name == r.name) {
                return Err(cx.err(
                    &at("name"),
                    format!(
                        "route name `{}` is already used by routes[{j}]; names must be unique",
                        r.name
                    ),
                ));
            }
            let find_pool = |name: &str, key: &[Seg]| {
                pools.iter().position(|p| p.name == name).ok_or_else(|| {
                    let known: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
                    cx.err(
                        key,
                        format!(
                            "no pool named `{name}`; defined pools: {}",
                            known.join(", ")
                        ),
                    )
                })
            };
            let fanout = match r.mode {
                Mode::Splice => {
                    if let Some(k) = r.fanout_keys().first() {
                        let modes = if raw::RawRoute::SHARED_KEYS.contains(k) {
                            "`mode: fanout` or `mode: frames`"
                        } else {
                            "`mode: fanout`"
                        };
                        return Err(cx.err(&at(k), format!("`{k}` is only used with {modes}")));
                    }
                    None
                }
                Mode::Frames => {
                    let only_fanout = r
                        .fanout_keys()
                        .into_iter()
                        .find(|k| !raw::RawRoute::SHARED_KEYS.contains(k));
                    if let Some(k) = only_fanout {
                        return Err(
                            cx.err(&at(k), format!("`{k}` is only used with `mode: fanout`"))
                        );
                    }
                    None
                }
                Mode::Fanout => Some(fanout_config(cx, i, &r, &find_pool)?),
            };
            if r.mode != Mode::Frames {
                if let Some(k) = r.frames_keys().first() {
                    return Err(cx.err(&at(k), format!("`{k}` is only used with `mode: frames`")));
                }
            }
            let frames = (r.mode == Mode::Frames)
                .then(|| frames_config(cx, i, &r))
                .transpose()?
                .map(std::sync::Arc::new);
            let pool = match (&r.pool, &fanout) {
                (Some(p), _) => find_pool(p, &at("pool"))?,
                (None, Some(f)) if !f.sources.is_empty() => f.sources[0],
                (None, fanout) => {
                    return Err(cx.err(
                        &[Seg::Key("routes"), Seg::Index(i)],
                        if fanout.is_some() {
                            "a fan-out route needs `pool: NAME` or `sources: [NAME, …]`"
                        } else {
                            "a route needs `pool: NAME`"
                        },
                    ))
                }
            };
            let fanout = fanout.map(|mut f| {
                if r.sources.is_none() {
                    f.sources = vec![pool];
                }
                std::sync::Arc::new(f)
            });
            let path = r.path.map_or_else(|| "/".to_string(), |p| p.0);
            if let Some(j) = routes
                .iter()
                .position(|x| x.host == r.host && x.path == path)
            {
                return Err(cx.err(
                &at("path"),
                format!(
                    "route `{}` has the same host ({}) and path ({path}) as route `{}` (routes[{j}]), so it could never match; change its host or path, or remove one",
                    r.name, r.host, routes[j].name
                ),
            ));
            }
            let origins = match &r.origins {
                None => None,
                Some(list) if list.is_empty() => {
                    return Err(cx.err(
                        &at("origins"),
                        "list at least one origin, or remove the key to allow any",
                    ))
                }
                Some(list) => Some(
                    list.iter()
                        .enumerate()
                        .map(|(k, o)| {
                            origin::OriginPattern::parse(o).map_err(|e| {
                                cx.err(
                                    &[
                                        Seg::Key("routes"),
                                        Seg::Index(i),
                                        Seg::Key("origins"),
                                        Seg::Index(k),
                                    ],
                                    e,
                                )
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            if r.max_sessions == Some(0) {
                return Err(cx.err(
                    &at("max_sessions"),
                    "must be at least 1 (remove the key for no limit)",
                ));
            }
            if r.max_sessions_per_ip == Some(0) {
                return Err(cx.err(
                    &at("max_sessions_per_ip"),
                    "must be at least 1 (remove the key for no limit)",
                ));
            }
            let limits = Limits {
                max_sessions: r.max_sessions,
                max_sessions_per_ip: r.max_sessions_per_ip,
            };
            let rebalance_close = r.rebalance.is_some();
            if rebalance_close {
                let why = if fanout.is_some() {
                    Some("fan-out sessions have no backend of their own to leave".to_string())
                } else if frames.as_ref().is_some_and(|f| f.resume) {
                    Some("a frames route with `resume: true` moves its sessions without closing them; remove the key".to_string())
                } else if pools[pool].rebalance.is_none() {
                    Some(format!(
                        "pool `{}` has no `rebalance:` settings (max_moves_per_second, tolerance), so nothing asks sessions to leave",
                        pools[pool].name
                    ))
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(cx.err(&at("rebalance"), why));
                }
            }
            let auth = match r.auth {
                Some(a) => Some(super::auth::auth(cx, i, a, resolve, pools)?),
                None => None,
            };
            Ok(RouteConfig {
                auth,
                name: r.name,
                host: r.host,
                path,
                pool,
                strip_prefix: r.strip_prefix,
                preserve_host: r.preserve_host.unwrap_or(true),
                fanout,
                frames,
                origins,
                limits,
                rebalance_close,
            })
        })();
        match item {
            Ok(r) => routes.push(r),
            Err(e) => errs.push(e),
        }
    }
    routes
}

/// `admin:`: the operators' listener; a token-less one must stay on loopback
/// unless `insecure: true`.
pub(super) fn admin(
    cx: &Ctx,
    admin: Option<raw::RawAdmin>,
) -> Result<Option<AdminConfig>, ConfigError> {
    if let Some(a) = &admin {
        if a.token.is_none() && !a.addr.ip().is_loopback() && !a.insecure {
            return Err(cx.err(
                &[Seg::Key("admin"), Seg::Key("addr")],
                format!(
                    "{} is reachable from other machines and the admin has no `token`, so anyone could read /config and POST /reload: add `token: …` (recommended), listen on 127.0.0.1, or write `insecure: true` if a network policy guards it",
                    a.addr
                ),
            ));
        }
        if let Some(k) = a
            .hosts
            .iter()
            .position(|h| h.is_empty() || h.contains(['/', ' ', ':']))
        {
            return Err(cx.err(
                &[Seg::Key("admin"), Seg::Key("hosts"), Seg::Index(k)],
                "a host name without port, scheme or spaces",
            ));
        }
        if let Some(t) = &a.token {
            if t.trim().is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(cx.err(
                    &[Seg::Key("admin"), Seg::Key("token")],
                    "a token is printable ASCII without spaces",
                ));
            }
        }
    }
    Ok(admin.map(|a| AdminConfig {
        addr: a.addr,
        token: a.token,
        hosts: a.hosts,
        insecure: a.insecure,
    }))
}

/// Looks a pool up by name, or errs at the given key.
type FindPool<'a> = dyn Fn(&str, &[Seg]) -> Result<usize, ConfigError> + 'a;

/// A pool's `rebalance:` settings, with their defaults.
fn rebalance(
    cx: &Ctx,
    name: &str,
    balance: Balance,
    r: &raw::RawRebalance,
) -> Result<Rebalance, ConfigError> {
    let at = |k| {
        [
            Seg::Key("pools"),
            Seg::Key(name),
            Seg::Key("rebalance"),
            Seg::Key(k),
        ]
    };
    if balance == Balance::Hash {
        return Err(cx.err(
            &[Seg::Key("pools"), Seg::Key(name), Seg::Key("rebalance")],
            "not used with `balance: hash` (the hash decides where each key goes)",
        ));
    }
    let max_moves_per_second = r.max_moves_per_second.unwrap_or(10);
    if max_moves_per_second == 0 {
        return Err(cx.err(&at("max_moves_per_second"), "must be at least 1"));
    }
    let tolerance = r.tolerance.unwrap_or(0.2);
    if !(0.0..=10.0).contains(&tolerance) {
        return Err(cx.err(
            &at("tolerance"),
            "must be between 0 and 10 (a fraction of the mean)",
        ));
    }
    Ok(Rebalance {
        max_moves_per_second,
        tolerance,
    })
}

/// Validates a `mode: frames` route's keys, with their defaults.
fn frames_config(cx: &Ctx, i: usize, r: &raw::RawRoute) -> Result<FramesConfig, ConfigError> {
    let at = |k| [Seg::Key("routes"), Seg::Index(i), Seg::Key(k)];
    let resume = r.resume.unwrap_or(false);
    if !resume {
        if let Some(k) = r.frames_keys().into_iter().find(|k| *k != "resume") {
            return Err(cx.err(&at(k), format!("`{k}` is only used with `resume: true`")));
        }
    }
    let ping_interval = r.ping_interval.map_or(Duration::from_secs(30), |d| d.0);
    let pong_timeout = r.pong_timeout.map_or(Duration::from_secs(10), |d| d.0);
    if ping_interval.is_zero() || pong_timeout.is_zero() {
        return Err(cx.err(
            &at("ping_interval"),
            "ping_interval and pong_timeout must be above zero",
        ));
    }
    let resume_timeout = r.resume_timeout.map_or(Duration::from_secs(10), |d| d.0);
    if resume_timeout.is_zero() {
        return Err(cx.err(&at("resume_timeout"), "must be above zero"));
    }
    if r.client_rate == Some(0) {
        return Err(cx.err(
            &at("client_rate"),
            "must be at least 1 (leave it out for no limit)",
        ));
    }
    let max_message = r.max_message.unwrap_or(16 << 20);
    if max_message < 125 {
        return Err(cx.err(&at("max_message"), "must be at least 125 bytes"));
    }
    Ok(FramesConfig {
        resume,
        replay_first: r.replay_first.unwrap_or(0),
        resume_buffer: r.resume_buffer.unwrap_or(1 << 20),
        resume_timeout,
        on_resume: r.on_resume.clone(),
        compression: r.compression.unwrap_or(false),
        max_message,
        client_rate: r.client_rate,
        ping_interval,
        pong_timeout,
    })
}

/// Validates a `mode: fanout` route's keys. `sources` is left empty when
/// the route names its feed with `pool` (the caller fills it in).
fn fanout_config(
    cx: &Ctx,
    i: usize,
    r: &raw::RawRoute,
    find_pool: &FindPool,
) -> Result<FanoutConfig, ConfigError> {
    let at = |k| [Seg::Key("routes"), Seg::Index(i), Seg::Key(k)];
    let mut sources = Vec::new();
    if let Some(list) = &r.sources {
        if r.pool.is_some() {
            return Err(cx.err(&at("sources"), "use either `pool` or `sources`, not both"));
        }
        if list.is_empty() {
            return Err(cx.err(&at("sources"), "list at least one pool"));
        }
        for (k, name) in list.iter().enumerate() {
            let key = [
                Seg::Key("routes"),
                Seg::Index(i),
                Seg::Key("sources"),
                Seg::Index(k),
            ];
            let p = find_pool(name, &key)?;
            if sources.contains(&p) {
                return Err(cx.err(&key, format!("pool `{name}` is listed twice")));
            }
            sources.push(p);
        }
    }
    let channel = r.channel.clone().unwrap_or_default();
    let eager = r.eager.unwrap_or(false);
    if eager && channel != ChannelKey::Path {
        return Err(cx.err(
            &at("eager"),
            "`eager` opens the route's own channel, so it needs `channel: path` (the default)",
        ));
    }
    if let Some(p) = &r.upstream_path {
        if !p.starts_with('/') {
            return Err(cx.err(&at("upstream_path"), "must start with `/`"));
        }
        let probe = p.replace("{channel}", "x");
        if http::uri::PathAndQuery::try_from(probe.as_str()).is_err() {
            return Err(cx.err(&at("upstream_path"), "is not a valid request target"));
        }
    }
    let max_lag = r.max_lag.unwrap_or(1024);
    if !(1..=1_000_000).contains(&max_lag) {
        return Err(cx.err(&at("max_lag"), "must be between 1 and 1000000"));
    }
    let replay_last = r.replay_last.unwrap_or(0);
    if replay_last > max_lag {
        return Err(cx.err(
            &at("replay_last"),
            format!("must not exceed max_lag ({max_lag})"),
        ));
    }
    let client_rate = r.client_rate.unwrap_or(10);
    if client_rate == 0 {
        return Err(cx.err(
            &at("client_rate"),
            "must be at least 1 (messages per second)",
        ));
    }
    let max_message = r.max_message.unwrap_or(64 * 1024);
    if !(125..=16 * 1024 * 1024).contains(&max_message) {
        return Err(cx.err(&at("max_message"), "must be between 125 and 16777216 bytes"));
    }
    let ping_interval = r.ping_interval.map_or(Duration::from_secs(30), |d| d.0);
    let pong_timeout = r.pong_timeout.map_or(Duration::from_secs(10), |d| d.0);
    if ping_interval < Duration::from_millis(10) || pong_timeout < Duration::from_millis(10) {
        return Err(cx.err(
            &at(if r.pong_timeout.is_some() {
                "pong_timeout"
            } else {
                "ping_interval"
            }),
            "must be at least 10ms",
        ));
    }
    let reconnect_max = r.reconnect_max.map_or(Duration::from_secs(5), |d| d.0);
    if reconnect_max < Duration::from_millis(100) {
        return Err(cx.err(&at("reconnect_max"), "must be at least 100ms"));
    }
    let max_channels = r.max_channels.unwrap_or(100);
    if max_channels == 0 {
        return Err(cx.err(&at("max_channels"), "must be at least 1"));
    }
    let channel_opens_per_ip = r.channel_opens_per_ip.unwrap_or(30);
    if channel_opens_per_ip == 0 {
        return Err(cx.err(
            &at("channel_opens_per_ip"),
            "must be at least 1 (new channels per minute per client address)",
        ));
    }
    if let Some(list) = &r.channels {
        if list.is_empty() {
            return Err(cx.err(
                &at("channels"),
                "list at least one channel key or pattern (or leave `channels` out to allow any)",
            ));
        }
        if let Some(k) = list.iter().position(|p| p.is_empty()) {
            return Err(cx.err(
                &[
                    Seg::Key("routes"),
                    Seg::Index(i),
                    Seg::Key("channels"),
                    Seg::Index(k),
                ],
                "a channel pattern cannot be empty",
            ));
        }
    }
    for (k, m) in r.subscribe.iter().flatten().enumerate() {
        if m.is_empty() {
            return Err(cx.err(
                &[
                    Seg::Key("routes"),
                    Seg::Index(i),
                    Seg::Key("subscribe"),
                    Seg::Index(k),
                ],
                "a subscribe message cannot be empty",
            ));
        }
    }
    Ok(FanoutConfig {
        sources,
        tag: r.tag.unwrap_or(false),
        channel,
        upstream_path: r.upstream_path.clone(),
        eager,
        linger: r.linger.map_or(Duration::from_secs(5), |d| d.0),
        max_lag,
        slow_client: r.slow_client.unwrap_or_default(),
        replay_last,
        on_upstream_lost: r.on_upstream_lost.clone(),
        subscribe: r.subscribe.clone().unwrap_or_default(),
        client_messages: r.client_messages.unwrap_or_default(),
        client_rate,
        compression: r.compression.unwrap_or(false),
        max_message,
        ping_interval,
        pong_timeout,
        reconnect_max,
        max_channels,
        channels: r.channels.clone(),
        channel_opens_per_ip,
    })
}
