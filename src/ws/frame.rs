//! The RFC 6455 framing a fan-out needs on the client side: server frames
//! are encoded once into `Bytes` (unmasked, so the same bytes suit every
//! client), and client frames (masked) are parsed from a read buffer.

use bytes::{BufMut, Bytes, BytesMut};

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Close codes the gateway sends.
pub mod code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const SERVICE_RESTART: u16 = 1012;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// One complete server frame (FIN set, unmasked).
pub fn encode(opcode: u8, payload: &[u8]) -> Bytes {
    encode_with(0x80 | opcode, payload)
}

/// One complete server frame whose payload is permessage-deflate data (RSV1 set).
pub fn encode_compressed(opcode: u8, payload: &[u8]) -> Bytes {
    encode_with(0xC0 | opcode, payload)
}

fn encode_with(first: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    append_with(&mut out, first, payload);
    out.freeze()
}

/// Appends one complete server frame to `out` (several frames, one write).
pub fn append(out: &mut BytesMut, opcode: u8, payload: &[u8], compressed: bool) {
    let first = if compressed { 0xC0 } else { 0x80 } | opcode;
    out.reserve(payload.len() + 10);
    append_with(out, first, payload);
}

fn append_with(out: &mut BytesMut, first: u8, payload: &[u8]) {
    out.put_u8(first);
    let n = payload.len();
    if n < 126 {
        out.put_u8(n as u8);
    } else if n <= usize::from(u16::MAX) {
        out.put_u8(126);
        out.put_u16(n as u16);
    } else {
        out.put_u8(127);
        out.put_u64(n as u64);
    }
    out.put_slice(payload);
}

/// A close frame; the reason is cut to fit the 125-byte control payload.
pub fn close(code: u16, reason: &str) -> Bytes {
    encode(OP_CLOSE, &close_payload(code, reason))
}

/// A close frame as a client sends it (masked with `mask`), for a gateway
/// that ends a backend connection it relays for a client.
pub fn close_masked(code: u16, reason: &str, mask: [u8; 4]) -> Bytes {
    let mut p = close_payload(code, reason);
    unmask(&mut p, mask); // masking and unmasking are the same XOR
    let mut out = BytesMut::with_capacity(p.len() + 6);
    out.put_u8(0x80 | OP_CLOSE);
    out.put_u8(0x80 | p.len() as u8); // at most 125: fits the 7-bit length
    out.put_slice(&mask);
    out.put_slice(&p);
    out.freeze()
}

fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut p = Vec::with_capacity(2 + cut);
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(&reason.as_bytes()[..cut]);
    p
}

/// A parsed client frame header: where its payload sits in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    /// RSV1: the message this frame starts is compressed (permessage-deflate).
    pub compressed: bool,
    pub opcode: u8,
    pub start: usize,
    pub len: usize,
    pub mask: [u8; 4],
}

impl Frame {
    pub fn end(&self) -> usize {
        self.start + self.len
    }
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// Why a client frame is refused, with the close code to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("client frames must be masked")]
    Unmasked,
    #[error("reserved bits set without a negotiated extension")]
    Reserved,
    #[error("unknown opcode")]
    Opcode,
    #[error("control frame too long or fragmented")]
    Control,
    #[error("message too big")]
    TooBig,
    #[error("continuation frame without a message to continue, or a new message inside one")]
    Continuation,
    #[error("close frame with a 1-byte payload")]
    CloseLength,
    #[error("close code not allowed on the wire")]
    CloseCode,
    #[error("text is not valid UTF-8")]
    Utf8,
}

impl FrameError {
    pub fn code(self) -> u16 {
        match self {
            FrameError::TooBig => code::TOO_BIG,
            FrameError::Utf8 => code::INVALID_DATA,
            FrameError::Unmasked
            | FrameError::Reserved
            | FrameError::Opcode
            | FrameError::Control
            | FrameError::Continuation
            | FrameError::CloseLength
            | FrameError::CloseCode => code::PROTOCOL,
        }
    }
}

/// Parses the client frame at the start of `buf`: `Ok(None)` until it is
/// complete. `max` bounds a data frame's payload. `deflate`: the client
/// negotiated permessage-deflate, so RSV1 may mark a message's first frame.
pub fn parse(buf: &[u8], max: usize, deflate: bool) -> Result<Option<Frame>, FrameError> {
    Ok(parse_header(buf, max, deflate)?.filter(|f| f.end() <= buf.len()))
}

/// Like [`parse`], but returns the frame as soon as its header is complete
/// (its payload may still be arriving: `end()` may lie past `buf`).
pub fn parse_header(buf: &[u8], max: usize, deflate: bool) -> Result<Option<Frame>, FrameError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    let opcode = b0 & 0x0f;
    let compressed = b0 & 0x40 != 0;
    if b0 & 0x30 != 0 || (compressed && !(deflate && matches!(opcode, OP_TEXT | OP_BINARY))) {
        return Err(FrameError::Reserved);
    }
    let fin = b0 & 0x80 != 0;
    if !matches!(
        opcode,
        OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(FrameError::Opcode);
    }
    if b1 & 0x80 == 0 {
        return Err(FrameError::Unmasked);
    }
    let (len, mut i) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                (u64::from_be_bytes(a), 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if opcode & 0x8 != 0 && (len > 125 || !fin) {
        return Err(FrameError::Control);
    }
    if len > max as u64 {
        return Err(FrameError::TooBig);
    }
    let len = len as usize;
    let Some(m) = buf.get(i..i + 4) else {
        return Ok(None);
    };
    let mask = [m[0], m[1], m[2], m[3]];
    i += 4;
    Ok(Some(Frame {
        fin,
        compressed,
        opcode,
        start: i,
        len,
        mask,
    }))
}

/// Whether a peer may send close code `c` (RFC 6455 §7.4, IANA registry):
/// 1004–1006 and 1015 are reserved, below 1000 and 1016–2999 unassigned.
pub fn close_code_allowed(c: u16) -> bool {
    matches!(c, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Reads a Close frame's payload: no code, or a code the peer may send and
/// a UTF-8 reason.
pub fn parse_close(payload: &[u8]) -> Result<Option<u16>, FrameError> {
    match payload {
        [] => Ok(None),
        [_] => Err(FrameError::CloseLength),
        [a, b, reason @ ..] => {
            let c = u16::from_be_bytes([*a, *b]);
            if !close_code_allowed(c) {
                return Err(FrameError::CloseCode);
            }
            std::str::from_utf8(reason).map_err(|_| FrameError::Utf8)?;
            Ok(Some(c))
        }
    }
}

/// Checks a text message's UTF-8 piece by piece as it arrives (fragments,
/// or parts of one frame), so a message that can no longer become valid is
/// refused at the byte that breaks it, not when it ends. Keeps at most the
/// three bytes of a code point cut by a piece boundary.
#[derive(Debug, Default, Clone, Copy)]
pub struct Utf8Check {
    carry: [u8; 4],
    have: usize,
}

impl Utf8Check {
    /// The next piece of the message.
    pub fn feed(&mut self, mut piece: &[u8]) -> Result<(), FrameError> {
        if self.have > 0 {
            // Complete the code point cut at the end of the last piece.
            let width = match self.carry[0] {
                0xC2..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4, // 0xF0..=0xF4: anything else was refused when carried
            };
            let take = (width - self.have).min(piece.len());
            self.carry[self.have..self.have + take].copy_from_slice(&piece[..take]);
            self.have += take;
            piece = &piece[take..];
            match std::str::from_utf8(&self.carry[..self.have]) {
                Ok(_) => self.have = 0,
                Err(e) if e.error_len().is_none() => return Ok(()), // still cut: wait for more
                Err(_) => return Err(FrameError::Utf8),
            }
        }
        match std::str::from_utf8(piece) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let rest = &piece[e.valid_up_to()..];
                self.carry[..rest.len()].copy_from_slice(rest);
                self.have = rest.len();
                Ok(())
            }
            Err(_) => Err(FrameError::Utf8),
        }
    }

    /// The message ended: a code point still cut is invalid.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.have == 0 {
            Ok(())
        } else {
            Err(FrameError::Utf8)
        }
    }
}

/// Removes the client's mask in place from `payload`, which starts `offset`
/// bytes into its frame's payload. Eight bytes at a time (the mask turned
/// to start at `offset` and repeated into a word): a byte loop costs a
/// cycle per byte, which is most of what a 64 KiB message costs to relay.
pub fn unmask_from(payload: &mut [u8], mask: [u8; 4], offset: usize) {
    let m = [
        mask[offset & 3],
        mask[(offset + 1) & 3],
        mask[(offset + 2) & 3],
        mask[(offset + 3) & 3],
    ];
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = payload.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ word).to_ne_bytes());
    }
    // The tail starts at a multiple of 8 from `offset`: the same turn of the mask.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i & 3];
    }
}

/// Removes the client's mask in place.
pub fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    unmask_from(payload, mask, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_rng as rng;

    #[test]
    fn arbitrary_bytes_never_panic_and_frames_stay_inside() {
        let mut r = rng(11);
        for _ in 0..50_000 {
            let n = (r() % 200) as usize;
            let mut b: Vec<u8> = (0..n).map(|_| r() as u8).collect();
            if let Some(x) = b.get_mut(1) {
                *x |= 0x80; // mostly masked, to get past the first checks
            }
            if let Ok(Some(f)) = parse(&b, (r() % 300) as usize, r().is_multiple_of(2)) {
                assert!(f.end() <= b.len() && f.start <= f.end(), "{b:?}");
            }
        }
    }

    #[test]
    fn rsv1_marks_compressed_messages_only_when_negotiated() {
        let mut z = masked(OP_TEXT, true, b"abc");
        z[0] |= 0x40;
        assert_eq!(parse(&z, 100, false), Err(FrameError::Reserved));
        let f = parse(&z, 100, true).unwrap().unwrap();
        assert!(f.compressed && f.fin && f.opcode == OP_TEXT);
        assert!(
            !parse(&masked(OP_TEXT, true, b"abc"), 100, true)
                .unwrap()
                .unwrap()
                .compressed
        );
        for (op, bits) in [
            (OP_CONT, 0x40),
            (OP_PING, 0x40),
            (OP_TEXT, 0x20),
            (OP_TEXT, 0x10),
        ] {
            let mut f = masked(op, true, b"x");
            f[0] |= bits;
            assert_eq!(
                parse(&f, 100, true),
                Err(FrameError::Reserved),
                "op {op} bits {bits:#x}"
            );
        }
    }

    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut v = vec![if fin { 0x80 } else { 0 } | opcode];
        let n = payload.len();
        if n < 126 {
            v.push(0x80 | n as u8);
        } else if n <= 0xffff {
            v.push(0x80 | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            v.push(0x80 | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        v
    }

    #[test]
    fn close_payloads_follow_the_rfc() {
        assert_eq!(parse_close(b""), Ok(None));
        assert_eq!(parse_close(b"\x03"), Err(FrameError::CloseLength));
        for ok in [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
        ] {
            assert_eq!(parse_close(&ok.to_be_bytes()), Ok(Some(ok)), "{ok}");
        }
        for bad in [
            0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert_eq!(
                parse_close(&bad.to_be_bytes()),
                Err(FrameError::CloseCode),
                "{bad}"
            );
        }
        assert_eq!(parse_close(b"\x03\xe8bye"), Ok(Some(1000)));
        assert_eq!(
            parse_close(b"\x03\xe8\xce\xba\xe1\xbd"),
            Err(FrameError::Utf8)
        );
        assert_eq!(FrameError::Utf8.code(), 1007);
        assert_eq!(FrameError::CloseCode.code(), 1002);
    }

    #[test]
    fn utf8_fails_at_the_piece_that_breaks_it() {
        let feed_all = |pieces: &[&[u8]]| {
            let mut c = Utf8Check::default();
            for p in pieces {
                c.feed(p)?;
            }
            c.finish()
        };
        // "κόσμε" cut inside code points, in every way.
        let text = "κόσμε €😀".as_bytes();
        for a in 0..text.len() {
            for b in a..text.len() {
                assert_eq!(
                    feed_all(&[&text[..a], &text[a..b], &text[b..]]),
                    Ok(()),
                    "{a} {b}"
                );
            }
        }
        // A code point cut at the end of the message.
        assert_eq!(feed_all(&[&text[..3]]), Err(FrameError::Utf8));
        // An invalid sequence fails in the piece that brings it (Autobahn 6.4).
        let mut c = Utf8Check::default();
        assert_eq!(
            c.feed(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5"),
            Ok(())
        );
        assert_eq!(c.feed(b"\xf4\x90\x80\x80"), Err(FrameError::Utf8));
        let mut c = Utf8Check::default();
        assert_eq!(c.feed(b"ok\xf4"), Ok(()));
        assert_eq!(c.feed(b"\x90"), Err(FrameError::Utf8));
        // Byte by byte, a valid text passes.
        let mut c = Utf8Check::default();
        for b in text {
            assert_eq!(c.feed(&[*b]), Ok(()));
        }
        assert_eq!(c.finish(), Ok(()));
    }

    /// The word-at-a-time unmask equals the plain byte loop for every
    /// offset, length and split.
    #[test]
    fn unmasking_matches_the_byte_loop() {
        let mut r = rng(3);
        for _ in 0..2_000 {
            let n = (r() % 300) as usize;
            let offset = (r() % 4096) as usize;
            let mask = (r() as u32).to_be_bytes();
            let data: Vec<u8> = (0..n).map(|_| r() as u8).collect();
            let mut want = data.clone();
            for (i, b) in want.iter_mut().enumerate() {
                *b ^= mask[(offset + i) & 3];
            }
            let mut got = data.clone();
            unmask_from(&mut got, mask, offset);
            assert_eq!(got, want, "n {n}, offset {offset}");
            // In two pieces.
            let cut = if n == 0 { 0 } else { (r() as usize) % n };
            let mut split = data.clone();
            let (a, b) = split.split_at_mut(cut);
            unmask_from(a, mask, offset);
            unmask_from(b, mask, offset + cut);
            assert_eq!(split, want, "n {n}, offset {offset}, cut {cut}");
        }
    }

    #[test]
    fn unmasking_in_pieces_equals_unmasking_at_once() {
        let mask = [1, 2, 3, 4];
        let data: Vec<u8> = (0..50).collect();
        let mut once = data.clone();
        unmask(&mut once, mask);
        let mut pieces = data.clone();
        let (a, b) = pieces.split_at_mut(7);
        unmask_from(a, mask, 0);
        unmask_from(b, mask, 7);
        assert_eq!(once, pieces);
    }

    #[test]
    fn encodes_every_length_form() {
        for n in [0, 125, 126, 65535, 65536] {
            let f = encode(OP_BINARY, &vec![7; n]);
            let hdr = f.len() - n;
            assert_eq!(
                hdr,
                if n < 126 {
                    2
                } else if n <= 65535 {
                    4
                } else {
                    10
                }
            );
            assert_eq!(f[0], 0x82);
        }
        let c = close(1008, &"é".repeat(100));
        assert!(
            c.len() <= 127 && c[1] as usize == c.len() - 2,
            "{}",
            c.len()
        );
        assert!(std::str::from_utf8(&c[4..]).is_ok());
    }

    #[test]
    fn parses_masked_frames_incrementally() {
        for n in [0, 5, 200, 70_000] {
            let payload: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let wire = masked(OP_TEXT, true, &payload);
            for cut in [0, 1, wire.len() / 2, wire.len() - 1] {
                assert_eq!(
                    parse(&wire[..cut], 1 << 20, false),
                    Ok(None),
                    "n={n} cut={cut}"
                );
            }
            let mut wire2 = wire.clone();
            let f = parse(&wire2, 1 << 20, false).unwrap().unwrap();
            assert_eq!((f.fin, f.opcode, f.end()), (true, OP_TEXT, wire.len()));
            unmask(&mut wire2[f.start..f.end()], f.mask);
            assert_eq!(&wire2[f.start..f.end()], &payload[..]);
        }
    }

    #[test]
    fn refuses_what_the_rfc_refuses() {
        assert_eq!(parse(&[0x81, 0x00], 100, false), Err(FrameError::Unmasked));
        assert_eq!(parse(&[0xC1, 0x80], 100, false), Err(FrameError::Reserved));
        assert_eq!(parse(&[0x83, 0x80], 100, false), Err(FrameError::Opcode));
        assert_eq!(
            parse(&masked(OP_PING, false, b"x"), 100, false),
            Err(FrameError::Control)
        );
        assert_eq!(
            parse(&masked(OP_PING, true, &[0; 126]), 1000, false),
            Err(FrameError::Control)
        );
        assert_eq!(
            parse(&masked(OP_BINARY, true, &[0; 101]), 100, false),
            Err(FrameError::TooBig)
        );
        assert_eq!(FrameError::TooBig.code(), 1009);
    }
}
