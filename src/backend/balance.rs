//! Pure balancing arithmetic, shared by every pool and tested without sockets.
//!
//! - Weighted round robin: a precomputed smooth schedule (nginx's algorithm,
//!   run once at load), walked with an atomic counter.
//! - Power of two choices: two pseudo-random picks from a lock-free
//!   splitmix64 sequence, the less loaded wins.
//! - Consistent hashing: weighted rendezvous (highest random weight). Every
//!   gateway instance computes the same order from the key and the backend
//!   URLs alone, with no shared state; removing one of N backends moves only
//!   the keys that were on it (about 1/N).
//!
//! The hash functions are written out here (FNV-1a, splitmix64's finaliser)
//! so results never change with a Rust or crate upgrade: gateways of
//! different versions must agree.

use std::sync::atomic::{AtomicU64, Ordering};

/// FNV-1a, 64-bit: stable across builds and platforms.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64's finaliser: a strong 64-bit mixer.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A lock-free pseudo-random sequence (splitmix64 over an atomic counter).
#[derive(Debug)]
pub struct Rng(AtomicU64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(AtomicU64::new(seed))
    }
    pub fn next(&self) -> u64 {
        mix(self.0.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed))
    }
    /// A value in `0..n` (n > 0).
    pub fn below(&self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
}

/// A random `u64` from the standard library's per-process hash keys: good
/// enough for jitter and handshake nonces, no generator state to share.
pub fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// `d` spread by ±20 %, so many reconnecting channels do not retry in step.
pub fn jitter(d: std::time::Duration) -> std::time::Duration {
    let f = 0.8 + 0.4 * (random() >> 11) as f64 / (1u64 << 53) as f64;
    d.mul_f64(f)
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes in base64.
pub fn ws_key() -> String {
    use base64::Engine;
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&random().to_le_bytes());
    b[8..].copy_from_slice(&random().to_le_bytes());
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// The smooth weighted round-robin sequence for `weights` (each ≥ 1),
/// reduced by their common divisor: backend `i` appears `w_i / g` times,
/// spread out rather than in runs.
pub fn schedule(weights: &[u32]) -> Vec<u16> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let w: Vec<i64> = weights.iter().map(|x| i64::from(x / g)).collect();
    let total: i64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(u16::try_from(best).unwrap_or(0));
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Weighted rendezvous score of one backend for one key: higher wins.
pub fn rendezvous(key: u64, backend_id: u64, weight: u32) -> f64 {
    let h = mix(key ^ mix(backend_id));
    // A uniform value in (0, 1), then -w / ln(u): the weighted HRW score.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(weight) / u.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_stable_values() {
        // Fixed expectations: a change here breaks agreement between gateway versions.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(mix(0), 0);
        assert_eq!(mix(1), 0x5692_161d_100b_05e5);
    }

    #[test]
    fn schedule_follows_weights_and_interleaves() {
        let s = schedule(&[5, 1, 1]);
        assert_eq!(s, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(schedule(&[2, 2, 2]), vec![0, 1, 2]);
        let s = schedule(&[3, 1]);
        assert_eq!(s.iter().filter(|&&i| i == 0).count(), 3);
    }

    #[test]
    fn rng_below_is_roughly_uniform() {
        let r = Rng::new(7);
        let mut counts = [0usize; 4];
        for _ in 0..40_000 {
            counts[r.below(4)] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn rendezvous_spreads_by_weight() {
        let ids = [fnv1a(b"ws://a:1"), fnv1a(b"ws://b:1"), fnv1a(b"ws://c:1")];
        let weights = [1u32, 1, 2];
        let mut counts = [0usize; 3];
        for k in 0..10_000u64 {
            let key = fnv1a(&k.to_le_bytes());
            let best = (0..3)
                .max_by(|&a, &b| {
                    rendezvous(key, ids[a], weights[a])
                        .total_cmp(&rendezvous(key, ids[b], weights[b]))
                })
                .unwrap();
            counts[best] += 1;
        }
        // Expected 2500 / 2500 / 5000; allow ±10 %.
        assert!((2_250..2_750).contains(&counts[0]), "{counts:?}");
        assert!((2_250..2_750).contains(&counts[1]), "{counts:?}");
        assert!((4_500..5_500).contains(&counts[2]), "{counts:?}");
    }
}
