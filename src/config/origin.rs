//! `origins:` on a route: the web origins whose pages may open WebSockets
//! through it. Browsers send `Origin` with every WebSocket handshake and do
//! not apply CORS to WebSockets, so without a check any site a user visits
//! can open a WebSocket to the service with the user's cookies
//! (cross-site WebSocket hijacking). Clients that are not browsers send no
//! `Origin` and are not affected.

/// One allowed origin: `scheme://host[:port]`, the host possibly `*.suffix`,
/// or `null` (sandboxed frames, `file:` pages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPattern {
    Null,
    Site {
        /// Lower case, with `://`.
        scheme: String,
        /// Lower case; for a wildcard, the suffix after `*.`.
        host: String,
        wildcard: bool,
        /// `:8443`, or empty for the scheme's default port.
        port: String,
    },
}

impl OriginPattern {
    /// Parses a pattern from the config, or says what is wrong with it.
    pub fn parse(s: &str) -> Result<OriginPattern, String> {
        let s = s.trim().to_ascii_lowercase();
        if s == "null" {
            return Ok(OriginPattern::Null);
        }
        let bad = |why: &str| {
            format!("`{s}` {why}; write an origin as a browser sends it, e.g. `https://app.example.com`, `https://*.example.com` or `http://localhost:8080`")
        };
        let (scheme, rest) = s.split_once("://").ok_or_else(|| bad("has no scheme"))?;
        if scheme.is_empty()
            || !scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
        {
            return Err(bad("has an invalid scheme"));
        }
        let (host, port) = split_port(rest);
        if port.is_none() && rest.contains(':') && !rest.starts_with('[') {
            return Err(bad("has an invalid port"));
        }
        let (host, wildcard) = match host.strip_prefix("*.") {
            Some(h) => (h, true),
            None => (host, false),
        };
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.[]:".contains(c))
        {
            return Err(bad(
                "is not scheme://host[:port] (no path, no `*` but a leading `*.`)",
            ));
        }
        Ok(OriginPattern::Site {
            scheme: format!("{scheme}://"),
            host: host.to_string(),
            wildcard,
            port: port.map_or(String::new(), |p| format!(":{p}")),
        })
    }

    /// Whether the `Origin` header value `origin` is this origin.
    pub fn matches(&self, origin: &str) -> bool {
        match self {
            OriginPattern::Null => origin.eq_ignore_ascii_case("null"),
            OriginPattern::Site {
                scheme,
                host,
                wildcard,
                port,
            } => {
                let Some(rest) = strip_prefix_ci(origin, scheme) else {
                    return false;
                };
                let (h, p) = split_port(rest);
                let p_ok = match p {
                    Some(p) => port.strip_prefix(':') == Some(p),
                    None => port.is_empty(),
                };
                let h_ok = if *wildcard {
                    // Bytes, not str slices: `h` may hold multi-byte characters.
                    let (h, host) = (h.as_bytes(), host.as_bytes());
                    h.len() > host.len() + 1
                        && h[h.len() - host.len() - 1] == b'.'
                        && h[h.len() - host.len()..].eq_ignore_ascii_case(host)
                } else {
                    h.eq_ignore_ascii_case(host)
                };
                p_ok && h_ok
            }
        }
    }
}

impl std::fmt::Display for OriginPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OriginPattern::Null => f.write_str("null"),
            OriginPattern::Site {
                scheme,
                host,
                wildcard,
                port,
            } => {
                let star = if *wildcard { "*." } else { "" };
                write!(f, "{scheme}{star}{host}{port}")
            }
        }
    }
}

/// Whether `origin` (an `Origin` header value) is one of `allowed`.
pub fn allowed(allowed: &[OriginPattern], origin: &str) -> bool {
    allowed.iter().any(|p| p.matches(origin))
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// `host[:port]` → host and the port digits, if any (IPv6 hosts in brackets).
fn split_port(s: &str) -> (&str, Option<&str>) {
    match s.rsplit_once(':') {
        Some((h, p))
            if !p.is_empty()
                && p.len() <= 5
                && p.bytes().all(|b| b.is_ascii_digit())
                && (!h.starts_with('[') || h.ends_with(']')) =>
        {
            (h, Some(p))
        }
        _ => (s, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_rng as rng;

    #[test]
    fn arbitrary_strings_never_panic() {
        let mut r = rng(3);
        let alphabet: Vec<char> = "ahtps:/.*[]0123456789-é€😀 null".chars().collect();
        let pats: Vec<OriginPattern> = ["https://*.é.com", "http://*.a", "null", "https://a:1"]
            .iter()
            .filter_map(|s| OriginPattern::parse(s).ok())
            .collect();
        for _ in 0..20_000 {
            let n = (r() % 30) as usize;
            let mut s: String = (0..n)
                .map(|_| alphabet[(r() as usize) % alphabet.len()])
                .collect();
            if r().is_multiple_of(2) {
                s.insert_str(0, ["http://", "https://"][(r() % 2) as usize]);
            }
            if let Ok(p) = OriginPattern::parse(&s) {
                let _ = p.matches(&s);
            }
            for p in &pats {
                let _ = p.matches(&s);
            }
        }
    }

    fn p(s: &str) -> OriginPattern {
        OriginPattern::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn exact_wildcard_port_and_null() {
        let exact = p("https://App.Example.com");
        assert!(exact.matches("https://app.example.com"));
        assert!(exact.matches("HTTPS://APP.EXAMPLE.COM"));
        for no in [
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://app.example.com.evil.net",
            "https://evilapp.example.com",
            "https://example.com",
            "null",
            "",
            "https://",
        ] {
            assert!(!exact.matches(no), "{no}");
        }
        let wild = p("https://*.example.com");
        assert!(wild.matches("https://a.example.com"));
        assert!(wild.matches("https://a.b.example.com"));
        for no in [
            "https://example.com",
            "https://.example.com",
            "https://aexample.com",
            "https://a.example.com:444",
            "http://a.example.com",
        ] {
            assert!(!wild.matches(no), "{no}");
        }
        let port = p("http://localhost:8080");
        assert!(port.matches("http://localhost:8080"));
        assert!(!port.matches("http://localhost"));
        assert!(!port.matches("http://localhost:80800"));
        let v6 = p("http://[::1]:3000");
        assert!(v6.matches("http://[::1]:3000"));
        assert!(!v6.matches("http://[::1]"));
        assert!(p("null").matches("null"));
        assert!(!p("null").matches("https://null"));
        assert_eq!(
            p("https://*.Example.com:8443").to_string(),
            "https://*.example.com:8443"
        );
    }

    #[test]
    fn bad_patterns_are_refused_with_a_hint() {
        for bad in [
            "app.example.com",
            "https://app.example.com/path",
            "https://",
            "*",
            "https://*",
            "https://a.*.com",
            "https://app.example.com:http",
            "1http://x",
        ] {
            let e = OriginPattern::parse(bad).expect_err(bad);
            assert!(e.contains("e.g. `https://app.example.com`"), "{e}");
        }
    }
}
