//! Just enough RFC 6455 for the benchmark: a fixed handshake, frame encoding
//! and incremental frame parsing. Hand-rolled so that the load generator and
//! the backend cost as little CPU as possible: they share one core, and the
//! cheaper they are, the more of the proxy's own cost the ratios show.

#![allow(dead_code)]

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The client key is fixed; its accept value is computed once.
pub const CLIENT_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Appends one frame. `masked` frames use the all-zero mask: valid per the
/// RFC and free to apply, the same for every proxy measured.
pub fn put_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], masked: bool) {
    out.push(0x80 | opcode);
    let m = if masked { 0x80 } else { 0 };
    let n = payload.len();
    if n < 126 {
        out.push(m | n as u8);
    } else if n <= u16::MAX as usize {
        out.push(m | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    if masked {
        out.extend_from_slice(&[0, 0, 0, 0]);
    }
    out.extend_from_slice(payload);
}

/// A parsed frame header: where the payload sits in the buffer.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    pub opcode: u8,
    pub start: usize,
    pub len: usize,
    pub mask: Option<[u8; 4]>,
}

impl Frame {
    pub fn end(&self) -> usize {
        self.start + self.len
    }
}

/// Parses the frame at the start of `buf`, if it is complete.
pub fn parse(buf: &[u8]) -> Option<Frame> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let mut i = 2;
    let len = match buf[1] & 0x7f {
        126 => {
            let b = buf.get(2..4)?;
            i = 4;
            u16::from_be_bytes([b[0], b[1]]) as usize
        }
        127 => {
            let b = buf.get(2..10)?;
            i = 10;
            u64::from_be_bytes(b.try_into().ok()?) as usize
        }
        n => n as usize,
    };
    let mask = if masked {
        let m = buf.get(i..i + 4)?;
        i += 4;
        Some([m[0], m[1], m[2], m[3]])
    } else {
        None
    };
    if buf.len() < i + len {
        return None;
    }
    Some(Frame {
        opcode,
        start: i,
        len,
        mask,
    })
}

/// The client's upgrade request.
pub fn request(host: &str, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {CLIENT_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Reads an HTTP head (up to the blank line) into `buf`; returns its length.
pub async fn read_head<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(i + 4);
        }
        if buf.len() > 64 * 1024 {
            return Err(std::io::Error::other("HTTP head too large"));
        }
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// Client side: sends the upgrade and checks for 101. Leftover bytes stay in `buf`.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    host: &str,
    path: &str,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    s.write_all(request(host, path).as_bytes()).await?;
    let n = read_head(s, buf).await?;
    if !buf.starts_with(b"HTTP/1.1 101") {
        let head = String::from_utf8_lossy(&buf[..n.min(200)]).into_owned();
        return Err(std::io::Error::other(format!("upgrade refused: {head}")));
    }
    buf.drain(..n);
    Ok(())
}
