//! `/metrics`: one `prometheus-client` collector that reads the gateway's
//! counters (listeners, routes, backends, fan-out hubs, supervised tasks,
//! reloads) from the live snapshot when scraped.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::metrics::{Histogram, ListenerStats, Outcome, ResumeCause, RouteStats};
use crate::state::Shared;

/// A registry whose one collector reads the gateway's state.
pub fn registry(shared: Arc<Shared>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(GatewayCollector(shared)));
    r
}

struct GatewayCollector(Arc<Shared>);

impl std::fmt::Debug for GatewayCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayCollector")
    }
}

type Labels = Vec<(&'static str, String)>;

/// Writes one metric family: `rows` of (labels, value).
fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in rows {
        let mut f = m.encode_family(labels)?;
        match kind {
            MetricType::Counter => f.encode_counter::<NoLabelSet, _, u64>(v, None)?,
            _ => f.encode_gauge(&(*v as i64))?,
        }
    }
    Ok(())
}

fn histograms(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, &Histogram)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in rows {
        let (sum, count, buckets) = h.snapshot();
        m.encode_family(labels)?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}

impl Collector for GatewayCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let sh = &self.0;
        let snap = sh.snapshot.load();
        let l = |k: &'static str, v: String| -> Labels { vec![(k, v)] };

        let listeners = sh.listener_stats();
        let by_listener = |f: &dyn Fn(&ListenerStats) -> u64| -> Vec<(Labels, u64)> {
            listeners
                .iter()
                .map(|s| (l("listener", s.addr.to_string()), f(s)))
                .collect()
        };
        family(
            &mut enc,
            "upgate_connections_accepted",
            "Client connections accepted.",
            Counter,
            &by_listener(&|s| s.accepted.load(Relaxed)),
        )?;
        family(
            &mut enc,
            "upgate_connections_active",
            "Client connections open now.",
            Gauge,
            &by_listener(&|s| s.active.load(Relaxed)),
        )?;
        let mut tls = Vec::new();
        for s in &listeners {
            tls.push((
                vec![("listener", s.addr.to_string()), ("outcome", "ok".into())],
                s.tls_ok.load(Relaxed),
            ));
            tls.push((
                vec![
                    ("listener", s.addr.to_string()),
                    ("outcome", "failed".into()),
                ],
                s.tls_failed.load(Relaxed),
            ));
        }
        family(
            &mut enc,
            "upgate_tls_handshakes",
            "TLS handshakes by outcome (failed includes timeouts).",
            Counter,
            &tls,
        )?;
        family(
            &mut enc,
            "upgate_proxy_protocol_errors",
            "Connections closed for a missing, malformed or late PROXY protocol header.",
            Counter,
            &by_listener(&|s| s.proxy_header_failed.load(Relaxed)),
        )?;
        let mut closed = Vec::new();
        for s in &listeners {
            for (reason, v) in [
                ("handshake_timeout", &s.handshake_timeouts),
                ("idle", &s.idle_closed),
            ] {
                closed.push((
                    vec![("listener", s.addr.to_string()), ("reason", reason.into())],
                    v.load(Relaxed),
                ));
            }
        }
        family(
            &mut enc,
            "upgate_connections_closed_by_timeout",
            "Client connections closed by the gateway: no complete request head within handshake_timeout of the accept, or idle for idle_timeout.",
            Counter,
            &closed,
        )?;
        family(
            &mut enc,
            "upgate_accept_errors",
            "Failed accept calls (out of file descriptors or memory); the accept loop backs off.",
            Counter,
            &by_listener(&|s| s.accept_errors.load(Relaxed)),
        )?;

        let routes: Vec<(&str, &Arc<RouteStats>)> = snap
            .each_route()
            .map(|(r, state)| (r.name.as_str(), &state.stats))
            .collect();
        // One series per route and per value of a second label.
        type Part<'a> = (&'a str, &'a dyn Fn(&RouteStats) -> u64);
        let per_route_by = |key: &'static str, parts: &[Part]| -> Vec<(Labels, u64)> {
            routes
                .iter()
                .flat_map(|(n, s)| {
                    parts.iter().map(move |(v, f)| {
                        (vec![("route", n.to_string()), (key, v.to_string())], f(s))
                    })
                })
                .collect()
        };
        let outcomes: [Part; 4] = [
            ("ok", &|s| s.upgrades[Outcome::Ok as usize].load(Relaxed)),
            ("refused", &|s| {
                s.upgrades[Outcome::Refused as usize].load(Relaxed)
            }),
            ("rejected", &|s| {
                s.upgrades[Outcome::Rejected as usize].load(Relaxed)
            }),
            ("failed", &|s| {
                s.upgrades[Outcome::Failed as usize].load(Relaxed)
            }),
        ];
        family(&mut enc, "upgate_upgrades", "WebSocket upgrades by route and outcome (ok = 101; refused = the backend's own non-101 answer; rejected = bad client request or a session limit; failed = no backend).", Counter, &per_route_by("outcome", &outcomes))?;
        family(
            &mut enc,
            "upgate_sessions_refused",
            "Upgrades refused by a route's max_sessions (limit=route, 503) or max_sessions_per_ip (limit=client, 429).",
            Counter,
            &per_route_by(
                "limit",
                &[
                    ("route", &|s| s.admitted.refused_route.load(Relaxed)),
                    ("client", &|s| s.admitted.refused_ip.load(Relaxed)),
                ],
            ),
        )?;
        // Authentication, on the routes that have `auth:`.
        let authed: Vec<(&str, &Arc<RouteStats>)> = snap
            .each_route()
            .filter(|(_, state)| state.auth.is_some())
            .map(|(r, state)| (r.name.as_str(), &state.stats))
            .collect();
        let refused: Vec<(Labels, u64)> = authed
            .iter()
            .flat_map(|(n, s)| {
                crate::metrics::AuthReason::ALL.iter().map(move |r| {
                    (
                        vec![("route", n.to_string()), ("reason", r.label().to_string())],
                        s.auth.refused[*r as usize].load(Relaxed),
                    )
                })
            })
            .collect();
        family(&mut enc, "upgate_auth_refused", "Requests refused by a route's auth: (missing, malformed, bad_signature, expired, not_yet_valid, wrong_issuer, wrong_audience, unknown_key: 401; forbidden: 403; denied: the forward-auth service's answer; unavailable: 503).", Counter, &refused)?;
        let per_authed = |f: &dyn Fn(&RouteStats) -> u64| -> Vec<(Labels, u64)> {
            authed
                .iter()
                .map(|(n, s)| (l("route", n.to_string()), f(s)))
                .collect()
        };
        family(
            &mut enc,
            "upgate_auth_allowed",
            "Requests a route's auth: let on.",
            Counter,
            &per_authed(&|s| s.auth.allowed.load(Relaxed)),
        )?;
        family(
            &mut enc,
            "upgate_auth_expired_sessions",
            "Live sessions ended because their token expired (on_expiry: close).",
            Counter,
            &per_authed(&|s| s.auth.expired_sessions.load(Relaxed)),
        )?;
        family(
            &mut enc,
            "upgate_auth_jwks_refresh_failures",
            "Failed fetches of a JWKS URL (the last good keys stay in use).",
            Counter,
            &per_authed(&|s| s.auth.jwks_refresh_failures.load(Relaxed)),
        )?;
        family(
            &mut enc,
            "upgate_auth_forward_cache_hits",
            "Forward-auth decisions served from the cache.",
            Counter,
            &per_authed(&|s| s.auth.forward_cache_hits.load(Relaxed)),
        )?;
        let per_route = |f: &dyn Fn(&RouteStats) -> u64| -> Vec<(Labels, u64)> {
            routes
                .iter()
                .map(|(n, s)| (l("route", n.to_string()), f(s)))
                .collect()
        };
        family(
            &mut enc,
            "upgate_sessions_active",
            "Live WebSocket sessions by route (fan-out clients included).",
            Gauge,
            &per_route(&|s| s.sessions_active.load(Relaxed)),
        )?;
        family(
            &mut enc,
            "upgate_upgrades_http2",
            "WebSocket upgrades that came over HTTP/2 (RFC 8441 extended CONNECT), all outcomes; also counted in upgate_upgrades_total.",
            Counter,
            &per_route(&|s| s.http2_upgrades.load(Relaxed)),
        )?;
        family(
            &mut enc,
            "upgate_failovers",
            "Upgrade attempts moved on to the next backend.",
            Counter,
            &per_route(&|s| s.failovers.load(Relaxed)),
        )?;
        family(
            &mut enc,
            "upgate_frames_resumes",
            "mode: frames sessions moved to another backend (resume: true) without the client noticing, by cause (backend_close: it closed with 1001/1012/1013/1014; backend_gone: EOF, reset or silence; backend_down: health checks or a reload; rebalance: the pool's rebalancer).",
            Counter,
            &per_route_by(
                "cause",
                &[
                    ("backend_close", &|s| s.resumes[ResumeCause::Close as usize].load(Relaxed)),
                    ("backend_gone", &|s| s.resumes[ResumeCause::Gone as usize].load(Relaxed)),
                    ("backend_down", &|s| s.resumes[ResumeCause::Down as usize].load(Relaxed)),
                    ("rebalance", &|s| s.resumes[ResumeCause::Rebalance as usize].load(Relaxed)),
                ],
            ),
        )?;
        family(
            &mut enc,
            "upgate_frames_resume_failures",
            "mode: frames sessions closed because no backend took them within resume_timeout.",
            Counter,
            &per_route(&|s| s.resume_failures.load(Relaxed)),
        )?;
        family(
            &mut enc,
            "upgate_rebalance_closes",
            "Sessions closed with 1012 (Service Restart) at a frame boundary because the pool's rebalancer asked them to leave (rebalance: close); their clients reconnect.",
            Counter,
            &per_route(&|s| s.rebalance_closes.load(Relaxed)),
        )?;
        family(
            &mut enc,
            "upgate_session_bytes",
            "Bytes moved by spliced sessions (up = client to backend); live sessions add theirs once a second while the admin listener runs, and the rest as they end.",
            Counter,
            &per_route_by(
                "direction",
                &[
                    ("up", &|s| s.bytes_up.load(Relaxed)),
                    ("down", &|s| s.bytes_down.load(Relaxed)),
                ],
            ),
        )?;
        family(
            &mut enc,
            "upgate_session_messages",
            "WebSocket data messages (text or binary, however fragmented) moved by spliced sessions (up = client to backend), reported like upgate_session_bytes.",
            Counter,
            &per_route_by(
                "direction",
                &[
                    ("up", &|s| s.messages_up.load(Relaxed)),
                    ("down", &|s| s.messages_down.load(Relaxed)),
                ],
            ),
        )?;
        let hist: Vec<(Labels, &Histogram)> = routes
            .iter()
            .map(|(n, s)| (l("route", n.to_string()), &s.session_duration))
            .collect();
        histograms(
            &mut enc,
            "upgate_session_duration_seconds",
            "Duration of ended WebSocket sessions.",
            &hist,
        )?;
        let hist: Vec<(Labels, &Histogram)> = routes
            .iter()
            .map(|(n, s)| (l("route", n.to_string()), &s.handshake))
            .collect();
        let gaps: Vec<(Labels, &Histogram)> = routes
            .iter()
            .map(|(n, s)| (l("route", n.to_string()), &s.resume_gap))
            .collect();
        histograms(
            &mut enc,
            "upgate_frames_resume_gap_seconds",
            "mode: frames sessions without a backend: from losing a backend leg to the next one taking the session.",
            &gaps,
        )?;
        histograms(
            &mut enc,
            "upgate_upgrade_duration_seconds",
            "Time from an upgrade request to its answer (backend connect and handshake included).",
            &hist,
        )?;

        let mut active = Vec::new();
        let mut healthy = Vec::new();
        let mut failures = Vec::new();
        let mut ejections = Vec::new();
        for p in &snap.pools {
            for b in p.backends().iter() {
                let labels = vec![("pool", p.name.clone()), ("backend", b.url.to_string())];
                active.push((labels.clone(), b.active() as u64));
                healthy.push((labels.clone(), u64::from(b.health.healthy())));
                failures.push((labels.clone(), b.failures.load(Relaxed)));
                ejections.push((labels, b.ejections.load(Relaxed)));
            }
        }
        family(
            &mut enc,
            "upgate_backend_sessions_active",
            "Live sessions (and fan-out upstreams) per backend.",
            Gauge,
            &active,
        )?;
        family(
            &mut enc,
            "upgate_backend_healthy",
            "1 when active checks consider the backend up.",
            Gauge,
            &healthy,
        )?;
        family(
            &mut enc,
            "upgate_backend_failures",
            "Failed attempts (connect errors and timeouts, broken or 5xx answers).",
            Counter,
            &failures,
        )?;
        family(
            &mut enc,
            "upgate_backend_ejections",
            "Passive-check ejections.",
            Counter,
            &ejections,
        )?;

        let hubs: Vec<(&str, &crate::fanout::Hub)> = snap
            .each_route()
            .filter_map(|(r, state)| Some((r.name.as_str(), state.hub.as_deref()?)))
            .collect();
        let fan = |f: &dyn Fn(&crate::fanout::Stats) -> u64| -> Vec<(Labels, u64)> {
            hubs.iter()
                .map(|(n, h)| (l("route", n.to_string()), f(&h.stats)))
                .collect()
        };
        family(
            &mut enc,
            "upgate_fanout_channels",
            "Open fan-out channels (one upstream per source each).",
            Gauge,
            &hubs
                .iter()
                .map(|(n, h)| (l("route", n.to_string()), h.channel_count() as u64))
                .collect::<Vec<_>>(),
        )?;
        family(
            &mut enc,
            "upgate_fanout_subscribers",
            "Connected fan-out clients.",
            Gauge,
            &fan(&|s| s.clients.load(Relaxed)),
        )?;
        family(
            &mut enc,
            "upgate_fanout_messages_in",
            "Messages received from upstreams.",
            Counter,
            &fan(&|s| s.messages_in.load(Relaxed)),
        )?;
        family(
            &mut enc,
            "upgate_fanout_messages_out",
            "Messages written to clients.",
            Counter,
            &fan(&|s| s.delivered.load(Relaxed)),
        )?;
        family(
            &mut enc,
            "upgate_fanout_dropped",
            "Messages skipped for slow clients (drop_oldest).",
            Counter,
            &fan(&|s| s.dropped.load(Relaxed)),
        )?;
        family(
            &mut enc,
            "upgate_fanout_slow_disconnects",
            "Clients closed for falling behind (disconnect).",
            Counter,
            &fan(&|s| s.slow_disconnects.load(Relaxed)),
        )?;
        family(
            &mut enc,
            "upgate_fanout_upstream_reconnects",
            "Upstream connections re-established after a loss.",
            Counter,
            &fan(&|s| s.reconnects.load(Relaxed)),
        )?;
        family(
            &mut enc,
            "upgate_fanout_forwarded",
            "Client messages sent on to the upstream (client_messages: forward).",
            Counter,
            &fan(&|s| s.forwarded.load(Relaxed)),
        )?;
        family(
            &mut enc,
            "upgate_fanout_forward_dropped",
            "Client messages dropped because the upstream queue was full.",
            Counter,
            &fan(&|s| s.forward_dropped.load(Relaxed)),
        )?;

        let mut refused = Vec::new();
        for (n, h) in &hubs {
            for (reason, v) in [
                ("max_channels", &h.stats.refused_full),
                ("not_allowed", &h.stats.refused_key),
                ("rate", &h.stats.refused_rate),
            ] {
                refused.push((
                    vec![("route", n.to_string()), ("reason", reason.into())],
                    v.load(Relaxed),
                ));
            }
        }
        family(
            &mut enc,
            "upgate_fanout_channels_refused",
            "New fan-out channels refused: max_channels reached (503), key not in channels (404), or channel_opens_per_ip exceeded (429).",
            Counter,
            &refused,
        )?;

        family(
            &mut enc,
            "upgate_task_panics",
            "Panics caught in supervised background tasks (each restarted with backoff).",
            Counter,
            &crate::supervise::Kind::ALL
                .iter()
                .map(|k| (l("task", k.label().into()), sh.life.panics.count(*k)))
                .collect::<Vec<_>>(),
        )?;

        let st = &sh.stats;
        family(
            &mut enc,
            "upgate_config_reloads",
            "Config reloads by outcome.",
            Counter,
            &[
                (l("outcome", "ok".into()), st.reloads_ok.load(Relaxed)),
                (
                    l("outcome", "failed".into()),
                    st.reloads_failed.load(Relaxed),
                ),
            ],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct One(Histogram);

    impl std::fmt::Debug for One {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("One")
        }
    }

    impl Collector for One {
        fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            histograms(&mut enc, "h_seconds", "test", &[(vec![], &self.0)])
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_once() {
        static BOUNDS: [f64; 3] = [0.1, 0.25, 1.0];
        let h = Histogram::new(&BOUNDS);
        for ms in [50, 60, 200, 300, 400, 2000] {
            h.observe(Duration::from_millis(ms));
        }
        let mut r = Registry::default();
        r.register_collector(Box::new(One(h)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).expect("encodes");
        for (le, n) in [("0.1", 2), ("0.25", 3), ("1.0", 5), ("+Inf", 6)] {
            let line = format!("h_seconds_bucket{{le=\"{le}\"}} {n}");
            assert!(text.contains(&line), "no `{line}` in:\n{text}");
        }
        assert!(text.contains("h_seconds_count 6"), "{text}");
    }
}
