//! The compiled route table in words, as `upgate check` prints it: the
//! listeners, every route with its settings, every pool with its backends.

use std::fmt::Write as _;

use super::{Balance, Config, HashKey};

/// Writes a line into the summary (formatting into a `String` cannot fail).
macro_rules! w {
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

impl Config {
    /// The table `upgate check` prints.
    pub fn summary(&self) -> String {
        let c = self;
        let mut out = String::new();
        for l in &c.listeners {
            let scheme = if l.tls.is_some() { "https" } else { "http" };
            let pp = if l.proxy_protocol {
                "  (PROXY protocol)"
            } else {
                ""
            };
            w!(out, "listen  {scheme}://{}{pp}", l.addr);
        }
        w!(
            out,
            "{:<14} {:<24} {:<16} {:<10} notes",
            "route",
            "host",
            "path",
            "pool"
        );
        for r in &c.routes {
            let pool = &c.pools[r.pool];
            let mut notes = Vec::new();
            if r.strip_prefix {
                notes.push("strip_prefix".to_string());
            }
            if let Some(f) = &r.frames {
                notes.push(if f.resume {
                    format!(
                        "frames, resume (replay_first {}, resume_timeout {:?})",
                        f.replay_first, f.resume_timeout
                    )
                } else {
                    "frames".to_string()
                });
            }
            if r.rebalance_close {
                notes.push("rebalance: close (1012)".to_string());
            }
            if let Some(f) = &r.fanout {
                let sources: Vec<&str> = f
                    .sources
                    .iter()
                    .map(|&i| c.pools[i].name.as_str())
                    .collect();
                notes.push(format!("fanout from {}", sources.join("+")));
                if f.compression {
                    notes.push("compression".to_string());
                }
                notes.push(format!(
                    "max_channels {}, channel_opens_per_ip {}/min",
                    f.max_channels, f.channel_opens_per_ip
                ));
                if let Some(keys) = &f.channels {
                    notes.push(format!("channels {}", keys.join(" ")));
                }
            }
            if let Some(o) = &r.origins {
                let o: Vec<String> = o.iter().map(|p| p.to_string()).collect();
                notes.push(format!("origins {}", o.join(" ")));
            }
            if let Some(a) = &r.auth {
                notes.push(a.summary());
            }
            if let Some(n) = r.limits.max_sessions {
                notes.push(format!("max_sessions {n}"));
            }
            if let Some(n) = r.limits.max_sessions_per_ip {
                notes.push(format!("max_sessions_per_ip {n}"));
            }
            let note = notes.join(", ");
            w!(
                out,
                "{:<14} {:<24} {:<16} {:<10} {note}",
                r.name,
                r.host.to_string(),
                r.path,
                pool.name
            );
        }
        for p in &c.pools {
            let list: Vec<String> = p
                .backends
                .iter()
                .map(|b| {
                    let mut s = b.url.to_string();
                    if b.weight != 1 {
                        s.push_str(&format!(" (weight {})", b.weight));
                    }
                    if b.discover {
                        s.push_str(" (discover: dns)");
                    }
                    s
                })
                .collect();
            let mut hash = p
                .hash_key
                .as_ref()
                .map_or(String::new(), |k| format!(" on {k}"));
            if let Some(r) = &p.rebalance {
                hash.push_str(&format!(
                    ", rebalance {}/s within {}",
                    r.max_moves_per_second, r.tolerance
                ));
            }
            w!(
                out,
                "pool {} ({}{hash}, connect_timeout {:?}): {}",
                p.name,
                p.balance,
                p.connect_timeout,
                list.join(", ")
            );
        }
        out
    }
}

impl std::fmt::Display for Balance {
    /// As the config spells it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastConn => "least_conn",
            Balance::P2c => "p2c",
            Balance::Hash => "hash",
        })
    }
}

impl std::fmt::Display for HashKey {
    /// As the config spells it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HashKey::Ip => f.write_str("ip"),
            HashKey::Header(h) => write!(f, "header:{h}"),
            HashKey::Cookie(c) => write!(f, "cookie:{c}"),
            HashKey::Query(q) => write!(f, "query:{q}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::Config;

    #[test]
    fn values_are_printed_as_the_config_spells_them() {
        let c = Config::parse(
            std::path::Path::new("routes.yaml"),
            "listen:\n  - addr: 127.0.0.1:0\npools:\n  a: { balance: least_conn, backends: [ws://127.0.0.1:9] }\n  b: { balance: hash, hash_key: 'query:room', backends: [ws://127.0.0.1:9] }\nroutes:\n  - { name: r, path: /r, pool: a }\n  - { name: s, path: /s, pool: b }\n",
        )
        .expect("config");
        let s = c.summary();
        assert!(s.contains("pool a (least_conn, connect_timeout"), "{s}");
        assert!(s.contains("pool b (hash on query:room,"), "{s}");
        assert!(!s.contains("LeastConn") && !s.contains("Query("), "{s}");
    }
}
