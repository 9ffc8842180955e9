//! What checking a JWT costs a WebSocket handshake: one upgate (one runtime
//! thread, core 0) with three routes to the same echo backend — `/open`
//! (no auth), `/es256` and `/rs256` (a token checked against an ES256 or an
//! RS256 key) — and handshakes against each, rounds interleaved. Each JWT
//! route is measured twice: every handshake with a token never seen before
//! (the signature is verified: the cold cost) and every handshake with the
//! same token (a client reconnecting: upgate's verified-token cache).
//! Reports handshakes/s and upgate's CPU per handshake, and the CPU
//! authentication adds (per-round difference to `/open`, median).

use std::path::PathBuf;
use std::time::Duration;

use crate::load::{self, Target};
use crate::{median, min_max, now_utc, targets, Bins};

#[derive(clap::Args)]
pub struct AuthArgs {
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    #[arg(long, default_value_t = 4.0)]
    duration: f64,
    /// Handshakes in flight.
    #[arg(long, default_value_t = 32)]
    conns: usize,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    #[command(flatten)]
    bins: Bins,
}

const PORT: u16 = 18090;
const ROUTES: [&str; 5] = ["open", "es256 new", "rs256 new", "es256 same", "rs256 same"];
/// Distinct tokens per JWT route for the "new token" runs. Cycled; more than
/// upgate's verified-token cache holds (10,000, emptied when full), so a
/// token comes round again only after the cache has forgotten it.
const FRESH: usize = 12_000;

pub async fn auth_suite(a: AuthArgs) -> Result<(), String> {
    let bin_dir = a.bins.dir()?;
    let work = std::env::temp_dir().join(format!("upgate-bench-auth-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let backend = targets::backend(&bin_dir, &work, 0)?;

    // Keys: EC made here; RSA is the repository's test key (ring makes no RSA keys).
    upgate::auth::crypto::install();
    let ec =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    std::fs::write(work.join("ec.pem"), ec.public_key_pem()).map_err(|e| e.to_string())?;
    let rsa_private = std::fs::read("tests/keys/rsa-test-private.pem")
        .map_err(|e| format!("tests/keys/rsa-test-private.pem (run from the repository): {e}"))?;
    std::fs::copy("tests/keys/rsa-test-public.pem", work.join("rsa.pem"))
        .map_err(|e| e.to_string())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let claims =
        serde_json::json!({"sub": "bench", "iss": "bench", "aud": "echo", "exp": now + 3600});
    let es_key = jsonwebtoken::EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes())
        .map_err(|e| e.to_string())?;
    let rs_key =
        jsonwebtoken::EncodingKey::from_rsa_pem(&rsa_private).map_err(|e| e.to_string())?;
    let sign = |alg, key: &jsonwebtoken::EncodingKey, jti: usize| {
        let mut c = claims.clone();
        c["jti"] = serde_json::json!(jti);
        jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &c, key).map_err(|e| e.to_string())
    };
    eprintln!("signing {} tokens", 2 * FRESH);
    let (mut es_paths, mut rs_paths) = (Vec::new(), Vec::new());
    for j in 0..FRESH {
        es_paths.push(format!(
            "/es256?t={}",
            sign(jsonwebtoken::Algorithm::ES256, &es_key, j)?
        ));
        rs_paths.push(format!(
            "/rs256?t={}",
            sign(jsonwebtoken::Algorithm::RS256, &rs_key, j)?
        ));
    }
    let (es_paths, rs_paths) = (std::sync::Arc::new(es_paths), std::sync::Arc::new(rs_paths));

    let auth = |key: &str| {
        format!("    auth: {{ jwt: {{ keys: [{{ file: {key} }}], issuer: bench, audience: echo, token_from: [header, 'query:t'] }} }}\n")
    };
    let yaml = format!(
        "server: {{ max_connections: 100000 }}\nlisten:\n  - addr: 127.0.0.1:{PORT}\npools:\n  echo: {{ backends: [ws://127.0.0.1:{}] }}\nroutes:\n  - {{ name: open, path: /open, pool: echo }}\n  - name: es256\n    path: /es256\n    pool: echo\n{}  - name: rs256\n    path: /rs256\n    pool: echo\n{}",
        targets::BACKEND_PORT,
        auth("ec.pem"),
        auth("rsa.pem"),
    );
    let proxy = targets::upgate_with(&bin_dir, &work, "auth", &yaml, PORT, "0", 1)?;

    let dur = Duration::from_secs_f64(a.duration);
    // Per route: handshakes/s and CPU µs per handshake, one entry per round.
    let mut rate: Vec<Vec<f64>> = vec![Vec::new(); ROUTES.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); ROUTES.len()];
    let mut errors = 0;
    for round in 0..a.rounds {
        for k in 0..ROUTES.len() {
            let i = (round + k) % ROUTES.len();
            let mut t = Target {
                addr: proxy.plain,
                host: "localhost".into(),
                path: "/open".into(),
                tls: None,
                pid: proxy.pid(),
                paths: Default::default(),
            };
            match ROUTES[i] {
                "es256 same" => t.path = es_paths[0].clone(),
                "rs256 same" => t.path = rs_paths[0].clone(),
                "es256 new" => t.paths = es_paths.clone(),
                "rs256 new" => t.paths = rs_paths.clone(),
                _ => {}
            }
            let m = load::handshakes(&t, a.conns, Duration::from_secs(1), dur).await;
            errors += m.errors;
            eprintln!(
                "round {} {}: {:.0} hs/s, {:.1} µs CPU per handshake, {} errors",
                round + 1,
                ROUTES[i],
                m.rate(),
                m.cpu_us_per().unwrap_or(f64::NAN),
                m.errors
            );
            rate[i].push(m.rate());
            cpu[i].push(m.cpu_us_per().unwrap_or(f64::NAN));
        }
    }
    drop(proxy);
    drop(backend);

    let started = now_utc();
    let mut report = format!(
        "## JWT verification per handshake, {started}\n\n{}. upgate with one runtime thread pinned to core 0, load generator and echo backend on core 1; {} rounds × {} s (after 1 s warm-up), {} handshakes in flight, routes interleaved. The token travels in a query parameter (removed before the backend); `iss`, `aud` and `exp` are checked. *new*: every handshake brings a token never seen before (its signature is verified); *same*: every handshake brings the same token (a reconnecting client; the verified-token cache answers).\n\n| route, token | handshakes/s (median) | ratio to /open | upgate CPU µs per handshake (median, min–max) | added by authentication (median of per-round differences) |\n|---|---|---|---|---|\n",
        crate::machine_info(),
        a.rounds,
        a.duration,
        a.conns
    );
    let open_rate = median(rate[0].clone());
    for (i, r) in ROUTES.iter().enumerate() {
        let (lo, hi) = min_max(&cpu[i]);
        let added: Vec<f64> = cpu[i].iter().zip(&cpu[0]).map(|(x, o)| x - o).collect();
        report.push_str(&format!(
            "| /{r} | {:.0} | {:.2} | {:.1} ({lo:.1}–{hi:.1}) | {} |\n",
            median(rate[i].clone()),
            median(rate[i].clone()) / open_rate,
            median(cpu[i].clone()),
            if i == 0 {
                "—".to_string()
            } else {
                format!("{:+.1} µs", median(added))
            }
        ));
    }
    report.push_str(&format!("\nClient-side errors over all runs: {errors}.\n"));
    crate::save_report(&a.out, "auth-", &started, &report)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
