//! The gateway's shared state: the config snapshot every request reads
//! (swapped whole by a reload, never locked), the lifecycle handles, the
//! reload channel and the gateway-wide counters. Everything above the
//! sessions layer (request path, server, admin) reads it; nothing below
//! depends on it.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ServerSettings};
use crate::lifecycle::Lifecycle;
use crate::metrics::{ListenerStats, RouteStats};
use crate::pool::Pool;
use crate::router::RouteTable;

/// Everything a request needs from the config, swapped as one unit.
pub struct Snapshot {
    pub routes: RouteTable,
    pub pools: Vec<Arc<Pool>>,
    /// The fan-out state of each `mode: fanout` route, by route index.
    pub hubs: Vec<Option<Arc<crate::fanout::Hub>>>,
    /// Per route: cancelled once a reload removed the route and its drain is over.
    pub route_tokens: Vec<CancellationToken>,
    /// Per route: its counters (kept across reloads by route name).
    pub route_stats: Vec<Arc<RouteStats>>,
    pub settings: ServerSettings,
    /// The config this was built from (for `/config`).
    pub config: Arc<Config>,
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
