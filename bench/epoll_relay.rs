//! The floor below the floor: a relay with no runtime at all. One thread
//! waits on epoll (edge-triggered, through mio, which is what tokio itself
//! sits on) and does for each connection what any WebSocket proxy must do,
//! in as few system calls as Linux allows:
//!
//! - accept (`TCP_NODELAY` inherited from the listener), wait until the
//!   request is readable, read it (one read when the head fits);
//! - connect to the upstream and write the head at once (on loopback the
//!   TCP handshake is complete when `connect` returns);
//! - copy both ways: a read shorter than the buffer means the socket is
//!   drained (the next arrival is a new edge), so no read ends in `EAGAIN`
//!   in the steady state; a write that does not complete waits for
//!   writability, and reading that side stops meanwhile;
//! - an end of stream is passed on as a FIN, and both sockets are closed
//!   once both directions ended; closing removes them from epoll (no
//!   `EPOLL_CTL_DEL`).
//!
//! No parsing beyond finding the head's end, no routing, no log, no limits,
//! no timers, no allocation per message. What it costs per handshake and per
//! message is the kernel's share plus next to nothing: no proxy, whatever
//! its language or design, can do the same work on this machine for less.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

const LISTENER: Token = Token(usize::MAX);
/// The one read buffer, shared by every connection.
const BUF: usize = 16 << 10;
/// A head larger than this is refused (the connection is closed).
const MAX_HEAD: usize = 16 << 10;
/// Reading a side stops while the other has this much not yet written.
const MAX_PENDING: usize = 256 << 10;

/// One direction's state: bytes read but not yet written to the other
/// side, and whether its reader saw the end.
#[derive(Default)]
struct Flow {
    pending: Vec<u8>,
    ended: bool,
}

enum Conn {
    /// Waiting for the whole request head.
    Head { client: TcpStream, head: Vec<u8> },
    /// Copying: `up` is client → upstream, `down` upstream → client.
    Relay {
        client: TcpStream,
        upstream: TcpStream,
        up: Flow,
        down: Flow,
    },
}

/// Runs the relay on this thread until an error of epoll itself.
/// A nonzero `ka` turns on TCP keepalive on each upstream socket as upgate
/// does (`server.tcp_keepalive`).
pub fn run(
    listener: std::net::TcpListener,
    upstream: SocketAddr,
    ka: std::time::Duration,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let mut listener = TcpListener::from_std(listener);
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut events = Events::with_capacity(1024);
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut buf = vec![0u8; BUF];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                accept_all(&listener, &poll, &mut conns, &mut free);
                continue;
            }
            let (slot, from_client) = (ev.token().0 / 2, ev.token().0 % 2 == 0);
            let Some(conn) = conns.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            let next = match conn {
                Conn::Head { client, head } => {
                    read_head(client, head, slot, (upstream, ka), &poll, &mut buf)
                }
                Conn::Relay {
                    mut client,
                    mut upstream,
                    mut up,
                    mut down,
                } => {
                    // The side the event is for, the other, and what each reads.
                    let (this, that, out, back) = if from_client {
                        (&mut client, &mut upstream, &mut up, &mut down)
                    } else {
                        (&mut upstream, &mut client, &mut down, &mut up)
                    };
                    let alive = step(
                        this,
                        that,
                        out,
                        back,
                        ev.is_readable() || ev.is_read_closed(),
                        ev.is_read_closed() || ev.is_error(),
                        ev.is_writable(),
                        &mut buf,
                    );
                    alive.then_some(Conn::Relay {
                        client,
                        upstream,
                        up,
                        down,
                    })
                }
            };
            match next {
                Some(c) => conns[slot] = Some(c),
                None => free.push(slot),
            }
        }
    }
}

fn accept_all(
    listener: &TcpListener,
    poll: &Poll,
    conns: &mut Vec<Option<Conn>>,
    free: &mut Vec<usize>,
) {
    loop {
        let mut client = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            // A connection reset while in the queue: the next one.
            Err(e) if e.kind() == ErrorKind::ConnectionAborted => continue,
            // Out of descriptors: the rest wait in the queue until the next
            // arrival raises a new edge (the benchmark raises the limit).
            Err(_) => return,
        };
        let slot = free.pop().unwrap_or_else(|| {
            conns.push(None);
            conns.len() - 1
        });
        // Registered after the request may have arrived: edge-triggered
        // epoll reports what is ready at registration too.
        if poll
            .registry()
            .register(&mut client, Token(slot * 2), Interest::READABLE)
            .is_err()
        {
            free.push(slot);
            continue;
        }
        conns[slot] = Some(Conn::Head {
            client,
            head: Vec::new(),
        });
    }
}

/// Reads what the client sent; once the head is whole, connects upstream
/// and sends it (with anything read after it).
fn read_head(
    mut client: TcpStream,
    mut head: Vec<u8>,
    slot: usize,
    (to, ka): (SocketAddr, std::time::Duration),
    poll: &Poll,
    buf: &mut [u8],
) -> Option<Conn> {
    loop {
        let n = match client.read(buf) {
            Ok(0) => return None,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                return Some(Conn::Head { client, head })
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return None,
        };
        // The end of the head may straddle two reads.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        if head[from..].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if head.len() > MAX_HEAD {
            return None;
        }
    }
    let mut upstream = TcpStream::connect(to).ok()?;
    upstream.set_nodelay(true).ok()?;
    upgate::backend::upstream::keepalive((&upstream).into(), ka);
    let mut up = Flow {
        pending: head,
        ended: false,
    };
    // Usually writes all of it now; if not, on writability.
    flush(&mut upstream, &mut up.pending).ok()?;
    poll.registry()
        .register(
            &mut upstream,
            Token(slot * 2 + 1),
            Interest::READABLE | Interest::WRITABLE,
        )
        .ok()?;
    // The client's socket now waits for writability as well.
    poll.registry()
        .reregister(
            &mut client,
            Token(slot * 2),
            Interest::READABLE | Interest::WRITABLE,
        )
        .ok()?;
    Some(Conn::Relay {
        client,
        upstream,
        up,
        down: Flow::default(),
    })
}

/// One event on `this` side. `out` is what `this` reads (to `that`),
/// `back` what `this` is written (read from `that`). `closed`: the event
/// says the peer's FIN arrived. False: close both.
#[allow(clippy::too_many_arguments)]
fn step(
    this: &mut TcpStream,
    that: &mut TcpStream,
    out: &mut Flow,
    back: &mut Flow,
    readable: bool,
    closed: bool,
    writable: bool,
    buf: &mut [u8],
) -> bool {
    // `this` writable again: what waited for it goes, then reading `that`
    // resumes where it stopped (its edge is long gone: read it until
    // `EAGAIN`, in case its FIN is in there).
    if writable && !back.pending.is_empty() {
        if flush(this, &mut back.pending).is_err() {
            return false;
        }
        if back.pending.is_empty() {
            if back.ended {
                let _ = this.shutdown(Shutdown::Write);
            } else if !pump(that, this, back, true, buf) {
                return false;
            }
        }
    }
    if readable
        && !out.ended
        && out.pending.len() < MAX_PENDING
        && !pump(this, that, out, closed, buf)
    {
        return false;
    }
    // Both directions ended and everything written: done.
    !(out.ended && back.ended && out.pending.is_empty() && back.pending.is_empty())
}

/// Copies from `from` to `to` until `from` is drained, `to` pushes back,
/// or `from` ends (then `to` gets a FIN once everything is written).
/// `to_eagain`: a short read is not taken to mean drained (a FIN already
/// signalled would raise no new edge).
fn pump(
    from: &mut TcpStream,
    to: &mut TcpStream,
    flow: &mut Flow,
    to_eagain: bool,
    buf: &mut [u8],
) -> bool {
    loop {
        let n = match from.read(buf) {
            Ok(0) => {
                flow.ended = true;
                if flow.pending.is_empty() {
                    let _ = to.shutdown(Shutdown::Write);
                }
                return true;
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        };
        let written = if flow.pending.is_empty() {
            match write_now(to, &buf[..n]) {
                Ok(w) => w,
                Err(_) => return false,
            }
        } else {
            0
        };
        flow.pending.extend_from_slice(&buf[written..n]);
        if flow.pending.len() >= MAX_PENDING {
            return true;
        }
        // Short read: drained; the next bytes to arrive are a new edge.
        if n < buf.len() && !to_eagain {
            return true;
        }
    }
}

/// Writes as much of `pending` as `to` takes; keeps the rest.
fn flush(to: &mut TcpStream, pending: &mut Vec<u8>) -> io::Result<()> {
    let written = write_now(to, pending)?;
    pending.drain(..written);
    if pending.is_empty() {
        // Release the head's or a burst's buffer: an idle pair holds none.
        *pending = Vec::new();
    }
    Ok(())
}

/// Writes as much of `bytes` as `to` takes now; how much that was.
fn write_now(to: &mut TcpStream, bytes: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < bytes.len() {
        match to.write(&bytes[written..]) {
            Ok(w) => written += w,
            // Full, or not yet connected (the SYN was dropped): the rest
            // waits for writability.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::NotConnected) => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Head, messages both ways (one larger than the buffer), a half
    /// close passed on, and the pair closed afterwards.
    #[test]
    fn relays_both_ways_and_passes_the_end_on() {
        let echo = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let echo_addr = echo.local_addr().expect("addr");
        let upstream = std::thread::spawn(move || {
            let (mut s, _) = echo.accept().expect("accept");
            let mut all = Vec::new();
            let mut b = [0u8; 4096];
            loop {
                let n = s.read(&mut b).expect("read");
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&b[..n]);
                s.write_all(&b[..n]).expect("echo");
            }
            all
        });
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let relay_addr = l.local_addr().expect("addr");
        std::thread::spawn(move || run(l, echo_addr, std::time::Duration::from_secs(60)));

        let mut c = std::net::TcpStream::connect(relay_addr).expect("connect");
        let head = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n";
        c.write_all(&head[..10]).expect("write");
        std::thread::sleep(std::time::Duration::from_millis(20));
        c.write_all(&head[10..]).expect("write");
        let mut back = vec![0u8; head.len()];
        c.read_exact(&mut back).expect("head echoed");
        assert_eq!(&back, head);
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let reader = {
            let mut c = c.try_clone().expect("clone");
            let len = big.len();
            std::thread::spawn(move || {
                let mut got = vec![0u8; len];
                c.read_exact(&mut got).expect("big echoed");
                let mut rest = Vec::new();
                c.read_to_end(&mut rest).expect("end passed on");
                (got, rest)
            })
        };
        c.write_all(&big).expect("write big");
        c.shutdown(Shutdown::Write).expect("shutdown");
        let (got, rest) = reader.join().expect("reader");
        assert!(got == big, "payload corrupted");
        assert!(rest.is_empty());
        let mut expected = head.to_vec();
        expected.extend_from_slice(&big);
        assert!(upstream.join().expect("upstream") == expected);
    }
}
