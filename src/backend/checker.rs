//! Active health checks: one task per pool with `health:` configured, probing
//! every backend each interval (with ±10 % jitter, so pools and gateways do
//! not probe in step) and feeding the results to each backend's [`Health`].
//!
//! [`Health`]: crate::backend::health::Health

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backend::balance::{fnv1a, Rng};
use crate::backend::health::Flip;
use crate::backend::pool::{Backend, Pool};
use crate::config::{CheckKind, HealthCheck, OnBackendDown};
use crate::supervise::{Kind, Panics};

/// Starts the pool's checks, if it has them, supervised (a panic restarts
/// them); they end with `pool.life`.
pub fn spawn(pool: &Arc<Pool>, tasks: &TaskTracker, panics: &Arc<Panics>) {
    if let Some(check) = pool.health.clone() {
        let (p, life) = (pool.clone(), pool.life.clone());
        crate::supervise::spawn(
            tasks,
            panics.clone(),
            Kind::HealthCheck,
            format!("pool {}", pool.name),
            pool.life.clone(),
            move || run(p.clone(), check.clone(), life.clone()),
        );
    }
}

async fn run(pool: Arc<Pool>, check: HealthCheck, stop: CancellationToken) {
    let rng = Rng::new(fnv1a(pool.name.as_bytes()) ^ u64::from(std::process::id()));
    loop {
        let jitter = 0.9 + 0.2 * (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
        tokio::select! {
            _ = tokio::time::sleep(check.interval.mul_f64(jitter)) => {}
            _ = stop.cancelled() => return,
        }
        let members = pool.backends();
        let probes = members
            .iter()
            .map(|b| probe(&pool, b, &check.kind, check.timeout));
        let results = futures_util::future::join_all(probes).await;
        for (b, ok) in members.iter().zip(results) {
            // No verdict (the gateway itself was out of resources): nothing to record.
            let Some(ok) = ok else { continue };
            match b.health.record_check(ok, check.thresholds) {
                Some(Flip::Down) => {
                    let close = pool.on_backend_down == OnBackendDown::Close;
                    warn!(pool = %pool.name, backend = %b.url, live = b.active(), closing = close, "backend marked down by health checks");
                    if close {
                        b.signal_down();
                    }
                }
                Some(Flip::Up) => {
                    info!(pool = %pool.name, backend = %b.url, "backend marked up by health checks")
                }
                None => {}
            }
        }
    }
}

/// One probe: true when the backend answered as the check expects, in
/// time; `None` when the gateway could not even try (out of descriptors or
/// memory), which says nothing about the backend.
pub async fn probe(pool: &Pool, b: &Backend, kind: &CheckKind, timeout: Duration) -> Option<bool> {
    let attempt = async {
        let mut io = match pool.connect_within(b, timeout).await {
            Ok(io) => io,
            Err(e) if e.is_local() => return None,
            Err(_) => return Some(false),
        };
        let head = match kind {
            CheckKind::Connect => return Some(true),
            CheckKind::Http(path) => format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: upgate-health\r\nConnection: close\r\n\r\n",
                b.authority
            ),
            CheckKind::WebSocket(path) => format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: upgate-health\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dXBnYXRlIGhlYWx0aCBrZXk=\r\nSec-WebSocket-Version: 13\r\n\r\n",
                b.authority
            ),
        };
        let Ok(answer) =
            crate::backend::upgrade::exchange(&mut io, head.as_bytes(), timeout, 16 * 1024).await
        else {
            return Some(false);
        };
        Some(match kind {
            CheckKind::WebSocket(_) => answer.status == http::StatusCode::SWITCHING_PROTOCOLS,
            _ => answer.status.is_success(),
        })
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Some(false))
}
