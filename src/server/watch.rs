//! Watches the config file and the certificate and auth key files it
//! names, and asks for a reload when one changes (size or modification
//! time), so editing `routes.yaml`, renewing a certificate or rotating a
//! JWT key file needs no signal.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::state::Shared;

/// What identifies a file's version cheaply.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(p: &PathBuf) -> Stamp {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The config file and every certificate, key and JWT key file it names.
fn files(shared: &Shared) -> Vec<PathBuf> {
    let snap = shared.snapshot.load();
    let cfg = &snap.config;
    let mut v = vec![cfg.source.clone()];
    for l in &cfg.listeners {
        for f in l.tls.iter().flatten() {
            v.push(f.cert.clone());
            v.push(f.key.clone());
        }
    }
    use crate::config::auth::KeyKind;
    for r in &cfg.routes {
        for k in r
            .auth
            .iter()
            .filter_map(|a| a.jwt.as_ref())
            .flat_map(|j| &j.keys)
        {
            if let KeyKind::Pem(p) | KeyKind::JwksFile(p) = &k.kind {
                v.push(p.clone());
            }
        }
    }
    v
}

/// Polls every `every` until `stop`; does nothing while the config file does not exist.
pub async fn run(shared: Arc<Shared>, every: Duration, stop: CancellationToken) {
    let mut watched: Vec<(PathBuf, Stamp)> = files(&shared)
        .into_iter()
        .map(|f| (f.clone(), stamp(&f)))
        .collect();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let changed: Vec<&PathBuf> = watched
            .iter()
            .filter(|(f, s)| stamp(f) != *s)
            .map(|(f, _)| f)
            .collect();
        if changed.is_empty() || watched[0].1.is_none() && stamp(&watched[0].0).is_none() {
            continue;
        }
        info!(files = ?changed, "config, certificate or key files changed; reloading");
        // A refusal is logged by the reload itself.
        if let Ok(summary) = crate::state::request_reload(&shared.reload).await {
            debug!(%summary, "reload from the file watcher done");
        }
        // Watch what the (possibly new) config names, as it is now.
        watched = files(&shared)
            .into_iter()
            .map(|f| (f.clone(), stamp(&f)))
            .collect();
    }
}
