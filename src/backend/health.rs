//! Backend health: a per-backend state machine driven by active checks and
//! by the outcomes of real requests (passive checks).
//!
//! The state is a handful of atomics, read without a lock on every pick:
//! - active checks flip `healthy` only after `healthy_after` consecutive
//!   successes or `unhealthy_after` consecutive failures, so one lost probe
//!   does not take a backend out;
//! - passive checks count consecutive failures of real connection attempts;
//!   at `eject_after` the backend is ejected for `eject_for`, doubled on each
//!   repeated ejection (up to 32×) and reset by the next success.
//!
//! Time is milliseconds on tokio's clock since the pool was built, so tests
//! can pause it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

pub use crate::config::{PassivePolicy, Thresholds};

/// What an active check result changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flip {
    Up,
    Down,
}

#[derive(Debug)]
pub struct Health {
    base: Instant,
    healthy: AtomicBool,
    /// Consecutive active-check results against the current state.
    streak: AtomicU32,
    /// Consecutive failures of real requests.
    failures: AtomicU32,
    /// Ejections in a row (grows the period).
    ejections: AtomicU32,
    ejected_until_ms: AtomicU64,
    /// When it last came (back) up, for slow start; `u64::MAX` when never down.
    up_since_ms: AtomicU64,
}

impl Health {
    pub fn new(base: Instant) -> Health {
        Health {
            base,
            healthy: AtomicBool::new(true),
            streak: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            up_since_ms: AtomicU64::new(u64::MAX),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether new connections may go to this backend now.
    pub fn available(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && self.ejected_for().is_none()
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// How much longer the current ejection lasts, if ejected.
    pub fn ejected_for(&self) -> Option<Duration> {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        let now = self.now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    /// Records an active check; returns the flip it caused, if any.
    pub fn record_check(&self, ok: bool, t: Thresholds) -> Option<Flip> {
        let healthy = self.healthy.load(Ordering::Relaxed);
        if ok == healthy {
            self.streak.store(0, Ordering::Relaxed);
            if ok {
                // A healthy answer also ends an ejection early (and starts its slow start).
                if self.ejected_for().is_some() {
                    self.up_since_ms.store(self.now_ms(), Ordering::Relaxed);
                }
                self.ejected_until_ms.store(0, Ordering::Relaxed);
                self.ejections.store(0, Ordering::Relaxed);
            }
            return None;
        }
        let n = self.streak.fetch_add(1, Ordering::Relaxed) + 1;
        let needed = if ok {
            t.healthy_after
        } else {
            t.unhealthy_after
        };
        if n < needed.max(1) {
            return None;
        }
        self.streak.store(0, Ordering::Relaxed);
        self.healthy.store(ok, Ordering::Relaxed);
        if ok {
            self.up_since_ms.store(self.now_ms(), Ordering::Relaxed);
            self.ejected_until_ms.store(0, Ordering::Relaxed);
            self.ejections.store(0, Ordering::Relaxed);
            self.failures.store(0, Ordering::Relaxed);
            Some(Flip::Up)
        } else {
            Some(Flip::Down)
        }
    }

    /// Records a real connection attempt's outcome; returns true when this
    /// failure ejected the backend.
    pub fn record_request(&self, ok: bool, p: PassivePolicy) -> bool {
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            self.ejections.store(0, Ordering::Relaxed);
            return false;
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if p.eject_after == 0 || n < p.eject_after {
            return false;
        }
        self.failures.store(0, Ordering::Relaxed);
        let k = self.ejections.fetch_add(1, Ordering::Relaxed).min(5);
        let period = p.eject_for.saturating_mul(1 << k);
        let until = self
            .now_ms()
            .saturating_add(u64::try_from(period.as_millis()).unwrap_or(u64::MAX));
        self.ejected_until_ms.store(until, Ordering::Relaxed);
        // It comes back when the period ends: its slow start begins then.
        self.up_since_ms.store(until, Ordering::Relaxed);
        true
    }

    /// The share of its normal traffic a backend should get `slow_start`
    /// after coming back up: from 5 % right away, growing linearly to 1.
    pub fn ramp(&self, slow_start: Duration) -> f64 {
        let since = self.up_since_ms.load(Ordering::Relaxed);
        if slow_start.is_zero() || since == u64::MAX {
            return 1.0;
        }
        let up_for = self.now_ms().saturating_sub(since) as f64;
        (up_for / slow_start.as_millis() as f64).clamp(0.05, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        healthy_after: 2,
        unhealthy_after: 3,
    };
    const P: PassivePolicy = PassivePolicy {
        eject_after: 3,
        eject_for: Duration::from_secs(10),
    };

    #[tokio::test(start_paused = true)]
    async fn active_checks_flip_only_after_thresholds() {
        let h = Health::new(Instant::now());
        assert!(h.available());
        assert_eq!(h.record_check(false, T), None);
        assert_eq!(h.record_check(false, T), None);
        assert_eq!(h.record_check(true, T), None); // streak broken
        assert_eq!(h.record_check(false, T), None);
        assert_eq!(h.record_check(false, T), None);
        assert_eq!(h.record_check(false, T), Some(Flip::Down));
        assert!(!h.available());
        assert_eq!(h.record_check(true, T), None);
        assert_eq!(h.record_check(true, T), Some(Flip::Up));
        assert!(h.available());
    }

    #[tokio::test(start_paused = true)]
    async fn passive_failures_eject_for_a_growing_period() {
        let h = Health::new(Instant::now());
        assert!(!h.record_request(false, P));
        assert!(!h.record_request(false, P));
        assert!(h.record_request(false, P));
        assert!(!h.available());
        assert_eq!(h.ejected_for(), Some(Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(h.available(), "back after the period");
        // Failing again right away: ejected for twice as long.
        for _ in 0..3 {
            h.record_request(false, P);
        }
        assert_eq!(h.ejected_for(), Some(Duration::from_secs(20)));
        // A passing active check re-admits it early and resets the growth.
        assert_eq!(h.record_check(true, T), None);
        assert!(h.available());
        for _ in 0..3 {
            h.record_request(false, P);
        }
        assert_eq!(h.ejected_for(), Some(Duration::from_secs(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn slow_start_ramps_after_recovery() {
        let h = Health::new(Instant::now());
        let ss = Duration::from_secs(10);
        assert_eq!(h.ramp(ss), 1.0, "never down: full share");
        for _ in 0..3 {
            h.record_check(false, T);
        }
        h.record_check(true, T);
        h.record_check(true, T);
        assert_eq!(h.ramp(ss), 0.05);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!((h.ramp(ss) - 0.5).abs() < 0.01);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(h.ramp(ss), 1.0);
        assert_eq!(h.ramp(Duration::ZERO), 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn successes_reset_the_failure_count_and_eject_after_zero_never_ejects() {
        let h = Health::new(Instant::now());
        h.record_request(false, P);
        h.record_request(false, P);
        h.record_request(true, P);
        assert!(!h.record_request(false, P));
        let never = PassivePolicy {
            eject_after: 0,
            ..P
        };
        for _ in 0..100 {
            assert!(!h.record_request(false, never));
        }
        assert!(h.available());
    }
}
