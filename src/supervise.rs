//! Background work under supervision: health checkers, DNS discovery, the
//! config watcher and fan-out channels run as named tasks whose panics are
//! caught, logged with the task's name, counted
//! (`upgate_task_panics_total{task}`), and answered: the task restarts with
//! backoff (from 100 ms, doubling, up to 30 s; back to 100 ms after a minute
//! of good behaviour), and whoever waits on it learns that it ended.
//!
//! A panic is a bug, never an input we expect; the point is that one bad
//! byte from a peer costs one restart and a log line, not a silently dead
//! health checker whose backends stay "healthy" forever.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::error;

/// The kinds of supervised task, the `task` label of the panic counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    HealthCheck,
    DnsDiscovery,
    ConfigWatch,
    FanoutChannel,
    JwksRefresh,
    Rebalance,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::HealthCheck,
        Kind::DnsDiscovery,
        Kind::ConfigWatch,
        Kind::FanoutChannel,
        Kind::JwksRefresh,
        Kind::Rebalance,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Kind::HealthCheck => "health_check",
            Kind::DnsDiscovery => "dns_discovery",
            Kind::ConfigWatch => "config_watch",
            Kind::FanoutChannel => "fanout_channel",
            Kind::JwksRefresh => "jwks_refresh",
            Kind::Rebalance => "rebalance",
        }
    }
}

/// Panics caught, per kind.
#[derive(Debug, Default)]
pub struct Panics([AtomicU64; Kind::ALL.len()]);

impl Panics {
    pub fn count(&self, kind: Kind) -> u64 {
        self.0[kind as usize].load(Ordering::Relaxed)
    }

    /// Counts and logs one caught panic.
    pub fn record(&self, kind: Kind, name: &str, payload: &(dyn Any + Send)) {
        self.0[kind as usize].fetch_add(1, Ordering::Relaxed);
        error!(
            task = kind.label(),
            name,
            panic = panic_message(payload),
            "background task panicked"
        );
    }
}

/// The text of a panic payload (`panic!` with a string, or a formatted one).
pub fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

/// Backoff between restarts.
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(30);
    /// A task that ran this long before panicking starts from `MIN` again.
    const FORGIVE: Duration = Duration::from_secs(60);

    pub fn new() -> Backoff {
        Backoff { next: Self::MIN }
    }

    /// The pause before the next restart of a task that ran for `ran`.
    pub fn after(&mut self, ran: Duration) -> Duration {
        if ran >= Self::FORGIVE {
            self.next = Self::MIN;
        }
        let pause = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        pause
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

/// Runs `make()` on `tasks` until it returns or `stop` is cancelled,
/// restarting it with backoff whenever it panics.
pub fn spawn<F, Fut>(
    tasks: &TaskTracker,
    panics: std::sync::Arc<Panics>,
    kind: Kind,
    name: String,
    stop: CancellationToken,
    mut make: F,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tasks.spawn(async move {
        let mut backoff = Backoff::new();
        loop {
            let started = tokio::time::Instant::now();
            let run = AssertUnwindSafe(make()).catch_unwind();
            let payload = tokio::select! {
                r = run => match r {
                    Ok(()) => return,
                    Err(p) => p,
                },
                _ = stop.cancelled() => return,
            };
            panics.record(kind, &name, &*payload);
            let pause = backoff.after(started.elapsed());
            tracing::warn!(task = kind.label(), name, restart_in = ?pause, "restarting");
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_counted_and_restarted_with_backoff() {
        let tasks = TaskTracker::new();
        let panics = Arc::new(Panics::default());
        let runs = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let r = runs.clone();
        let t0 = tokio::time::Instant::now();
        spawn(
            &tasks,
            panics.clone(),
            Kind::HealthCheck,
            "pool p".into(),
            stop.clone(),
            move || {
                let r = r.clone();
                async move {
                    // Panics on its first three runs, then finishes.
                    if r.fetch_add(1, Ordering::Relaxed) < 3 {
                        panic!("bad byte");
                    }
                }
            },
        );
        tasks.close();
        tasks.wait().await;
        assert_eq!(runs.load(Ordering::Relaxed), 4);
        assert_eq!(panics.count(Kind::HealthCheck), 3);
        assert_eq!(panics.count(Kind::DnsDiscovery), 0);
        // 100 + 200 + 400 ms of backoff.
        assert_eq!(t0.elapsed(), Duration::from_millis(700));
    }

    #[tokio::test(start_paused = true)]
    async fn stop_ends_a_task_that_keeps_panicking() {
        let tasks = TaskTracker::new();
        let panics = Arc::new(Panics::default());
        let stop = CancellationToken::new();
        spawn(
            &tasks,
            panics.clone(),
            Kind::ConfigWatch,
            "watch".into(),
            stop.clone(),
            || async { panic!("always") },
        );
        tokio::time::sleep(Duration::from_secs(100)).await;
        stop.cancel();
        tasks.close();
        tasks.wait().await;
        // 0.1 + 0.2 + … up to 30 s apart: a handful, not thousands.
        let n = panics.count(Kind::ConfigWatch);
        assert!((5..=12).contains(&n), "{n} restarts in 100 s");
    }

    #[test]
    fn backoff_doubles_and_forgives() {
        let mut b = Backoff::new();
        let ms = |d: Duration| d.as_millis();
        let seq: Vec<_> = (0..10).map(|_| ms(b.after(Duration::ZERO))).collect();
        assert_eq!(
            seq,
            [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000]
        );
        assert_eq!(ms(b.after(Duration::from_secs(61))), 100);
    }
}
