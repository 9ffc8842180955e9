//! A fan-out client's incoming frames, assembled into messages: a pure
//! state machine over a byte buffer (no I/O), so it is tested and fuzzed
//! without sockets. It enforces RFC 6455 as a server must: masking,
//! reserved bits and opcodes, control-frame rules, continuation order,
//! close payloads, `max_message`, and UTF-8 of plain text as it arrives,
//! even inside a frame that is not complete yet (compressed text is
//! checked once inflated).

use super::frame::{self, FrameError, Utf8Check};

/// What the client sent, one item at a time.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// A ping's payload (to answer with a pong).
    Ping(Vec<u8>),
    /// A whole data message: opcode, payload, compressed (RSV1 on its first frame).
    Message(u8, Vec<u8>, bool),
    /// A valid Close frame and its code, if it carried one.
    Close(Option<u16>),
    /// A protocol violation: the connection must be failed with its code.
    Bad(FrameError),
}

/// A fragmented message being assembled.
struct Partial {
    opcode: u8,
    /// RSV1 on its first frame (permessage-deflate): checked once inflated.
    compressed: bool,
    buf: Vec<u8>,
}

/// Parses and assembles a client's frames from the bytes read so far.
pub struct Reader {
    /// Bytes of an incomplete client frame (empty, unallocated, when idle).
    pub inbuf: Vec<u8>,
    partial: Option<Partial>,
    /// Payload bytes of the frame at the front of `inbuf` already unmasked
    /// (and, for plain text, checked) while it was still arriving.
    done: usize,
    /// The frame at the front has been seen before (its message started).
    seen: bool,
    /// UTF-8 state of the plain text message being received, if any.
    text: Option<Utf8Check>,
    /// Something arrived from the client since the flag was last cleared.
    pub heard: bool,
    max_message: usize,
    /// RSV1 may mark compressed messages.
    deflate: bool,
}

impl Reader {
    pub fn new(inbuf: Vec<u8>, max_message: usize, deflate: bool) -> Reader {
        Reader {
            inbuf,
            partial: None,
            done: 0,
            seen: false,
            text: None,
            heard: false,
            max_message,
            deflate,
        }
    }

    /// The next complete item in the buffer, or `None` until more bytes come.
    /// After `Input::Bad` the connection is over: call no more.
    pub fn next_input(&mut self) -> Option<Input> {
        loop {
            let f = match frame::parse_header(&self.inbuf, self.max_message, self.deflate) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    if self.inbuf.is_empty() && self.inbuf.capacity() > 0 {
                        self.inbuf = Vec::new();
                    }
                    return None;
                }
                Err(e) => return Some(Input::Bad(e)),
            };
            self.heard = true;
            let data = !f.is_control();
            if data && !self.seen {
                // A new data frame: does it fit the message in progress?
                match (&self.partial, f.opcode) {
                    (None, frame::OP_CONT) | (Some(_), frame::OP_TEXT | frame::OP_BINARY) => {
                        return Some(Input::Bad(FrameError::Continuation))
                    }
                    // `buf` never exceeds `max_message`: no overflow in the subtraction.
                    (Some(p), _) if f.len > self.max_message - p.buf.len() => {
                        return Some(Input::Bad(FrameError::TooBig))
                    }
                    (None, op) => {
                        self.text =
                            (op == frame::OP_TEXT && !f.compressed).then(Utf8Check::default);
                    }
                    (Some(_), _) => {}
                }
                self.seen = true;
            }
            // Unmask (and check) what has arrived of the payload.
            let avail = (self.inbuf.len() - f.start).min(f.len);
            if avail > self.done {
                let new = &mut self.inbuf[f.start + self.done..f.start + avail];
                frame::unmask_from(new, f.mask, self.done);
                if let (true, Some(check)) = (data, &mut self.text) {
                    if let Err(e) = check.feed(new) {
                        return Some(Input::Bad(e));
                    }
                }
                self.done = avail;
            }
            if avail < f.len {
                return None;
            }
            (self.done, self.seen) = (0, false);
            let end = f.end();
            let payload = &self.inbuf[f.start..end];
            if data && f.fin {
                if let Some(check) = self.text.take() {
                    if let Err(e) = check.finish() {
                        return Some(Input::Bad(e));
                    }
                }
            }
            let item = match f.opcode {
                frame::OP_PING => Some(Input::Ping(payload.to_vec())),
                frame::OP_PONG => None,
                frame::OP_CLOSE => Some(match frame::parse_close(payload) {
                    Ok(code) => Input::Close(code),
                    Err(e) => Input::Bad(e),
                }),
                frame::OP_CONT => match self.partial.take() {
                    // Checked when the frame was first seen: never `None` here.
                    None => Some(Input::Bad(FrameError::Continuation)),
                    Some(mut p) => {
                        p.buf.extend_from_slice(payload);
                        if f.fin {
                            Some(Input::Message(p.opcode, p.buf, p.compressed))
                        } else {
                            self.partial = Some(p);
                            None
                        }
                    }
                },
                op if f.fin => Some(Input::Message(op, payload.to_vec(), f.compressed)),
                op => {
                    self.partial = Some(Partial {
                        opcode: op,
                        compressed: f.compressed,
                        buf: payload.to_vec(),
                    });
                    None
                }
            };
            self.inbuf.drain(..end);
            if item.is_some() {
                return item;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [9, 8, 7, 6];
        let mut v = vec![first, 0x80 | payload.len() as u8];
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        v
    }

    /// Feeds `wire` in pieces of `step` bytes and collects what comes out.
    fn read_all(wire: &[u8], step: usize) -> Vec<Input> {
        let mut r = Reader::new(Vec::new(), 1000, false);
        let mut out = Vec::new();
        for piece in wire.chunks(step) {
            r.inbuf.extend_from_slice(piece);
            while let Some(i) = r.next_input() {
                let bad = matches!(i, Input::Bad(_));
                out.push(i);
                if bad {
                    return out;
                }
            }
        }
        out
    }

    #[test]
    fn fragments_pings_and_close_in_any_piece_sizes() {
        let mut wire = masked(0x01, "hé".as_bytes()); // text, not final
        wire.extend(masked(0x89, b"p")); // a ping in the middle
        wire.extend(masked(0x80, "llo".as_bytes())); // final continuation
        wire.extend(masked(0x82, &[1, 2, 3]));
        wire.extend(masked(0x88, &[0x03, 0xe8]));
        for step in [1, 2, 3, 5, 7, wire.len()] {
            assert_eq!(
                read_all(&wire, step),
                vec![
                    Input::Ping(b"p".to_vec()),
                    Input::Message(frame::OP_TEXT, "héllo".as_bytes().to_vec(), false),
                    Input::Message(frame::OP_BINARY, vec![1, 2, 3], false),
                    Input::Close(Some(1000)),
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn violations_end_the_stream() {
        for (wire, want) in [
            (masked(0x80, b"x"), FrameError::Continuation),
            (
                [masked(0x01, b"a"), masked(0x81, b"b")].concat(),
                FrameError::Continuation,
            ),
            (masked(0x81, b"\xff"), FrameError::Utf8),
            (masked(0x88, b"\x03"), FrameError::CloseLength),
            (masked(0x88, &1005u16.to_be_bytes()), FrameError::CloseCode),
        ] {
            assert_eq!(read_all(&wire, 1).pop(), Some(Input::Bad(want)), "{wire:?}");
        }
    }

    #[test]
    fn bad_utf8_fails_inside_a_frame_still_arriving() {
        // One text frame whose payload arrives in three parts (Autobahn 6.4.3).
        let wire = masked(
            0x81,
            b"\xce\xba\xe1\xbd\xb9\xf4\x90\x80\x80\x65\x64\x69\x74\x65\x64",
        );
        let mut r = Reader::new(Vec::new(), 1000, false);
        r.inbuf.extend_from_slice(&wire[..6 + 5]);
        assert_eq!(r.next_input(), None);
        r.inbuf.extend_from_slice(&wire[11..13]);
        assert_eq!(r.next_input(), Some(Input::Bad(FrameError::Utf8)));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut r = crate::test_rng(5);
        for _ in 0..20_000 {
            let n = (r() % 64) as usize;
            let wire: Vec<u8> = (0..n).map(|_| r() as u8).collect();
            let step = 1 + (r() % 8) as usize;
            let _ = read_all(&wire, step);
        }
    }
}
