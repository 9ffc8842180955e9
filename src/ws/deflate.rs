//! permessage-deflate (RFC 7692) for fan-out clients, done the fan-out way:
//! each upstream message is compressed **once** and the same bytes go to
//! every client that negotiated the extension.
//!
//! That works because upgate answers every offer with
//! `server_no_context_takeover` (each message is compressed on its own, so
//! it does not depend on what a particular client received before) and
//! `client_no_context_takeover` (so client messages, when forwarded, are
//! inflated without keeping a 32 KiB window per client). RFC 7692 lets a
//! server add both to its answer whatever the offer said (§7.1.1.1,
//! §7.1.1.2). Offers that limit the server's window below 15 bits are
//! declined; the client then gets uncompressed messages.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use http::HeaderMap;

/// The four bytes a sync flush ends with; RFC 7692 §7.2.1 drops them.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The `Sec-WebSocket-Extensions` answer accepting the first acceptable
/// permessage-deflate offer in `headers`, if there is one.
pub fn negotiate(headers: &HeaderMap) -> Option<&'static str> {
    let offers = headers
        .get_all(http::header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for offer in offers {
        let mut parts = offer.split(';').map(str::trim);
        if !parts
            .next()
            .is_some_and(|n| n.eq_ignore_ascii_case("permessage-deflate"))
        {
            continue;
        }
        if let Some(answer) = accept(parts) {
            return Some(answer);
        }
    }
    None
}

/// Checks one offer's parameters; the answer if upgate can take it.
fn accept<'a>(params: impl Iterator<Item = &'a str>) -> Option<&'static str> {
    let mut seen = Vec::new();
    let mut window15 = false;
    for p in params {
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (p, None),
        };
        let name = name.to_ascii_lowercase();
        if seen.contains(&name) {
            return None; // a parameter twice makes the offer invalid (§7)
        }
        match (name.as_str(), value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(v)) if bits(v).is_some() => {}
            // We compress with a 32 KiB window: only a limit of 15 fits.
            ("server_max_window_bits", Some(v)) if bits(v) == Some(15) => window15 = true,
            _ => return None,
        }
        seen.push(name);
    }
    Some(if window15 {
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15"
    } else {
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    })
}

fn bits(v: &str) -> Option<u8> {
    v.parse::<u8>().ok().filter(|b| (8..=15).contains(b))
}

/// Compresses messages one at a time (no context kept between them).
pub struct Deflater {
    c: Compress,
}

impl Default for Deflater {
    fn default() -> Self {
        Deflater {
            c: Compress::new(Compression::default(), false),
        }
    }
}

impl Deflater {
    /// The compressed payload, or `None` when compressing does not make it
    /// smaller (the message then goes out uncompressed, which RFC 7692 allows).
    pub fn compress(&mut self, payload: &[u8]) -> Option<Vec<u8>> {
        self.c.reset();
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        loop {
            let before = self.c.total_in() as usize;
            let input = &payload[before.min(payload.len())..];
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(64));
            }
            let status = self
                .c
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .ok()?;
            let done = self.c.total_in() as usize == payload.len();
            // Finished once all input is in and the flush left room to spare.
            if done && status == Status::Ok && out.len() < out.capacity() {
                break;
            }
            if out.len() > payload.len() + 64 {
                return None;
            }
        }
        if !out.ends_with(&TAIL) {
            return None;
        }
        out.truncate(out.len() - TAIL.len());
        (out.len() < payload.len()).then_some(out)
    }
}

thread_local! {
    /// One compressor per runtime thread (its state is a few hundred KiB,
    /// too much for every channel), reset for every message.
    static DEFLATER: std::cell::RefCell<Deflater> = Default::default();
}

/// Compresses one message with this thread's compressor; `None` when that
/// would not make it smaller.
pub fn compress(payload: &[u8]) -> Option<Vec<u8>> {
    DEFLATER.with(|d| d.borrow_mut().compress(payload))
}

/// Why a compressed client message is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    #[error("message too big once inflated")]
    TooBig,
    #[error("invalid compressed data")]
    Corrupt,
}

impl InflateError {
    /// The close code the client gets for it.
    pub fn code(self) -> u16 {
        match self {
            InflateError::TooBig => super::frame::code::TOO_BIG,
            InflateError::Corrupt => super::frame::code::INVALID_DATA,
        }
    }
}

thread_local! {
    /// One inflater per runtime thread, reset for every message (clients
    /// use no context takeover), so clients keep no window of their own.
    static INFLATER: std::cell::RefCell<Decompress> = std::cell::RefCell::new(Decompress::new(false));
}

/// Inflates one client message, refusing to produce more than `max` bytes.
pub fn inflate(payload: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    INFLATER.with(|d| {
        let mut d = d.borrow_mut();
        d.reset(false);
        let input = [payload, &TAIL[..]].concat();
        let mut out = Vec::with_capacity((payload.len() * 4).clamp(64, max.max(64)));
        loop {
            let (used, had) = (d.total_in() as usize, out.len());
            if out.capacity() - out.len() < 64 {
                if out.len() > max {
                    return Err(InflateError::TooBig);
                }
                out.reserve(out.capacity().min(max + 1 - out.len()).max(64));
            }
            let status = d
                .decompress_vec(
                    &input[used.min(input.len())..],
                    &mut out,
                    FlushDecompress::Sync,
                )
                .map_err(|_| InflateError::Corrupt)?;
            if out.len() > max {
                return Err(InflateError::TooBig);
            }
            let consumed = d.total_in() as usize == input.len();
            if status == Status::StreamEnd || (consumed && out.len() < out.capacity()) {
                return Ok(out);
            }
            // No progress with room to spare: the data cannot go on.
            if d.total_in() as usize == used && out.len() == had {
                return Err(InflateError::Corrupt);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(v: &str) -> Option<&'static str> {
        let mut h = HeaderMap::new();
        h.insert(http::header::SEC_WEBSOCKET_EXTENSIONS, v.parse().unwrap());
        negotiate(&h)
    }

    #[test]
    fn offers_browsers_send_are_accepted() {
        let plain = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
        // Chrome, Firefox, and a client asking for no context itself.
        assert_eq!(
            offer("permessage-deflate; client_max_window_bits"),
            Some(plain)
        );
        assert_eq!(offer("permessage-deflate"), Some(plain));
        assert_eq!(
            offer("permessage-deflate; client_no_context_takeover; server_no_context_takeover"),
            Some(plain)
        );
        assert_eq!(
            offer("permessage-deflate; server_max_window_bits=15"),
            Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15")
        );
        // A smaller server window is declined, but a later offer is taken.
        assert_eq!(offer("permessage-deflate; server_max_window_bits=10"), None);
        assert_eq!(
            offer("permessage-deflate; server_max_window_bits=10, permessage-deflate"),
            Some(plain)
        );
        for bad in [
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; foo",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "x-webkit-deflate-frame",
            "",
        ] {
            assert_eq!(offer(bad), None, "{bad}");
        }
        assert_eq!(negotiate(&HeaderMap::new()), None);
    }

    #[test]
    fn arbitrary_input_ends_in_a_result() {
        let mut r = crate::test_rng(0x9e37_79b9_7f4a_7c15);
        let valid = Deflater::default()
            .compress(&b"market data ".repeat(100))
            .unwrap();
        for _ in 0..5_000 {
            let mut b: Vec<u8> = if r().is_multiple_of(2) {
                valid.clone()
            } else {
                (0..r() % 300).map(|_| r() as u8).collect()
            };
            for _ in 0..(r() % 4) {
                if !b.is_empty() {
                    let i = (r() as usize) % b.len();
                    b[i] = r() as u8;
                }
            }
            if let Ok(out) = inflate(&b, 4096) {
                assert!(out.len() <= 4096);
            }
        }
    }

    #[test]
    fn round_trip_and_limits() {
        let mut d = Deflater::default();
        let msg = br#"{"pair":"EURUSD","bid":1.08412,"ask":1.08415,"ts":1764115200123}"#.repeat(40);
        let z = d.compress(&msg).expect("compressible");
        assert!(z.len() < msg.len() / 5, "{} of {}", z.len(), msg.len());
        assert_eq!(inflate(&z, msg.len()).unwrap(), msg);
        // No context between messages: the same input compresses the same way.
        assert_eq!(d.compress(&msg).unwrap(), z);
        assert_eq!(inflate(&z, msg.len() - 1), Err(InflateError::TooBig));
        // Incompressible or tiny input stays as it is.
        assert_eq!(d.compress(b"ab"), None);
        let mut r = crate::test_rng(88172645463325252);
        let noise: Vec<u8> = (0..4096).map(|_| (r() >> 24) as u8).collect();
        assert_eq!(d.compress(&noise), None);
        // Large output crosses buffer growth in both directions.
        let big = b"0123456789abcdef".repeat(100_000);
        let z = d.compress(&big).unwrap();
        assert_eq!(inflate(&z, big.len()).unwrap(), big);
        // A bomb is cut off at the limit.
        let zeros = vec![0u8; 10 << 20];
        let z = d.compress(&zeros).unwrap();
        assert!(z.len() < 20_000);
        assert_eq!(inflate(&z, 65536), Err(InflateError::TooBig));
        assert_eq!(
            inflate(b"\xff\xff\xff\xff garbage", 1000),
            Err(InflateError::Corrupt)
        );
    }
}
