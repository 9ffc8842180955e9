//! DNS discovery: a `discover: dns` backend stands for every address its
//! name resolves to, resolved again every `dns_refresh`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tracing::{info, warn};

use super::pool::{new_backend, Backend, Members, Pool};
use crate::config::MAX_BACKENDS;

/// Resolves a host name to addresses (the system resolver, or one a test controls).
pub type Resolver = Arc<
    dyn Fn(
            String,
            u16,
        ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<std::net::IpAddr>>> + Send>>
        + Send
        + Sync,
>;

/// The system resolver (`getaddrinfo` through tokio).
pub fn system_resolver() -> Resolver {
    Arc::new(|host, port| {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), port)).await?;
            let mut ips: Vec<std::net::IpAddr> = addrs.map(|a| a.ip()).collect();
            ips.sort();
            ips.dedup();
            Ok(ips)
        })
    })
}

impl Pool {
    /// Whether some backends come from DNS discovery.
    pub fn discovers(&self) -> bool {
        self.specs.iter().any(|b| b.discover)
    }

    /// Resolves the `discover: dns` backends again and swaps in the new set.
    /// Addresses still present keep their backend (health, live counts);
    /// vanished ones leave the rotation while their live sessions continue.
    pub async fn refresh(&self, resolver: &Resolver) {
        let born = tokio::time::Instant::now();
        let current = self.backends();
        let mut next: Vec<Arc<Backend>> = Vec::new();
        for spec in &self.specs {
            if !spec.discover {
                next.extend(current.iter().find(|b| b.url == spec.url).cloned());
                continue;
            }
            let ips = match resolver(spec.url.host.clone(), spec.url.port).await {
                Ok(ips) => ips,
                Err(e) => {
                    // Keep what we had for this name rather than dropping it on a DNS hiccup.
                    warn!(pool = %self.name, host = %spec.url.host, error = %e, "DNS discovery failed; keeping the previous addresses");
                    next.extend(
                        current
                            .iter()
                            .filter(|b| b.tls_name == spec.url.host)
                            .cloned(),
                    );
                    continue;
                }
            };
            for ip in ips {
                let mut url = spec.url.clone();
                url.host = ip.to_string();
                if let Some(b) = current.iter().find(|b| b.url == url) {
                    next.push(b.clone());
                } else if let Ok(b) = new_backend(&self.name, &url, &spec.url.host, spec, born) {
                    info!(pool = %self.name, backend = %url, name = %spec.url.host, "discovered backend added");
                    next.push(Arc::new(b));
                }
            }
        }
        for gone in current
            .iter()
            .filter(|b| !next.iter().any(|n| n.url == b.url))
        {
            info!(pool = %self.name, backend = %gone.url, live = gone.active(), "backend left discovery: drained");
        }
        if next.len() > MAX_BACKENDS {
            warn!(pool = %self.name, found = next.len(), "more than {MAX_BACKENDS} backends; keeping the first");
            next.truncate(MAX_BACKENDS);
        }
        self.members.store(Arc::new(Members::new(next)));
    }
}
