//! Picking, failover order, weights and hashing of a pool.

use super::*;
use crate::config::BackendSpec;

fn pool_w(balance: Balance, weights: &[u32]) -> Pool {
    let cfg = PoolConfig {
        name: "p".into(),
        balance,
        hash_key: (balance == Balance::Hash).then_some(HashKey::Ip),
        connect_timeout: Duration::from_secs(1),
        backends: weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| BackendSpec {
                url: format!("ws://127.0.0.1:{}", 9000 + i).parse().unwrap(),
                weight,
                drain: false,
                discover: false,
            })
            .collect(),
        ca_file: None,
        health: None,
        passive: PassivePolicy {
            eject_after: 2,
            eject_for: Duration::from_secs(10),
        },
        fail_open: false,
        on_backend_down: crate::config::OnBackendDown::Close,
        max_attempts: 3,
        slow_start: Duration::ZERO,
        dns_refresh: Duration::from_secs(10),
        rebalance: None,
    };
    Pool::new(&cfg).unwrap()
}

fn pool(balance: Balance, n: usize) -> Pool {
    pool_w(balance, &vec![1; n])
}

fn first_port(p: &Pool) -> u16 {
    p.try_order(None).next().unwrap().url.port
}

/// Picks per backend over `n` requests.
fn counts(p: &Pool, n: usize, key: impl Fn(usize) -> Option<u64>) -> Vec<usize> {
    let mut c = vec![0; p.backends().len()];
    for i in 0..n {
        let port = p.try_order(key(i)).next().unwrap().url.port;
        c[usize::from(port - 9000)] += 1;
    }
    c
}

#[tokio::test]
async fn round_robin_cycles_and_try_order_covers_all() {
    let p = pool(Balance::RoundRobin, 3);
    let firsts: Vec<u16> = (0..6).map(|_| first_port(&p)).collect();
    assert_eq!(firsts, [9000, 9001, 9002, 9000, 9001, 9002]);
    for balance in [
        Balance::RoundRobin,
        Balance::LeastConn,
        Balance::P2c,
        Balance::Hash,
    ] {
        let p = pool(balance, 5);
        for key in [None, Some(42)] {
            let mut order: Vec<u16> = p.try_order(key).map(|b| b.url.port).collect();
            order.sort();
            assert_eq!(order, [9000, 9001, 9002, 9003, 9004], "{balance:?}");
        }
    }
}

#[tokio::test]
async fn weighted_round_robin_is_exact_over_10000_picks() {
    let p = pool_w(Balance::RoundRobin, &[5, 3, 2]);
    assert_eq!(counts(&p, 10_000, |_| None), [5_000, 3_000, 2_000]);
}

#[tokio::test]
async fn p2c_spreads_evenly_and_avoids_the_loaded() {
    let p = pool(Balance::P2c, 4);
    // Idle pool: within ±10 % of 2,500 each over 10,000 picks.
    for c in counts(&p, 10_000, |_| None) {
        assert!((2_250..=2_750).contains(&c), "{c}");
    }
    // A loaded backend is picked only when both random choices are it: never, with two distinct picks.
    let _g: Vec<BackendGuard> = (0..10)
        .map(|_| BackendGuard::new(p.backends()[0].clone()))
        .collect();
    assert_eq!(counts(&p, 10_000, |_| None)[0], 0);
}

#[tokio::test(start_paused = true)]
async fn slow_start_grows_a_recovered_backends_share() {
    let mut p = pool(Balance::RoundRobin, 2);
    p.slow_start = Duration::from_secs(10);
    let t = crate::backend::health::Thresholds {
        healthy_after: 1,
        unhealthy_after: 1,
    };
    p.backends()[0].health.record_check(false, t);
    p.backends()[0].health.record_check(true, t); // back up now
    let share = |p: &Pool| counts(p, 10_000, |_| None)[0] as f64 / 10_000.0;
    // Normal share 0.5; right after recovery ~5 % of it, half-way ~50 %, then all.
    let s0 = share(&p);
    assert!(s0 < 0.06, "{s0}");
    tokio::time::advance(Duration::from_secs(5)).await;
    let s5 = share(&p);
    assert!((0.20..0.30).contains(&s5), "{s5}");
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(share(&p), 0.5);
}

#[tokio::test]
async fn least_conn_follows_live_guards() {
    let p = pool(Balance::LeastConn, 3);
    let b0 = p.backends()[0].clone();
    let b1 = p.backends()[1].clone();
    let _g: Vec<BackendGuard> = (0..2)
        .map(|_| BackendGuard::new(b0.clone()))
        .chain([BackendGuard::new(b1.clone())])
        .collect();
    for _ in 0..5 {
        assert_eq!(first_port(&p), 9002);
    }
    {
        let _more: Vec<BackendGuard> = (0..3)
            .map(|_| BackendGuard::new(p.backends()[2].clone()))
            .collect();
        assert_eq!(first_port(&p), 9001);
    }
    // Guards released on drop: back to the emptiest.
    assert_eq!(p.backends()[2].active(), 0);
    assert_eq!(first_port(&p), 9002);
}

fn key(i: usize) -> Option<u64> {
    Some(balance::fnv1a(format!("user-{i}").as_bytes()))
}

#[tokio::test]
async fn hash_is_fair_weighted_and_the_same_on_every_instance() {
    let a = pool_w(Balance::Hash, &[1, 1, 1, 1]);
    let b = pool_w(Balance::Hash, &[1, 1, 1, 1]); // a second gateway, same config
    for c in counts(&a, 10_000, key) {
        assert!((2_250..=2_750).contains(&c), "{c}");
    }
    for i in 0..1_000 {
        let pa = a.try_order(key(i)).map(|x| x.url.port).collect::<Vec<_>>();
        let pb = b.try_order(key(i)).map(|x| x.url.port).collect::<Vec<_>>();
        assert_eq!(pa, pb, "instances disagree on key {i}");
    }
    let w = pool_w(Balance::Hash, &[1, 3]);
    let c = counts(&w, 10_000, key);
    assert!((2_250..=2_750).contains(&c[0]), "{c:?}");
}

#[tokio::test]
async fn removing_one_of_five_backends_moves_only_its_keys() {
    let five = pool(Balance::Hash, 5);
    // The same backends without the last one (URLs, hence identities, unchanged).
    let four = pool(Balance::Hash, 4);
    let n = 10_000;
    let mut moved = 0;
    for i in 0..n {
        let before = five.try_order(key(i)).next().unwrap().url.port;
        let after = four.try_order(key(i)).next().unwrap().url.port;
        if before != after {
            assert_eq!(before, 9004, "a key moved although its backend stayed");
            moved += 1;
        }
    }
    let fraction = moved as f64 / n as f64;
    // Ideal 1/5; allow 0.15–0.25.
    assert!((0.15..=0.25).contains(&fraction), "moved {fraction}");
}
