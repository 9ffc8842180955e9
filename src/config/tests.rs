//! Parsing and validating whole configuration files.

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
    let y = OK.replace(
        "    pool: ticker\n",
        "    pool: ticker\n    origins:\n      - https://*.example.com\n      - app.example.com\n",
    );
    let e = parse(&y).unwrap_err().to_string();
    assert!(
        e.starts_with("t/routes.yaml:21: routes[1].origins[1]: `app.example.com` has no scheme"),
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
    assert!(e.contains("duplicate name `chat`"), "{e}");
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

/// Every mistake of a file in one run, in file order, each with its line,
/// key path and hint; two mistyped keys in one route are both found.
#[test]
fn every_error_of_a_file_at_once() {
    let y = "\
server:
  handshake_timeout: 10
listen:
  - addr: 127.0.0.1:0
pools:
  chat:
    balance: round_robbin
    backends: [ws://127.0.0.1:9001]
  ticker:
    backends: [ws://127.0.0.1:9101]
    conect_timeout: 2s
routes:
  - name: a
    path: /a
    pool: chat
    strip_prefx: true
    presrve_host: false
  - { name: b, path: /b, pool: nope }
  - name: c
    pool: ticker
    mode: fanot
  - name: d
    path: /d
    pool: ticker
    replay_last: 1
";
    let e = parse(y).unwrap_err();
    let ConfigError::Many(all) = &e else {
        panic!("one error only: {e}");
    };
    let lines: Vec<String> = all.iter().map(ToString::to_string).collect();
    let want = [
        "t/routes.yaml:2:22: server.handshake_timeout: duration `10` needs a unit",
        "t/routes.yaml:7:14: pools.chat.balance: unknown value `round_robbin`; did you mean `round_robin`?",
        "t/routes.yaml:11:5: pools.ticker: unknown key `conect_timeout`; did you mean `connect_timeout`?",
        "t/routes.yaml:16:5: routes[0]: unknown key `strip_prefx`; did you mean `strip_prefix`?",
        "t/routes.yaml:17:5: routes[0]: unknown key `presrve_host`; did you mean `preserve_host`?",
        "t/routes.yaml:18: routes[1].pool: no pool named `nope`; defined pools: chat, ticker",
        "t/routes.yaml:21:11: routes[2].mode: unknown value `fanot`; did you mean `fanout`?",
        // (and not "no pool named `ticker`": that pool failed above)
        "t/routes.yaml:25: routes[3].replay_last: `replay_last` is only used with `mode: fanout`",
    ];
    assert_eq!(lines.len(), want.len(), "{e}");
    for (got, want) in lines.iter().zip(want) {
        assert!(got.starts_with(want), "{got}\nwanted {want}…\nall:\n{e}");
    }
    assert!(e.to_string().ends_with("\n8 errors"), "{e}");
    assert_eq!(e.line(), Some(2));
}

/// A route naming a pool that failed to parse is not blamed for it.
#[test]
fn a_broken_pool_is_reported_once() {
    let y = OK.replace("    balance: least_conn\n", "    balance: least_con\n");
    let e = err(&y);
    assert!(e.contains("did you mean `least_conn`?"), "{e}");
    assert!(!e.contains("no pool named"), "{e}");
    assert!(
        !e.contains("errors"),
        "a single error stays a single line: {e}"
    );
}

/// Sections the file lacks or does not know, beside other mistakes.
#[test]
fn missing_and_unknown_sections() {
    let y = "listen:\n  - addr: 127.0.0.1:0\npool:\n  chat: { backends: [ws://127.0.0.1:1] }\nroutes:\n  - { name: r, pool: chat, mode: fanot }\n";
    let e = err(y);
    assert!(
        e.contains("t/routes.yaml:3:1: unknown key `pool`; did you mean `pools`?"),
        "{e}"
    );
    assert!(
        e.contains("t/routes.yaml:1: pools: missing section `pools:`"),
        "{e}"
    );
    assert!(e.contains("routes[0].mode: unknown value `fanot`"), "{e}");
}
