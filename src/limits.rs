//! Per-route session limits: `max_sessions` (live WebSocket sessions on the
//! route) and `max_sessions_per_ip` (per client address). A session is
//! admitted before any backend or fan-out channel is touched, counts from
//! then on (its handshake included) and is released when it ends.
//!
//! Counting happens at session start and end only, never per message.

use std::collections::hash_map::Entry;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::error::ProxyError;
use crate::metrics::RouteStats;

pub use crate::config::Limits;

pub use crate::metrics::Admitted;

/// One admitted session; dropping it releases its place.
#[derive(Debug)]
pub struct Admission {
    stats: Arc<RouteStats>,
    ip: IpAddr,
}

/// Admits a session from `ip` on a route, or says which limit it hit.
pub fn admit(
    stats: &Arc<RouteStats>,
    limits: Limits,
    ip: IpAddr,
    route: &str,
) -> Result<Admission, ProxyError> {
    let a = &stats.admitted;
    let total = a.total.fetch_add(1, Relaxed) + 1;
    if limits.max_sessions.is_some_and(|max| total > max) {
        a.total.fetch_sub(1, Relaxed);
        a.refused_route.fetch_add(1, Relaxed);
        return Err(ProxyError::RouteFull {
            route: route.to_string(),
            limit: limits.max_sessions.unwrap_or_default(),
        });
    }
    let mut per_ip = a.per_ip.lock().unwrap_or_else(|e| e.into_inner());
    let n = per_ip.entry(ip).or_insert(0);
    if limits.max_sessions_per_ip.is_some_and(|max| *n >= max) {
        drop(per_ip);
        a.total.fetch_sub(1, Relaxed);
        a.refused_ip.fetch_add(1, Relaxed);
        return Err(ProxyError::ClientFull {
            ip,
            route: route.to_string(),
            limit: limits.max_sessions_per_ip.unwrap_or_default(),
        });
    }
    *n += 1;
    Ok(Admission {
        stats: stats.clone(),
        ip,
    })
}

impl Drop for Admission {
    fn drop(&mut self) {
        let a = &self.stats.admitted;
        a.total.fetch_sub(1, Relaxed);
        let mut per_ip = a.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        // One lookup for the count and its removal.
        if let Entry::Occupied(mut n) = per_ip.entry(self.ip) {
            let count = n.get_mut();
            *count = count.saturating_sub(1);
            if *count == 0 {
                n.remove();
            }
        }
    }
}

impl Admitted {
    /// Sessions admitted now (live, or handshaking).
    pub fn total(&self) -> u64 {
        self.total.load(Relaxed)
    }
    /// Distinct client addresses with a session now.
    pub fn clients(&self) -> usize {
        self.per_ip.lock().map_or(0, |m| m.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_hold_and_places_come_back() {
        let stats = Arc::new(RouteStats::default());
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let l = Limits {
            max_sessions: Some(3),
            max_sessions_per_ip: Some(2),
        };
        let a1 = admit(&stats, l, a, "r").unwrap();
        let a2 = admit(&stats, l, a, "r").unwrap();
        let e = admit(&stats, l, a, "r").unwrap_err();
        assert!(matches!(e, ProxyError::ClientFull { limit: 2, .. }), "{e}");
        let b1 = admit(&stats, l, b, "r").unwrap();
        let e = admit(&stats, l, b, "r").unwrap_err();
        assert!(matches!(e, ProxyError::RouteFull { limit: 3, .. }), "{e}");
        assert_eq!((stats.admitted.total(), stats.admitted.clients()), (3, 2));
        drop(a1);
        let b2 = admit(&stats, l, b, "r").unwrap();
        drop((a2, b1, b2));
        assert_eq!((stats.admitted.total(), stats.admitted.clients()), (0, 0));
        assert_eq!(stats.admitted.refused_ip.load(Relaxed), 1);
        assert_eq!(stats.admitted.refused_route.load(Relaxed), 1);
        // Without limits everything is admitted, and still counted.
        let all: Vec<_> = (0..100)
            .map(|_| admit(&stats, Limits::default(), a, "r").unwrap())
            .collect();
        assert_eq!(stats.admitted.total(), 100);
        drop(all);
        assert_eq!(stats.admitted.clients(), 0);
    }
}
