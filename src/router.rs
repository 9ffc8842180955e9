//! The compiled route table.
//!
//! Precedence: the most specific host wins (exact name, then the longest
//! `*.suffix`, then routes without a host); among the routes of that host the
//! longest path prefix wins. Prefixes match on segment boundaries: `/chat`
//! matches `/chat`, `/chat/` and `/chat/x`, never `/chatty`. Order in the file
//! never matters, so a general route cannot shadow a specific one.
//!
//! `find` does no allocation and no regex work: one hash lookup for the exact
//! host, then short scans of prefix lists sorted longest first.

use std::collections::HashMap;

use crate::config::{HostPattern, RouteConfig};

/// A route as the request path needs it: the validated config entry.
pub type Route = RouteConfig;

#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Route indices per exact host, longest path first.
    exact: HashMap<Box<str>, Vec<usize>>,
    /// (suffix with leading dot, route indices longest path first), longest suffix first.
    suffix: Vec<(Box<str>, Vec<usize>)>,
    /// Routes without a host, longest path first.
    any: Vec<usize>,
}

/// Longest host name we normalise on the stack; longer names match no exact or suffix route.
const MAX_HOST: usize = 255;

impl RouteTable {
    pub fn new(configs: &[RouteConfig]) -> RouteTable {
        let mut t = RouteTable {
            routes: configs.to_vec(),
            ..RouteTable::default()
        };
        for (i, r) in t.routes.iter().enumerate() {
            match &r.host {
                HostPattern::Exact(h) => t.exact.entry(h.as_str().into()).or_default().push(i),
                HostPattern::Suffix(s) => match t.suffix.iter_mut().find(|(x, _)| **x == **s) {
                    Some((_, v)) => v.push(i),
                    None => t.suffix.push((s.as_str().into(), vec![i])),
                },
                HostPattern::Any => t.any.push(i),
            }
        }
        let routes = &t.routes;
        let by_path_len =
            |v: &mut Vec<usize>| v.sort_by_key(|&i| std::cmp::Reverse(routes[i].path.len()));
        t.exact.values_mut().for_each(by_path_len);
        t.suffix.iter_mut().for_each(|(_, v)| by_path_len(v));
        by_path_len(&mut t.any);
        t.suffix.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        t
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route for `host` (a `Host` header or URI authority, port allowed) and `path`.
    pub fn find(&self, host: &str, path: &str) -> Option<&Route> {
        self.find_index(host, path).map(|i| &self.routes[i])
    }

    /// Like [`find`](Self::find), returning the route's index in [`routes`](Self::routes).
    pub fn find_index(&self, host: &str, path: &str) -> Option<usize> {
        let mut buf = [0u8; MAX_HOST];
        let host = normalize_host(host, &mut buf);
        let pick = |list: &[usize]| {
            list.iter()
                .copied()
                .find(|&i| prefix_matches(&self.routes[i].path, path))
        };
        if let Some(h) = host {
            if let Some(r) = self.exact.get(h).and_then(|l| pick(l)) {
                return Some(r);
            }
            for (suffix, list) in &self.suffix {
                if h.len() > suffix.len() && h.ends_with(&**suffix) {
                    if let Some(r) = pick(list) {
                        return Some(r);
                    }
                }
            }
        }
        pick(&self.any)
    }
}

/// Whether `prefix` (normalised, no trailing slash unless root) matches `path` on a segment boundary.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The path the backend sees when the route strips its prefix: `/ticker/x` → `/x`, `/ticker` → `/`.
pub fn strip<'a>(prefix: &str, path: &'a str) -> &'a str {
    if prefix == "/" {
        return path;
    }
    match path.strip_prefix(prefix) {
        Some("") | None => "/",
        Some(rest) => rest,
    }
}

/// Lower-cases `host` into `buf` without its port and trailing dot.
/// `None` when it is too long or not ASCII (such a host can only match host-less routes).
fn normalize_host<'b>(host: &str, buf: &'b mut [u8; MAX_HOST]) -> Option<&'b str> {
    let h = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or(v6)
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    let h = h.strip_suffix('.').unwrap_or(h);
    if h.len() > MAX_HOST || !h.is_ascii() {
        return None;
    }
    let out = &mut buf[..h.len()];
    out.copy_from_slice(h.as_bytes());
    out.make_ascii_lowercase();
    std::str::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(specs: &[(&str, &str, &str)]) -> RouteTable {
        let cfgs: Vec<RouteConfig> = specs
            .iter()
            .map(|(name, host, path)| RouteConfig {
                name: name.to_string(),
                host: host.parse().unwrap(),
                path: path.parse::<crate::config::raw::PathPrefix>().unwrap().0,
                pool: 0,
                strip_prefix: false,
                preserve_host: true,
                fanout: None,
                frames: None,
                origins: None,
                limits: Default::default(),
                auth: None,
                rebalance_close: false,
            })
            .collect();
        RouteTable::new(&cfgs)
    }

    fn name<'a>(t: &'a RouteTable, host: &str, path: &str) -> Option<&'a str> {
        t.find(host, path).map(|r| r.name.as_str())
    }

    #[test]
    fn segment_boundaries() {
        assert!(prefix_matches("/chat", "/chat"));
        assert!(prefix_matches("/chat", "/chat/"));
        assert!(prefix_matches("/chat", "/chat/room/1"));
        assert!(!prefix_matches("/chat", "/chatty"));
        assert!(!prefix_matches("/chat", "/cha"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn strip_prefix_paths() {
        assert_eq!(strip("/ticker", "/ticker"), "/");
        assert_eq!(strip("/ticker", "/ticker/"), "/");
        assert_eq!(strip("/ticker", "/ticker/eur"), "/eur");
        assert_eq!(strip("/", "/x"), "/x");
    }

    #[test]
    fn most_specific_host_then_longest_path() {
        // Listed general-first on purpose: order in the file must not matter.
        let t = table(&[
            ("root", "", "/"),
            ("any-chat", "", "/chat"),
            ("wild", "*.example.com", "/"),
            ("wild-deep", "*.eu.example.com", "/"),
            ("exact-root", "chat.example.com", "/"),
            ("exact-chat", "chat.example.com", "/chat"),
            ("exact-chat-admin", "chat.example.com", "/chat/admin"),
        ]);
        assert_eq!(name(&t, "chat.example.com", "/chat/x"), Some("exact-chat"));
        assert_eq!(
            name(&t, "chat.example.com", "/chat/admin/1"),
            Some("exact-chat-admin")
        );
        assert_eq!(name(&t, "chat.example.com", "/other"), Some("exact-root"));
        assert_eq!(
            name(&t, "CHAT.Example.COM:8443", "/chat"),
            Some("exact-chat")
        );
        assert_eq!(name(&t, "chat.example.com.", "/chat"), Some("exact-chat"));
        assert_eq!(name(&t, "a.example.com", "/chat"), Some("wild"));
        assert_eq!(name(&t, "a.eu.example.com", "/chat"), Some("wild-deep"));
        // The bare domain is not covered by its wildcard.
        assert_eq!(name(&t, "example.com", "/chat"), Some("any-chat"));
        assert_eq!(name(&t, "other.org", "/chatty"), Some("root"));
        assert_eq!(name(&t, "[::1]:8080", "/chat"), Some("any-chat"));
    }

    #[test]
    fn a_host_without_matching_path_falls_back_to_less_specific_hosts() {
        let t = table(&[("exact", "a.example.com", "/api"), ("any", "", "/")]);
        assert_eq!(name(&t, "a.example.com", "/ws"), Some("any"));
        assert_eq!(name(&t, "a.example.com", "/api/v1"), Some("exact"));
    }

    #[test]
    fn no_match() {
        let t = table(&[("chat", "chat.example.com", "/chat")]);
        assert_eq!(name(&t, "chat.example.com", "/"), None);
        assert_eq!(name(&t, "other", "/chat"), None);
        let long = "a".repeat(400);
        assert_eq!(name(&t, &long, "/chat"), None);
    }
}
