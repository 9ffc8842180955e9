//! Hot reload: the next [`Snapshot`] is built from a new config, keeping
//! everything that still exists, and swapped in as one unit.
//!
//! What is kept: a pool whose config is unchanged is the same object (its
//! health, live counts, checks, HTTP connections); a changed pool is rebuilt
//! but takes over the backend objects listed the same way; a fan-out route
//! with the same settings and sources keeps its hub (channels and clients).
//! A route keeps its drain token by name. What is gone is retired: sessions
//! on a removed route or backend keep running for `drain_timeout`, then end
//! (1001 for fan-out clients, a TCP close for spliced sessions).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::auth::RouteAuth;
use crate::backend::pool::{Backend, Pool, PoolError};
use crate::config::{Config, ServerSettings};
use crate::fanout::Hub;
use crate::router::RouteTable;
use crate::state::{RouteState, Snapshot};

/// A snapshot ready to swap in, and what the swap retires.
pub struct Next {
    pub snapshot: Snapshot,
    /// New or rebuilt pools: their health checks and discovery start.
    pub started: Vec<Arc<Pool>>,
    /// Old pools not kept: their tasks stop.
    pub stopped: Vec<Arc<Pool>>,
    /// Retired after the drain period.
    pub retire: Retire,
    pub summary: String,
}

/// What a reload removed, to be closed once the drain period is over.
#[derive(Default)]
pub struct Retire {
    pub routes: Vec<CancellationToken>,
    pub backends: Vec<Arc<Backend>>,
    pub hubs: Vec<Arc<Hub>>,
}

impl Retire {
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.backends.is_empty() && self.hubs.is_empty()
    }

    /// Closes what is retired after `after` (sessions run on until then).
    /// Not a tracked task: a pending drain must not hold up shutdown, whose
    /// own grace period ends those sessions anyway.
    pub fn schedule(self, after: Duration) {
        if self.is_empty() {
            return;
        }
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            for t in &self.routes {
                t.cancel();
            }
            for b in &self.backends {
                b.retired().cancel();
            }
            for h in &self.hubs {
                h.retired.cancel();
            }
        });
    }
}

/// Why a config could not become a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("{}: {source}", file.display())]
    Auth {
        file: std::path::PathBuf,
        #[source]
        source: crate::auth::AuthError,
    },
}

/// The snapshot of a gateway's first config.
pub fn initial(cfg: &Config) -> Result<Snapshot, BuildError> {
    Ok(build(None, cfg)?.snapshot)
}

/// Of the `server:` settings a reload applies only `drain_timeout`; the
/// others (listener limits, timeouts the HTTP stack was built with) stay as
/// the process started, so they are never half applied.
/// Builds the snapshot for `cfg`, keeping what `old` has that still exists.
///
pub fn build(old: Option<&Snapshot>, cfg: &Config) -> Result<Next, BuildError> {
    let settings = match old {
        Some(o) => ServerSettings {
            drain_timeout: cfg.server.drain_timeout,
            ..o.settings.clone()
        },
        None => cfg.server.clone(),
    };
    let mut pools = Vec::with_capacity(cfg.pools.len());
    let mut started = Vec::new();
    for pc in &cfg.pools {
        let prev = old.and_then(|o| o.pools.iter().find(|p| p.name == pc.name));
        match prev {
            Some(p) if p.cfg == *pc => pools.push(p.clone()),
            _ => {
                let p = Arc::new(Pool::new(pc)?);
                if let Some(prev) = prev {
                    p.carry_over(prev);
                }
                started.push(p.clone());
                pools.push(p);
            }
        }
    }
    let mut retire = Retire::default();
    let mut stopped = Vec::new();
    if let Some(o) = old {
        for p in &o.pools {
            if !pools.iter().any(|n| Arc::ptr_eq(n, p)) {
                stopped.push(p.clone());
            }
            // A backend is gone when its URL left its pool (or the pool left).
            let next = pools
                .iter()
                .find(|n| n.name == p.name)
                .map(|n| n.backends());
            for b in p.backends().iter() {
                if !next
                    .as_ref()
                    .is_some_and(|n| n.iter().any(|x| x.url == b.url))
                {
                    retire.backends.push(b.clone());
                }
            }
        }
    }

    // Per-route state kept by route name: the drain token, the counters and
    // (when its settings and sources allow) the fan-out hub.
    let mut live = Vec::with_capacity(cfg.routes.len());
    for r in &cfg.routes {
        let prev = old.and_then(|o| o.route_named(&r.name));
        let hub = r
            .fanout
            .as_ref()
            .map(|f| match prev.and_then(|p| p.hub.clone()) {
                Some(h) if h.can_keep(f, &pools) => {
                    h.set_pools(f, &pools);
                    h
                }
                _ => Arc::new(Hub::new(r, f.clone(), &pools, &settings)),
            });
        let stats: Arc<crate::metrics::RouteStats> =
            prev.map(|p| p.stats.clone()).unwrap_or_default();
        // Keys are read again on every reload (rotated files, a changed
        // secret); keys fetched from JWKS URLs carry over until the next fetch.
        let auth = match &r.auth {
            Some(a) => {
                let auth = RouteAuth::new(&r.name, a, stats.clone(), &pools).map_err(|source| {
                    BuildError::Auth {
                        file: cfg.source.clone(),
                        source,
                    }
                })?;
                if let Some(old) = prev.and_then(|p| p.auth.as_ref()) {
                    auth.carry_over(old);
                }
                Some(Arc::new(auth))
            }
            None => None,
        };
        live.push(RouteState {
            stats,
            hub,
            retired: prev.map(|p| p.retired.clone()).unwrap_or_default(),
            auth,
        });
    }

    let mut summary = Vec::new();
    if let Some(o) = old {
        let names = |t: &RouteTable| {
            t.routes()
                .iter()
                .map(|r| r.name.clone())
                .collect::<Vec<_>>()
        };
        let (was, now) = (
            names(&o.routes),
            cfg.routes
                .iter()
                .map(|r| r.name.clone())
                .collect::<Vec<_>>(),
        );
        for (r, state) in o.each_route() {
            if !now.contains(&r.name) {
                retire.routes.push(state.retired.clone());
                summary.push(format!("route {} removed", r.name));
            }
        }
        for n in now.iter().filter(|n| !was.contains(n)) {
            summary.push(format!("route {n} added"));
        }
        for (_, state) in o.each_route() {
            let Some(h) = &state.hub else { continue };
            if !live
                .iter()
                .filter_map(|n| n.hub.as_ref())
                .any(|n| Arc::ptr_eq(n, h))
            {
                retire.hubs.push(h.clone());
            }
        }
        for p in &started {
            summary.push(format!(
                "pool {} {}",
                p.name,
                if o.pools.iter().any(|x| x.name == p.name) {
                    "changed"
                } else {
                    "added"
                }
            ));
        }
        for p in stopped
            .iter()
            .filter(|p| !pools.iter().any(|n| n.name == p.name))
        {
            summary.push(format!("pool {} removed", p.name));
        }
        if !retire.backends.is_empty() {
            summary.push(format!("{} backend(s) removed", retire.backends.len()));
        }
    }
    if summary.is_empty() {
        summary.push("no change to routes or pools".into());
    }
    let summary = summary.join(", ");
    Ok(Next {
        snapshot: Snapshot::new(cfg.clone(), live, pools, settings),
        started,
        stopped,
        retire,
        summary,
    })
}
