//! The admin listener: probes, bearer token, pool state, readiness while draining.

mod support;

use std::time::Duration;

use support::*;

fn yaml(backend: std::net::SocketAddr) -> String {
    format!(
        "server: {{ shutdown_grace: 10s }}\nadmin: {{ addr: '127.0.0.1:0', token: s3cret }}\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://{backend}] }}\nroutes:\n  - {{ name: r, path: /ws, pool: p }}\n"
    )
}

async fn admin_get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> Reply {
    admin_request(addr, "GET", path, token).await
}

#[tokio::test]
async fn probes_token_and_pool_state() {
    let be = echo_backends(&["a"]).await;
    let cfg =
        upgate::Config::parse(std::path::Path::new("routes.yaml"), &yaml(be.addrs[0])).unwrap();
    let gw = upgate::Gateway::bind(&cfg).await.unwrap();
    let (addr, admin) = (
        gw.local_addrs()[0],
        gw.admin_addr().expect("admin listener"),
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(gw.run(async {
        let _ = rx.await;
    }));

    assert_eq!(admin_get(admin, "/healthz", None).await.status, 200);
    assert_eq!(admin_get(admin, "/readyz", None).await.status, 200);
    let r = admin_get(admin, "/pools", None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    assert_eq!(admin_get(admin, "/pools", Some("wrong")).await.status, 401);

    let mut ws = ws(addr, "h", "/ws").await;
    assert_eq!(roundtrip(&mut ws, "hi").await, "hi");
    let r = admin_get(admin, "/pools", Some("s3cret")).await;
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let b = &v["pools"][0]["backends"][0];
    assert_eq!(v["pools"][0]["name"], "p");
    assert_eq!(
        v["pools"][0]["balance"], "round_robin",
        "as the config spells it"
    );
    assert_eq!(b["live_sessions"], 1, "{}", r.body);
    assert_eq!(b["healthy"], true);
    let r = admin_get(admin, "/routes", Some("s3cret")).await;
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["routes"][0]["path"], "/ws");

    // Shutdown: the session keeps the drain going; /readyz says so meanwhile.
    let _ = tx.send(());
    let mut draining = false;
    for _ in 0..100 {
        if admin_get(admin, "/readyz", None).await.status == 503 {
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(draining, "/readyz never reported the drain");
    drop(ws);
    let drained = tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .unwrap()
        .unwrap();
    assert!(drained.finished_in_grace);
}

/// A gateway with an admin listener (token `s3cret`) and one live session.
async fn with_a_session() -> (TestGateway, Backends, Ws<tokio::net::TcpStream>) {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&yaml(be.addrs[0])).await;
    let mut ws = ws(gw.addr(), "h", "/ws").await;
    assert_eq!(roundtrip(&mut ws, "hi").await, "hi");
    (gw, be, ws)
}

#[tokio::test]
async fn metrics_config_and_methods() {
    let (gw, be, ws) = with_a_session().await;
    let admin = gw.admin.expect("admin");
    let m = admin_get(admin, "/metrics", Some("s3cret")).await;
    assert_eq!(m.status, 200);
    assert!(m.headers["content-type"]
        .to_str()
        .unwrap()
        .contains("openmetrics"));
    let listener = format!("listener=\"{}\"", gw.addr());
    let backend = format!("backend=\"ws://{}\"", be.addrs[0]);
    for want in [
        r#"upgate_upgrades_total{route="r",outcome="ok"} 1"#,
        r#"upgate_sessions_active{route="r"} 1"#,
        r#"upgate_upgrade_duration_seconds_count{route="r"} 1"#,
        r#"upgate_config_reloads_total{outcome="ok"} 0"#,
        "# TYPE upgate_session_duration_seconds histogram",
        "# TYPE upgate_fanout_messages_out counter",
    ] {
        assert!(m.body.contains(want), "missing {want}:\n{}", m.body);
    }
    assert!(
        m.body
            .lines()
            .any(|l| l.starts_with("upgate_connections_accepted_total") && l.contains(&listener)),
        "{}",
        m.body
    );
    assert!(
        m.body
            .lines()
            .any(|l| l.starts_with("upgate_backend_sessions_active")
                && l.contains(&backend)
                && l.ends_with(" 1")),
        "{}",
        m.body
    );
    assert!(
        m.body
            .lines()
            .any(|l| l.starts_with("upgate_backend_healthy")
                && l.contains(&backend)
                && l.ends_with(" 1")),
        "{}",
        m.body
    );
    assert_eq!(admin_get(admin, "/metrics", None).await.status, 401);

    let c = admin_get(admin, "/config", Some("s3cret")).await;
    let v: serde_json::Value = serde_json::from_str(&c.body).unwrap();
    assert_eq!(v["admin"]["token"], "<redacted>");
    assert!(!c.body.contains("s3cret"), "{}", c.body);
    assert_eq!(v["routes"][0]["pool"], "p");
    assert_eq!(
        v["pools"][0]["backends"][0]["url"],
        format!("ws://{}", be.addrs[0])
    );

    assert_eq!(
        admin_request(admin, "DELETE", "/routes", Some("s3cret"))
            .await
            .status,
        405
    );
    assert_eq!(
        admin_request(admin, "GET", "/reload", Some("s3cret"))
            .await
            .status,
        405
    );
    assert_eq!(
        admin_request(admin, "GET", "/nope", Some("s3cret"))
            .await
            .status,
        404
    );
    drop(ws);
}

/// Headless Chromium (Debian's `chromium`): the status page, after its
/// scripts ran, shows the route, the backend as up and the live session.
#[tokio::test]
#[cfg_attr(no_browser, ignore = "needs chromium (apt-get install chromium)")]
async fn the_status_page_shows_routes_backends_and_live_sessions_in_a_browser() {
    let (gw, be, ws) = with_a_session().await;
    let admin = gw.admin.expect("admin");
    let dom = browser_dom(&format!("http://{admin}/?token=s3cret")).await;
    assert!(
        dom.contains("<td>r</td><td>*</td><td>/ws</td><td>p</td><td>splice</td>"),
        "{dom}"
    );
    assert!(
        dom.contains(r#"<span class="live" data-route="r">1</span>"#),
        "live session count: {dom}"
    );
    assert!(
        dom.contains(&format!(
            "<td>ws://{}</td><td><span class=\"up\">up</span></td>",
            be.addrs[0]
        )),
        "backend up: {dom}"
    );
    assert!(dom.contains("updated "), "{dom}");
    drop(ws);
}

#[test]
fn a_tokenless_admin_off_loopback_needs_insecure() {
    let cfg = |admin: &str| {
        upgate::Config::parse(
            std::path::Path::new("routes.yaml"),
            &format!("admin: {admin}\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://127.0.0.1:9] }}\nroutes:\n  - {{ name: r, pool: p }}\n"),
        )
    };
    let e = cfg("{ addr: '0.0.0.0:9901' }").unwrap_err().to_string();
    assert!(
        e.starts_with("routes.yaml:1: admin.addr: 0.0.0.0:9901 is reachable from other machines"),
        "{e}"
    );
    assert!(e.contains("insecure: true"), "{e}");
    assert!(cfg("{ addr: '0.0.0.0:9901', token: t0ken }").is_ok());
    assert!(cfg("{ addr: '0.0.0.0:9901', insecure: true }").is_ok());
    assert!(cfg("{ addr: '127.0.0.1:9901' }").is_ok());
    assert!(cfg("{ addr: '[::1]:9901' }").is_ok());
}

#[tokio::test]
async fn web_pages_cannot_reach_a_tokenless_admin() {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&format!(
        "admin: {{ addr: '127.0.0.1:0', hosts: [gw.internal] }}\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://{}] }}\nroutes:\n  - {{ name: r, path: /ws, pool: p }}\n",
        be.addrs[0]
    ))
    .await;
    let admin = gw.admin.expect("admin");
    let own = admin.to_string();
    // DNS rebinding: the page's own name arrives as Host.
    for host in [
        "evil.example.com",
        "evil.example.com:9901",
        "127.0.0.1.evil.example",
    ] {
        let r = admin_request_with(admin, "GET", "/config", &[("host", host)]).await;
        assert_eq!(r.status, 403, "Host {host}: {}", r.body);
    }
    for host in [
        own.as_str(),
        "localhost:9901",
        "[::1]:9901",
        "gw.internal",
        "GW.INTERNAL:80",
    ] {
        let r = admin_request_with(admin, "GET", "/config", &[("host", host)]).await;
        assert_eq!(r.status, 200, "Host {host}: {}", r.body);
    }
    // A cross-site form or fetch cannot reload.
    let evil = [("origin", "http://evil.example.com")];
    let r = admin_request_with(admin, "POST", "/reload", &evil).await;
    assert!(
        r.status == 403 && r.body.contains("another origin"),
        "{} {}",
        r.status,
        r.body
    );
    let r = admin_request_with(
        admin,
        "POST",
        "/reload",
        &[("sec-fetch-site", "cross-site")],
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let metrics = admin_request(admin, "GET", "/metrics", None).await.body;
    assert!(
        metrics.contains("upgate_config_reloads_total{outcome=\"ok\"} 0")
            && metrics.contains("upgate_config_reloads_total{outcome=\"failed\"} 0"),
        "{metrics}"
    );
    // The admin's own page (same origin) and curl (no Origin) may: here the
    // reload itself fails (the config came from a string, not a file), which is fine.
    let own_origin = format!("http://{own}");
    let r = admin_request_with(admin, "POST", "/reload", &[("origin", &own_origin)]).await;
    assert_ne!(r.status, 403, "{}", r.body);
    let r = admin_request(admin, "POST", "/reload", None).await;
    assert_ne!(r.status, 403, "{}", r.body);
}

/// The value of attribute `name` on the element with `id` in a dumped DOM.
fn attr(dom: &str, id: &str, name: &str) -> f64 {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in {dom}"));
    let tag = &dom[at..at + dom[at..].find('>').expect("tag end")];
    let start = tag
        .find(&format!("{name}=\""))
        .unwrap_or_else(|| panic!("no {name} on #{id}: {tag}"))
        + name.len()
        + 2;
    let end = start + tag[start..].find('"').expect("attribute end");
    tag[start..end]
        .parse()
        .unwrap_or_else(|_| panic!("{name} on #{id}: {tag}"))
}

/// The dashboard in headless Chromium while traffic runs: a splice route
/// with upgrades and messages, a fan-out channel fed by a forwarding
/// client, then left to linger. The charts are uPlot's (canvas + legend)
/// with live, non-zero data; a screenshot is kept as a test artifact.
#[tokio::test]
#[cfg_attr(no_browser, ignore = "needs chromium (apt-get install chromium)")]
async fn the_dashboard_charts_live_traffic_in_a_browser() {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&format!(
        "admin: {{ addr: '127.0.0.1:0', token: s3cret }}\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://{}] }}\nroutes:\n  - {{ name: r, path: /ws, pool: p }}\n  - {{ name: f, path: /feed, pool: p, mode: fanout, strip_prefix: true, client_messages: forward, client_rate: 1000, linger: 60s }}\n",
        be.addrs[0]
    ))
    .await;
    let (addr, admin) = (gw.addr(), gw.admin.expect("admin"));
    let stop = tokio_util::sync::CancellationToken::new();
    // Traffic, bounded: at most 60 s, until the test is done.
    let traffic = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut long = ws(addr, "h", "/ws").await;
            let mut feed = ws(addr, "h", "/feed/room").await;
            let until = tokio::time::Instant::now() + Duration::from_secs(60);
            let mut i = 0u32;
            while !stop.is_cancelled() && tokio::time::Instant::now() < until {
                assert_eq!(roundtrip(&mut long, "tick").await, "tick");
                assert_eq!(roundtrip(&mut feed, "news").await, "news");
                if i.is_multiple_of(5) {
                    let mut short = ws(addr, "h", "/ws").await;
                    assert_eq!(roundtrip(&mut short, "hi").await, "hi");
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            drop(feed); // the channel lingers
            long
        }
    });
    // The history has rates for everything charted before the browser looks.
    let latest = |v: &serde_json::Value, group: &str, name: &str, metric: &str| {
        v["series"]
            .as_array()
            .and_then(|s| {
                s.iter()
                    .find(|s| s["group"] == group && s["name"] == name && s["metric"] == metric)
            })
            .and_then(|s| {
                s["values"]
                    .as_array()?
                    .iter()
                    .rev()
                    .find_map(|v| v.as_f64())
            })
            .unwrap_or(0.0)
    };
    let mut ready = false;
    for _ in 0..100 {
        let h = admin_get(admin, "/history", Some("s3cret")).await;
        assert_eq!(h.status, 200);
        let v: serde_json::Value = serde_json::from_str(&h.body).unwrap();
        if latest(&v, "routes", "r", "upgrades") > 0.0
            && latest(&v, "routes", "r", "messages_up") > 0.0
            && latest(&v, "routes", "r", "bytes_down") > 0.0
            && latest(&v, "channels", "f /room", "messages") > 0.0
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ready, "the history never showed the traffic");
    let url = format!("http://{admin}/?token=s3cret");
    let dom = browser_dom(&url).await;
    assert!(
        dom.contains(r#"<div id="state" class="muted ok">updated"#),
        "{dom}"
    );
    assert!(
        dom.matches("class=\"uplot").count() >= 8,
        "uPlot charts drawn: {dom}"
    );
    for (chart, what) in [
        ("c-sessions", "live sessions"),
        ("c-upgrades", "upgrades/s"),
        ("c-messages", "messages/s"),
        ("c-bytes", "bytes/s"),
        ("c-backend-sessions", "backend sessions"),
        ("c-ch-clients", "channel clients"),
        ("c-ch-messages", "channel messages/s"),
    ] {
        assert!(
            attr(&dom, chart, "data-max") > 0.0,
            "{what} charted as 0: {dom}"
        );
        assert!(attr(&dom, chart, "data-points") >= 2.0, "{what}: {dom}");
    }
    assert_eq!(attr(&dom, "c-health", "data-series"), 1.0);
    // uPlot's legend names the series.
    assert!(dom.contains("f /room"), "channel in the legend: {dom}");
    assert!(dom.contains(&format!("p ws://{}", be.addrs[0])), "{dom}");
    // The channel's row names its upstream backend.
    assert!(
        dom.contains(&format!("<td>ws://{}</td>", be.addrs[0])),
        "{dom}"
    );

    stop.cancel();
    let long = traffic.await.expect("traffic ran");
    // The fan-out client left: the channel lingers, and the page says why
    // its backend still has a session.
    let mut lingering = false;
    for _ in 0..50 {
        let r = admin_get(admin, "/routes", Some("s3cret")).await;
        if r.body.contains(r#""clients":0"#) {
            lingering = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(lingering, "the channel's client count never fell to 0");
    let dom = browser_dom(&url).await;
    assert!(dom.contains("0 (lingering)"), "{dom}");
    assert!(dom.contains("keep their upstream open for linger"), "{dom}");
    // The artifact: target/tmp/dashboard.png.
    let png = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    browser_screenshot(&url, &png, 1400, 2200).await;
    eprintln!("dashboard screenshot: {}", png.display());
    drop(long);
}
