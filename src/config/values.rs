//! The scalar values of `routes.yaml` that check themselves while being
//! read (durations, backend URLs, host patterns, path prefixes), so that
//! their errors carry the YAML line and column.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use super::raw::{ChannelKey, HashKey};

/// A duration written as `250ms`, `2s`, `5m` or `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(|| {
                format!("duration `{s}` needs a unit: ms, s, m or h (for example `2s`)")
            })?;
        let (num, unit) = s.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a duration like `500ms` or `2s`"))?;
        let secs = match unit {
            "ms" => n / 1000.0,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            _ => {
                return Err(format!(
                    "unknown duration unit `{unit}` in `{s}`: use ms, s, m or h"
                ))
            }
        };
        if !secs.is_finite() || secs > 365.0 * 24.0 * 3600.0 {
            return Err(format!("duration `{s}` is out of range"));
        }
        Ok(Dur(Duration::from_secs_f64(secs)))
    }
}

/// Implements `Deserialize` through `FromStr`, so the error points at the value.
macro_rules! deserialize_from_str {
    ($ty:ty, $what:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl de::Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        v.parse().map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

deserialize_from_str!(Dur, "a duration such as `2s` or `500ms`");
deserialize_from_str!(BackendUrl, "a backend URL such as `ws://127.0.0.1:9001`");
deserialize_from_str!(
    HostPattern,
    "a host such as `chat.example.com` or `*.example.com`"
);
deserialize_from_str!(PathPrefix, "a path prefix starting with `/`");
deserialize_from_str!(ChannelKey, "`path`, `query:NAME` or `header:NAME`");
deserialize_from_str!(
    HashKey,
    "`ip`, `header:NAME`, `cookie:NAME` or `query:NAME`"
);

/// A backend address: `ws://host:port[/base]` or `wss://host:port[/base]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Base path prepended to the forwarded path; empty when the URL has none.
    pub base_path: String,
}

impl fmt::Display for BackendUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "wss" } else { "ws" };
        if self.host.contains(':') {
            write!(
                f,
                "{scheme}://[{}]:{}{}",
                self.host, self.port, self.base_path
            )
        } else {
            write!(
                f,
                "{scheme}://{}:{}{}",
                self.host, self.port, self.base_path
            )
        }
    }
}

impl FromStr for BackendUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("ws://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("wss://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(format!(
                "backend `{s}` must start with ws://, wss://, http:// or https://"
            ));
        };
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if path.contains(['?', '#']) {
            return Err(format!(
                "backend `{s}` may have a path but no query or fragment"
            ));
        }
        if authority.contains('@') {
            return Err(format!(
                "backend `{s}`: credentials in the URL are not supported"
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let end = v6
                .find(']')
                .ok_or_else(|| format!("backend `{s}`: unclosed `[` in IPv6 address"))?;
            let port = v6[end + 1..].strip_prefix(':');
            (&v6[..end], port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("backend `{s}` has no host"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("backend `{s}`: `{p}` is not a valid port"))?,
            None if tls => 443,
            None => 80,
        };
        let base_path = path.trim_end_matches('/').to_string();
        Ok(BackendUrl {
            tls,
            host: host.to_ascii_lowercase(),
            port,
            base_path,
        })
    }
}

/// Which `Host` a route answers: one name, a `*.suffix` wildcard, or any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HostPattern {
    #[default]
    Any,
    Exact(String),
    /// Stored with its leading dot: `*.example.com` is `.example.com`.
    Suffix(String),
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

impl FromStr for HostPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let h = s.trim().trim_end_matches('.').to_ascii_lowercase();
        if h.is_empty() || h == "*" {
            return Ok(HostPattern::Any);
        }
        let (wild, name) = match h.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, h.as_str()),
        };
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return Err(format!(
                "host `{s}` is not a host name; write `chat.example.com`, `*.example.com`, or leave `host` out to match any host (no port, no scheme)"
            ));
        }
        Ok(if wild {
            HostPattern::Suffix(format!(".{name}"))
        } else {
            HostPattern::Exact(name.to_string())
        })
    }
}

/// A normalised path prefix: starts with `/`, no trailing `/` except the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPrefix(pub String);

impl FromStr for PathPrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.starts_with('/') {
            return Err(format!("path `{s}` must start with `/`"));
        }
        if s.contains(['?', '#', ' ', '*']) {
            return Err(format!(
                "path `{s}` is a plain prefix: no query, fragment, spaces or wildcards"
            ));
        }
        let t = s.trim_end_matches('/');
        Ok(PathPrefix(if t.is_empty() { "/".into() } else { t.into() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!("2s".parse::<Dur>().unwrap().0, Duration::from_secs(2));
        assert_eq!(
            "250ms".parse::<Dur>().unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!("1.5m".parse::<Dur>().unwrap().0, Duration::from_secs(90));
        assert!("2".parse::<Dur>().is_err());
        assert!("2days".parse::<Dur>().is_err());
        assert!("s".parse::<Dur>().is_err());
    }

    #[test]
    fn backend_urls() {
        let u: BackendUrl = "ws://127.0.0.1:9001".parse().unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.base_path.as_str()),
            (false, "127.0.0.1", 9001, "")
        );
        let u: BackendUrl = "wss://Feed.Example.com/v1/".parse().unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.base_path.as_str()),
            (true, "feed.example.com", 443, "/v1")
        );
        let u: BackendUrl = "ws://[::1]:9000".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9000));
        assert_eq!(u.to_string(), "ws://[::1]:9000");
        for bad in [
            "tcp://x:1",
            "ws://:80",
            "ws://h:0",
            "ws://h:99999",
            "ws://h:1/?q",
            "ws://u@h:1",
        ] {
            assert!(bad.parse::<BackendUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn hosts_and_paths() {
        assert_eq!(
            "Chat.Example.com.".parse::<HostPattern>().unwrap(),
            HostPattern::Exact("chat.example.com".into())
        );
        assert_eq!(
            "*.example.com".parse::<HostPattern>().unwrap(),
            HostPattern::Suffix(".example.com".into())
        );
        assert_eq!("*".parse::<HostPattern>().unwrap(), HostPattern::Any);
        assert!("example.com:80".parse::<HostPattern>().is_err());
        assert!("a..b".parse::<HostPattern>().is_err());
        assert_eq!("/chat/".parse::<PathPrefix>().unwrap().0, "/chat");
        assert_eq!("/".parse::<PathPrefix>().unwrap().0, "/");
        assert!("chat".parse::<PathPrefix>().is_err());
        assert!("/chat?x".parse::<PathPrefix>().is_err());
    }
}
