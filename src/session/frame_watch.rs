//! The splice's frame watch: follows WebSocket frame boundaries in one
//! direction of a session without copying or changing a byte, so the access
//! log can say which Close code ended it and the route can count messages.

/// Follows frame boundaries in one direction of a session, without
/// copying or changing a byte, to notice the first Close frame and its code
/// (for the access log). It reads only frame headers and, in a Close frame,
/// the two code bytes; payloads are skipped by count.
#[derive(Debug, Default)]
pub(crate) struct FrameWatch {
    /// Header bytes gathered so far, when a header straddles reads (a
    /// header is 2–14 bytes).
    hdr: [u8; 14],
    have: u8,
    /// Inside a Close frame: its mask, and the code bytes seen so far.
    close: Option<([u8; 4], [u8; 2], u8)>,
    /// Set at the first Close frame: its code (`None` when it carried none).
    pub(crate) seen: Option<Option<u16>>,
    /// Payload bytes of the current frame still to pass.
    skip: u64,
    /// Data messages begun so far (a text or binary frame; continuations
    /// and control frames are not counted).
    pub(crate) messages: u64,
}

impl FrameWatch {
    /// Total header length, as far as the bytes gathered tell.
    fn header_len(h: &[u8]) -> usize {
        match h {
            [_, b1, ..] => {
                2 + match b1 & 0x7f {
                    126 => 2,
                    127 => 8,
                    _ => 0,
                } + if b1 & 0x80 != 0 { 4 } else { 0 }
            }
            _ => 2,
        }
    }

    /// Bytes still to pass before the stream sits at a frame boundary: 0 at
    /// one; while a header is incomplete, the bytes it needs at least (ask
    /// again once they are fed). Meaningless once a Close was seen.
    pub(crate) fn to_boundary(&self) -> u64 {
        let have = usize::from(self.have);
        if have > 0 {
            (Self::header_len(&self.hdr[..have]) - have) as u64
        } else {
            self.skip
        }
    }

    pub(crate) fn feed(&mut self, mut b: &[u8]) {
        while self.seen.is_none() && !b.is_empty() {
            if self.skip > 0 {
                let n = b
                    .len()
                    .min(usize::try_from(self.skip).unwrap_or(usize::MAX));
                if let Some((mask, code, got)) = &mut self.close {
                    for &x in b[..n].iter().take(2 - usize::from(*got)) {
                        let i = usize::from(*got);
                        code[i] = x ^ mask[i];
                        *got += 1;
                    }
                }
                self.skip -= n as u64;
                b = &b[n..];
                if self.skip == 0 {
                    if let Some((_, code, got)) = self.close {
                        self.seen = Some((got == 2).then(|| u16::from_be_bytes(code)));
                    }
                }
                continue;
            }
            // A whole header in this read (the usual case): read it in place.
            if self.have == 0 && b.len() >= 2 {
                let need = Self::header_len(&b[..2]);
                if let Some((h, rest)) = b.split_at_checked(need) {
                    self.start(h);
                    b = rest;
                    continue;
                }
            }
            // A header that straddles reads: gather it.
            let have = usize::from(self.have);
            let need = Self::header_len(&self.hdr[..have]);
            let take = (need - have).min(b.len());
            self.hdr[have..have + take].copy_from_slice(&b[..take]);
            let have = have + take;
            self.have = have as u8; // at most 14
            b = &b[take..];
            if have < Self::header_len(&self.hdr[..have]) {
                continue;
            }
            let hdr = self.hdr;
            self.have = 0;
            self.start(&hdr[..have]);
        }
    }

    /// Takes in one complete frame header.
    fn start(&mut self, h: &[u8]) {
        let (len, at) = match h[1] & 0x7f {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
            127 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(&h[2..10]);
                (u64::from_be_bytes(a), 10)
            }
            n => (u64::from(n), 2),
        };
        let mut mask = [0u8; 4];
        if h[1] & 0x80 != 0 {
            mask.copy_from_slice(&h[at..at + 4]);
        }
        match h[0] & 0x0f {
            0x1 | 0x2 => self.messages += 1,
            0x8 => {
                if len == 0 {
                    self.seen = Some(None);
                }
                self.close = Some((mask, [0; 2], 0));
            }
            _ => {}
        }
        self.skip = len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut v = vec![0x80 | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => v.push(m | n as u8),
            n if n <= 0xffff => {
                v.push(m | 126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(m | 127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let k = mask.unwrap_or([0; 4]);
        if mask.is_some() {
            v.extend_from_slice(&k);
        }
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        v
    }

    #[test]
    fn frame_watch_finds_the_close_code_across_any_split() {
        let mut wire = Vec::new();
        wire.extend(frame(0x1, b"hello", Some([9, 8, 7, 6])));
        wire.extend(frame(0x2, &vec![5; 300], Some([1, 2, 3, 4])));
        wire.extend(frame(0x2, &vec![6; 70_000], None));
        wire.extend(frame(0x9, b"", Some([1, 1, 1, 1])));
        let mut close = 4001u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"bye");
        wire.extend(frame(0x8, &close, Some([0xde, 0xad, 0xbe, 0xef])));
        for chunk in [1, 2, 3, 7, 100, 4096, wire.len()] {
            let mut w = FrameWatch::default();
            for c in wire.chunks(chunk) {
                w.feed(c);
            }
            assert_eq!(w.seen, Some(Some(4001)), "chunks of {chunk}");
            assert_eq!(
                w.messages, 3,
                "text + 2 binary, not the ping: chunks of {chunk}"
            );
        }
        // A message in three fragments counts once.
        let mut w = FrameWatch::default();
        let mut first = frame(0x1, b"a", None);
        first[0] &= 0x7f;
        let mut mid = frame(0x0, b"b", None);
        mid[0] &= 0x7f;
        w.feed(&first);
        w.feed(&mid);
        w.feed(&frame(0x0, b"c", None));
        assert_eq!(w.messages, 1);
        let mut w = FrameWatch::default();
        w.feed(&frame(0x8, b"", None));
        assert_eq!(w.seen, Some(None));
        let mut w = FrameWatch::default();
        w.feed(&wire[..wire.len() - 4]);
        assert_eq!(w.seen, None, "no close until its code is complete");
    }

    /// Fed exactly `to_boundary()` bytes at a time, the watch stops at each
    /// frame's end, never inside one, whatever the frame sizes.
    #[test]
    fn to_boundary_leads_from_frame_end_to_frame_end() {
        let mut wire = Vec::new();
        let mut ends = Vec::new();
        for (op, len, mask) in [
            (0x1, 5, Some([1, 2, 3, 4])),
            (0x2, 300, None),
            (0x9, 0, Some([4, 3, 2, 1])),
            (0x2, 70_000, Some([7, 7, 7, 7])),
            (0x0, 126, None),
        ] {
            wire.extend(frame(op, &vec![0xab; len], mask));
            ends.push(wire.len());
        }
        let mut w = FrameWatch::default();
        assert_eq!(w.to_boundary(), 0, "a fresh stream sits at a boundary");
        let mut at = 0;
        let mut stops = Vec::new();
        // Start each frame with one byte, as a reader that is just past a boundary.
        while at < wire.len() {
            w.feed(&wire[at..at + 1]);
            at += 1;
            loop {
                let need = w.to_boundary() as usize;
                if need == 0 {
                    break;
                }
                w.feed(&wire[at..at + need]);
                at += need;
            }
            stops.push(at);
        }
        assert_eq!(stops, ends);
    }

    #[test]
    fn frame_watch_takes_arbitrary_bytes_in_arbitrary_pieces() {
        let mut r = crate::test_rng(5);
        for _ in 0..5_000 {
            let mut w = FrameWatch::default();
            let n = (r() % 400) as usize;
            let b: Vec<u8> = (0..n).map(|_| r() as u8).collect();
            let mut at = 0;
            while at < b.len() {
                let k = 1 + (r() as usize) % 20;
                w.feed(&b[at..(at + k).min(b.len())]);
                at += k;
            }
        }
    }
}
