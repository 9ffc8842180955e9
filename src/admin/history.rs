//! The dashboard's memory: what the gateway's counters did over the last 15
//! minutes, one sample a second, in a fixed-size ring.
//!
//! Each series (a route's upgrades per second, a backend's health, a
//! channel's clients…) is [`CAPACITY`] `f32` slots, 3.6 KiB. There are six
//! series per route, six gateway-wide refusal series, two per backend and
//! four per charted channel (the [`CHANNELS_PER_ROUTE`] busiest of each
//! fan-out route), and never more than [`MAX_SERIES`] (7 MiB) in all: a
//! series with no sample for 15 minutes (a removed route or backend, a
//! closed channel) is dropped. The demo keeps 34 (38 with a ticker channel open: 137 KiB).
//!
//! The sampler also ticks the splice's reporting epoch
//! ([`crate::metrics::tick_report_epoch`]), which is what makes live
//! sessions' bytes and messages show before those sessions end.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{AuthReason, Outcome};
use crate::state::Shared;

/// Samples kept: 15 minutes at one a second.
pub const CAPACITY: usize = 900;
/// Time between samples.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Channels charted per fan-out route (the ones with the most clients).
pub const CHANNELS_PER_ROUTE: usize = 10;
/// Series kept at most; beyond it, new series are not recorded.
pub const MAX_SERIES: usize = 2_000;

/// A series' name: which chart group, which thing, which figure.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key {
    group: &'static str,
    name: String,
    metric: &'static str,
}

struct Series {
    values: Box<[f32]>,
    /// The number of the last sample that had a value.
    last: u64,
}

#[derive(Default)]
struct Inner {
    /// Samples taken so far; sample `n` lives in slot `n % CAPACITY`.
    taken: u64,
    /// When each slot's sample was taken (Unix milliseconds).
    times: Vec<u64>,
    series: BTreeMap<Key, Series>,
    /// Counter readings of the previous sample, for rates.
    prev: HashMap<Key, u64>,
    prev_at: Option<Instant>,
    /// Series that could not be kept (over [`MAX_SERIES`]).
    refused: u64,
}

/// The ring of samples, shared by the sampler and the admin API.
#[derive(Default)]
pub struct History {
    inner: Mutex<Inner>,
}

/// One sample being gathered: gauges as read, counters as rates.
struct Sample<'a> {
    prev: &'a HashMap<Key, u64>,
    next: HashMap<Key, u64>,
    /// Seconds since the previous sample (`None` for the first).
    dt: Option<f64>,
    values: Vec<(Key, f32)>,
}

impl Sample<'_> {
    fn gauge(&mut self, group: &'static str, name: &str, metric: &'static str, v: f64) {
        let key = Key {
            group,
            name: name.to_string(),
            metric,
        };
        self.values.push((key, v as f32));
    }

    /// The counter's increase per second since the previous sample (a
    /// counter that went backwards, rebuilt by a reload, counts from zero).
    fn rate(&mut self, group: &'static str, name: &str, metric: &'static str, counter: u64) {
        let key = Key {
            group,
            name: name.to_string(),
            metric,
        };
        let rate = match (self.prev.get(&key), self.dt) {
            (Some(&before), Some(dt)) if dt > 0.0 => {
                let delta = counter.checked_sub(before).unwrap_or(counter);
                Some(delta as f64 / dt)
            }
            _ => None,
        };
        self.next.insert(key.clone(), counter);
        if let Some(r) = rate {
            self.values.push((key, r as f32));
        }
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl History {
    /// Reads every counter once and stores the sample.
    pub fn sample(&self, shared: &Shared) {
        let now = Instant::now();
        let mut inner = lock(&self.inner);
        let mut s = Sample {
            dt: inner.prev_at.map(|t| now.duration_since(t).as_secs_f64()),
            prev: &inner.prev,
            next: HashMap::new(),
            values: Vec::new(),
        };
        read_counters(shared, &mut s);
        let (next, values) = (s.next, s.values);
        inner.prev = next;
        inner.prev_at = Some(now);
        inner.push(unix_ms(SystemTime::now()), values);
    }

    /// The samples taken after sample `since` (all that are kept when it is
    /// older), as JSON: `t` (Unix ms) and one array per series, `null` where
    /// a series had no value.
    pub fn json(&self, since: Option<u64>) -> Value {
        let inner = lock(&self.inner);
        let oldest = inner.taken.saturating_sub(CAPACITY as u64);
        let from = since.map_or(oldest, |s| s.saturating_add(1)).max(oldest);
        let slots = |n: u64| (n % CAPACITY as u64) as usize;
        let t: Vec<u64> = (from..inner.taken).map(|n| inner.times[slots(n)]).collect();
        let series: Vec<Value> = inner
            .series
            .iter()
            .filter(|(_, s)| s.last >= from)
            .map(|(k, s)| {
                let values: Vec<Value> = (from..inner.taken)
                    .map(|n| {
                        let v = s.values[slots(n)];
                        if v.is_nan() {
                            Value::Null
                        } else {
                            json!(v)
                        }
                    })
                    .collect();
                json!({ "group": k.group, "name": k.name, "metric": k.metric, "values": values })
            })
            .collect();
        json!({
            "capacity": CAPACITY,
            "interval_ms": INTERVAL.as_millis() as u64,
            "last": inner.taken.checked_sub(1),
            "t": t,
            "series": series,
            "series_refused": inner.refused,
        })
    }

    /// How many series are kept now.
    pub fn series_count(&self) -> usize {
        lock(&self.inner).series.len()
    }
}

impl Inner {
    fn push(&mut self, at: u64, values: Vec<(Key, f32)>) {
        if self.times.is_empty() {
            self.times = vec![0; CAPACITY];
        }
        let n = self.taken;
        let slot = (n % CAPACITY as u64) as usize;
        self.times[slot] = at;
        for s in self.series.values_mut() {
            s.values[slot] = f32::NAN;
        }
        for (key, v) in values {
            let len = self.series.len();
            let s = match self.series.get_mut(&key) {
                Some(s) => s,
                None if len >= MAX_SERIES => {
                    self.refused += 1;
                    continue;
                }
                None => self.series.entry(key).or_insert_with(|| Series {
                    values: vec![f32::NAN; CAPACITY].into_boxed_slice(),
                    last: n,
                }),
            };
            s.values[slot] = v;
            s.last = n;
        }
        // Nothing left in the window: a removed route, backend or channel.
        self.series
            .retain(|_, s| n.saturating_sub(s.last) < CAPACITY as u64);
        self.taken = n + 1;
    }
}

/// Every figure the dashboard charts, from the live snapshot.
fn read_counters(shared: &Shared, s: &mut Sample<'_>) {
    let snap = shared.snapshot.load();
    let mut refused = [0u64; 6];
    for (route, state) in snap.each_route() {
        let st = &state.stats;
        let name = route.name.as_str();
        s.gauge(
            "routes",
            name,
            "sessions",
            st.sessions_active.load(Relaxed) as f64,
        );
        s.rate(
            "routes",
            name,
            "upgrades",
            st.upgrades[Outcome::Ok as usize].load(Relaxed),
        );
        refused[0] += st.upgrades[Outcome::Failed as usize].load(Relaxed);
        refused[1] += st.upgrades[Outcome::Refused as usize].load(Relaxed);
        refused[2] += st.admitted.refused_route.load(Relaxed);
        refused[3] += st.admitted.refused_ip.load(Relaxed);
        let auth: u64 = AuthReason::ALL
            .iter()
            .map(|&r| st.auth.refused[r as usize].load(Relaxed))
            .sum();
        refused[4] += auth;
        // Rejected upgrades include the limit and auth refusals counted
        // above (auth refusals of plain HTTP requests are not upgrades).
        refused[5] += st.upgrades[Outcome::Rejected as usize]
            .load(Relaxed)
            .saturating_sub(st.admitted.refused_route.load(Relaxed))
            .saturating_sub(st.admitted.refused_ip.load(Relaxed))
            .saturating_sub(auth);
        match &state.hub {
            Some(hub) => {
                let h = &hub.stats;
                s.rate("routes", name, "messages_up", h.forwarded.load(Relaxed));
                s.rate("routes", name, "messages_down", h.delivered.load(Relaxed));
                let mut channels = hub.channel_list();
                channels.sort_by(|a, b| b.clients.cmp(&a.clients).then(a.key.cmp(&b.key)));
                for c in channels.iter().take(CHANNELS_PER_ROUTE) {
                    let id = format!("{name} {}", c.key);
                    s.gauge("channels", &id, "clients", c.clients as f64);
                    s.rate("channels", &id, "messages", c.messages_in);
                    s.rate("channels", &id, "dropped", c.dropped);
                    s.rate("channels", &id, "slow_disconnects", c.slow_disconnects);
                }
            }
            None => {
                s.rate("routes", name, "messages_up", st.messages_up.load(Relaxed));
                s.rate(
                    "routes",
                    name,
                    "messages_down",
                    st.messages_down.load(Relaxed),
                );
                s.rate("routes", name, "bytes_up", st.bytes_up.load(Relaxed));
                s.rate("routes", name, "bytes_down", st.bytes_down.load(Relaxed));
            }
        }
    }
    let reasons = [
        "no_backend",
        "backend_refused",
        "route_full",
        "client_limit",
        "auth",
        "bad_request",
    ];
    for (reason, n) in reasons.into_iter().zip(refused) {
        s.rate("refusals", "all routes", reason, n);
    }
    for pool in &snap.pools {
        for b in pool.backends().iter() {
            let id = format!("{} {}", pool.name, b.url);
            let health = if b.health.available() && !b.drain {
                1.0
            } else if b.health.healthy() {
                0.5 // ejected after failures, or draining
            } else {
                0.0
            };
            s.gauge("backends", &id, "up", health);
            s.gauge("backends", &id, "sessions", b.active() as f64);
        }
    }
}

/// Samples every [`INTERVAL`] until `stop`.
pub async fn run(shared: Arc<Shared>, history: Arc<History>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        // Live sessions report what they moved at their next wake-up; the
        // next sample sees it.
        crate::metrics::tick_report_epoch();
        history.sample(&shared);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Key {
        Key {
            group: "routes",
            name: name.into(),
            metric: "sessions",
        }
    }

    #[test]
    fn the_ring_keeps_the_last_capacity_samples_and_drops_stale_series() {
        let mut inner = Inner::default();
        for n in 0..(CAPACITY as u64 + 50) {
            let mut values = vec![(key("always"), n as f32)];
            if n < 10 {
                values.push((key("early"), 1.0));
            }
            inner.push(1000 + n, values);
        }
        let h = History {
            inner: Mutex::new(inner),
        };
        let all = h.json(None);
        let t = all["t"].as_array().unwrap();
        assert_eq!(t.len(), CAPACITY);
        assert_eq!(t[0], 1050, "the oldest kept sample");
        let series = all["series"].as_array().unwrap();
        assert_eq!(series.len(), 1, "`early` left the window: {series:?}");
        assert_eq!(series[0]["values"][CAPACITY - 1], json!(949.0));
        // Incremental: only what came after sample 945.
        let tail = h.json(Some(945));
        assert_eq!(tail["t"].as_array().unwrap().len(), 4);
        assert_eq!(tail["last"], json!(949));
        assert_eq!(h.json(Some(949))["t"].as_array().unwrap().len(), 0);
        assert_eq!(h.series_count(), 1);
    }

    #[test]
    fn series_are_bounded() {
        let mut inner = Inner::default();
        let values = (0..MAX_SERIES + 5)
            .map(|i| (key(&i.to_string()), 1.0))
            .collect();
        inner.push(0, values);
        assert_eq!(inner.series.len(), MAX_SERIES);
        assert_eq!(inner.refused, 5);
    }

    #[test]
    fn rates_come_from_the_previous_reading() {
        let k = key("r");
        let prev = HashMap::from([(k.clone(), 100u64)]);
        let mut s = Sample {
            prev: &prev,
            next: HashMap::new(),
            dt: Some(2.0),
            values: Vec::new(),
        };
        s.rate("routes", "r", "sessions", 160);
        // A counter rebuilt smaller (a reload) counts from zero.
        s.rate("routes", "new", "sessions", 7);
        assert_eq!(s.values, vec![(k.clone(), 30.0)]);
        assert_eq!(s.next[&k], 160);
        let prev = HashMap::from([(k.clone(), 100u64)]);
        let mut s = Sample {
            prev: &prev,
            next: HashMap::new(),
            dt: Some(1.0),
            values: Vec::new(),
        };
        s.rate("routes", "r", "sessions", 40);
        assert_eq!(s.values, vec![(k, 40.0)]);
    }
}
