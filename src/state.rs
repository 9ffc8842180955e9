//! The gateway's shared state: the config snapshot every request reads
//! (swapped whole by a reload, never locked), the lifecycle handles, the
//! reload channel and the gateway-wide counters. Everything above the
//! sessions layer (request path, server, admin) reads it; nothing below
//! depends on it.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::backend::pool::Pool;
use crate::config::{Config, ServerSettings};
use crate::fanout::Hub;
use crate::lifecycle::Lifecycle;
use crate::metrics::{ListenerStats, RouteStats};
use crate::router::{Route, RouteTable};

/// Everything a request needs from the config, swapped as one unit.
pub struct Snapshot {
    /// The compiled routes, in config order (the router's match order).
    pub routes: RouteTable,
    /// What lives beside each route, one entry per route of `routes`, in
    /// the same order (both are built from the same list; see [`Snapshot::new`]).
    live: Vec<RouteState>,
    pub pools: Vec<Arc<Pool>>,
    pub settings: ServerSettings,
    /// The config this was built from (for `/config`).
    pub config: Arc<Config>,
}

/// The state a route carries beyond its config, kept across reloads by the
/// route's name.
pub struct RouteState {
    /// Its counters.
    pub stats: Arc<RouteStats>,
    /// Its fan-out hub, on a `mode: fanout` route.
    pub hub: Option<Arc<Hub>>,
    /// Cancelled once a reload removed the route and its drain is over.
    pub retired: CancellationToken,
    /// Who may connect, when the route says (`auth:`).
    pub auth: Option<Arc<crate::auth::RouteAuth>>,
}

impl Snapshot {
    /// `live` holds one entry per route of `config.routes`, in that order.
    pub fn new(
        config: Config,
        live: Vec<RouteState>,
        pools: Vec<Arc<Pool>>,
        settings: ServerSettings,
    ) -> Snapshot {
        assert_eq!(config.routes.len(), live.len(), "one state per route");
        Snapshot {
            routes: RouteTable::new(&config.routes),
            live,
            pools,
            settings,
            config: Arc::new(config),
        }
    }

    /// The route at `index` (from [`RouteTable::find_index`]) and its state.
    pub fn route(&self, index: usize) -> (&Route, &RouteState) {
        (&self.routes.routes()[index], &self.live[index])
    }

    /// Every route with its state, in config order.
    pub fn each_route(&self) -> impl Iterator<Item = (&Route, &RouteState)> {
        self.routes.routes().iter().zip(&self.live)
    }

    /// The named route's state.
    pub fn route_named(&self, name: &str) -> Option<&RouteState> {
        self.each_route()
            .find(|(r, _)| r.name == name)
            .map(|(_, s)| s)
    }
}

/// State shared by every connection of one gateway.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    /// The task tracker, the stop signals and the panic count.
    pub life: Lifecycle,
    /// Set when shutdown begins: `/readyz` answers 503 from then on.
    pub draining: std::sync::atomic::AtomicBool,
    /// Asks the serving loop to reload the config file.
    pub reload: tokio::sync::mpsc::Sender<ReloadRequest>,
    pub stats: GatewayStats,
    /// Every listener being served, for `/metrics`.
    pub listeners: std::sync::Mutex<Vec<Arc<ListenerStats>>>,
}

impl Shared {
    pub fn listener_stats(&self) -> Vec<Arc<ListenerStats>> {
        self.listeners
            .lock()
            .map(|l| l.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }
}

/// Gateway-wide counters (atomics), for `/metrics`.
#[derive(Debug, Default)]
pub struct GatewayStats {
    pub reloads_ok: std::sync::atomic::AtomicU64,
    pub reloads_failed: std::sync::atomic::AtomicU64,
    /// The last [`RELOADS_KEPT`] reloads, oldest first, for the dashboard.
    pub reload_log: std::sync::Mutex<std::collections::VecDeque<ReloadEvent>>,
}

/// Reloads remembered for the dashboard.
pub const RELOADS_KEPT: usize = 20;

/// One reload and its outcome.
#[derive(Debug, Clone)]
pub struct ReloadEvent {
    pub at: std::time::SystemTime,
    pub ok: bool,
    /// The change summary, or why the running config stayed.
    pub text: String,
}

impl GatewayStats {
    /// Counts a reload and remembers its outcome.
    pub fn note_reload(&self, ok: bool, text: &str) {
        use std::sync::atomic::Ordering::Relaxed;
        if ok {
            &self.reloads_ok
        } else {
            &self.reloads_failed
        }
        .fetch_add(1, Relaxed);
        let mut log = self.reload_log.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() == RELOADS_KEPT {
            log.pop_front();
        }
        log.push_back(ReloadEvent {
            at: std::time::SystemTime::now(),
            ok,
            text: text.to_string(),
        });
    }
}

/// One reload request; the answer is a summary of the change, or why the
/// running config stays.
pub struct ReloadRequest {
    pub reply: tokio::sync::oneshot::Sender<Result<String, String>>,
}

/// Sends a reload request and waits for its answer.
pub async fn request_reload(
    tx: &tokio::sync::mpsc::Sender<ReloadRequest>,
) -> Result<String, String> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    tx.send(ReloadRequest { reply })
        .await
        .map_err(|_| "the gateway is shutting down".to_string())?;
    answer
        .await
        .map_err(|_| "the gateway is shutting down".to_string())?
}
