//! Direct delivery: a client on a plain TCP socket that has caught up with
//! its channel is written by the channel's own task, one `writev` per
//! client per batch of messages, instead of waking the client's task for
//! every message (the wake-up, the ring's locks and the task's poll cost
//! about as much user time as the write's own kernel time is cheap).
//!
//! A client enters when its queue is empty and its ring position is at the
//! tail; it leaves when the kernel does not take a whole batch (the rest and
//! a ring position right after the batch are handed to its task, which
//! writes them when the socket drains and applies the slow-client policy as
//! before), or when it has something of its own to write (a pong, a ping, a
//! Close). One lock orders publishing, entering and leaving, so a client
//! gets every message once, in order, whichever way it is delivered.
//!
//! Only on a one-thread runtime (`--threads 1`): with several workers the
//! clients' own tasks spread a channel's writes over the cores, and that
//! measured better at 500,000 deliveries/s than the channel's task (or
//! writer tasks per shard of clients) writing. TLS and HTTP/2 clients (their
//! bytes are per connection) and clients that negotiated permessage-deflate
//! stay on the ring.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, Notify};

use super::lock;
use crate::session::splice::ReadReady;

/// Frames written to a direct client per `writev` at most: a longer batch
/// is written in pieces.
pub(super) const BATCH: usize = 64;

/// The direct clients of one channel and the messages not yet written to them.
#[derive(Default)]
pub(super) struct Direct {
    set: Mutex<Set>,
}

#[derive(Default)]
struct Set {
    /// Messages published so far: the sequence number of the next one.
    seq: u64,
    /// Published and not yet written to the direct clients; the first is
    /// message `seq - batch.len()`.
    batch: Vec<Bytes>,
    members: Vec<Entry>,
}

struct Entry {
    sock: Arc<TcpStream>,
    /// The first message this client has not had.
    from: u64,
    /// Messages written to it whole since it entered.
    delivered: u64,
    slot: Arc<Slot>,
}

/// A direct client's side of the set: where it is in the set's list, and
/// where its task finds what was handed back to it.
#[derive(Default)]
pub(super) struct Slot {
    /// Its index in `Set::members` while it is a member (changed under the set's lock).
    index: AtomicUsize,
    handoff: Mutex<Option<Handoff>>,
    /// Signalled when a handoff is waiting.
    notify: Notify,
}

/// What a client leaving direct delivery takes back to its own task.
pub(super) struct Handoff {
    /// To write first, in order: the part of a frame the kernel did not
    /// take, then whole frames.
    pub out: Vec<Bytes>,
    /// A ring position right after the last message in `out` (or written).
    pub rx: broadcast::Receiver<Bytes>,
    /// Messages written whole while it was direct.
    pub delivered: u64,
}

impl Direct {
    /// Sends `frame` on the ring and records it for the direct clients,
    /// both under the set's lock: a client entering or leaving sees each
    /// message on exactly one side.
    pub fn publish(&self, tx: &broadcast::Sender<Bytes>, frame: Bytes) {
        let mut set = lock(&self.set);
        set.seq += 1;
        if !set.members.is_empty() {
            set.batch.push(frame.clone());
        }
        let _ = tx.send(frame);
    }

    /// Enters `sock` into direct delivery if the set is free right now and
    /// `rx` has taken every message published; else `None` (the caller stays
    /// on the ring and may try again later). `slot` is the client's own, kept
    /// from one entry to the next.
    pub fn try_enter(
        &self,
        sock: &Arc<TcpStream>,
        rx: &broadcast::Receiver<Bytes>,
        slot: &Arc<Slot>,
    ) -> Option<Member<'_>> {
        // A flush in progress holds the lock for one write per client: do not wait.
        let mut set = self.set.try_lock().ok()?;
        // Under the set's lock nothing is published: an empty ring position
        // stays empty, and `seq` is the first message the client has not had.
        if !rx.is_empty() {
            return None;
        }
        slot.index.store(set.members.len(), Ordering::Relaxed);
        let from = set.seq;
        set.members.push(Entry {
            sock: sock.clone(),
            from,
            delivered: 0,
            slot: slot.clone(),
        });
        Some(Member {
            direct: self,
            slot: Some(slot.clone()),
        })
    }

    /// Writes what was published since the last flush to every direct client;
    /// returns how many messages were written whole (for the route's counters).
    /// A client whose socket does not take all of it is handed back to its
    /// task with the rest and `tx.subscribe()`: under the lock, the ring
    /// position right after the batch.
    pub fn flush(&self, tx: &broadcast::Sender<Bytes>) -> u64 {
        let mut guard = lock(&self.set);
        let set = &mut *guard;
        if set.batch.is_empty() {
            return 0;
        }
        let mut written = 0u64;
        let mut i = 0;
        while i < set.members.len() {
            let e = &mut set.members[i];
            let frames = unwritten(&set.batch, set.seq, e.from);
            match write_all(&e.sock, frames) {
                Ok(()) => {
                    e.delivered += frames.len() as u64;
                    written += frames.len() as u64;
                    e.from = set.seq;
                    i += 1;
                }
                Err((whole, rest)) => {
                    e.delivered += whole;
                    written += whole;
                    let e = remove(&mut set.members, i);
                    let handoff = Handoff {
                        out: rest,
                        rx: tx.subscribe(),
                        delivered: e.delivered,
                    };
                    *lock(&e.slot.handoff) = Some(handoff);
                    e.slot.notify.notify_one();
                    // The entry moved into `i` (if any) is next.
                }
            }
        }
        set.batch.clear();
        written
    }
}

/// The messages of `batch` (which ends before message `seq`) from message
/// `from` on: a client that entered during the batch had the ones before it
/// on the ring.
fn unwritten(batch: &[Bytes], seq: u64, from: u64) -> &[Bytes] {
    let first = seq.saturating_sub(batch.len() as u64);
    let skip = usize::try_from(from.saturating_sub(first)).unwrap_or(usize::MAX);
    batch.get(skip..).unwrap_or_default()
}

/// Where `slot`'s client is in the set's list, if it is a member.
fn member_index(set: &Set, slot: &Arc<Slot>) -> Option<usize> {
    let i = slot.index.load(Ordering::Relaxed);
    let e = set.members.get(i)?;
    Arc::ptr_eq(&e.slot, slot).then_some(i)
}

/// Removes member `i`, keeping the moved member's index right.
fn remove(members: &mut Vec<Entry>, i: usize) -> Entry {
    let e = members.swap_remove(i);
    if let Some(moved) = members.get(i) {
        moved.slot.index.store(i, Ordering::Relaxed);
    }
    e
}

/// Writes `frames` with as few `writev`s as it takes, without waiting:
/// `Err((whole frames written, the rest))` when the socket would block or failed
/// (the client's task meets the failure on its own next write).
fn write_all(sock: &TcpStream, frames: &[Bytes]) -> Result<(), (u64, Vec<Bytes>)> {
    let mut done = 0usize; // whole frames written
    let mut part = 0usize; // bytes of frame `done` written
    while done < frames.len() {
        let mut slices = [IoSlice::new(&[]); BATCH];
        let mut n = 0;
        for (s, f) in slices.iter_mut().zip(&frames[done..]) {
            *s = IoSlice::new(if n == 0 { &f[part..] } else { f });
            n += 1;
        }
        let mut k = match sock.try_write_vectored(&slices[..n]) {
            Ok(k) if k > 0 => k,
            _ => break,
        };
        while k > 0 && done < frames.len() {
            let left = frames[done].len() - part;
            if k >= left {
                k -= left;
                done += 1;
                part = 0;
            } else {
                part += k;
                k = 0;
            }
        }
    }
    if done == frames.len() {
        return Ok(());
    }
    let mut rest = Vec::with_capacity(frames.len() - done);
    rest.push(frames[done].slice(part..));
    rest.extend_from_slice(&frames[done + 1..]);
    Err((done as u64, rest))
}

/// A client's membership: left (or handed back) exactly once, also when its
/// task ends or is dropped while direct.
pub(super) struct Member<'a> {
    direct: &'a Direct,
    slot: Option<Arc<Slot>>,
}

impl Member<'_> {
    /// Resolves once the channel's task handed the client back.
    pub async fn handed_back(&self) {
        if let Some(slot) = &self.slot {
            slot.notify.notified().await;
        }
    }

    /// Leaves direct delivery: what was handed back, or (still a member)
    /// the messages published and not yet written to it with a ring
    /// position right after them.
    pub fn leave(mut self, tx: &broadcast::Sender<Bytes>) -> Option<Handoff> {
        let slot = self.slot.take()?;
        let mut set = lock(&self.direct.set);
        if let Some(i) = member_index(&set, &slot) {
            let e = remove(&mut set.members, i);
            return Some(Handoff {
                out: unwritten(&set.batch, set.seq, e.from).to_vec(),
                rx: tx.subscribe(),
                delivered: e.delivered,
            });
        }
        drop(set);
        // Not a member: the channel's task handed it back before removing it.
        let handed = lock(&slot.handoff).take();
        handed
    }
}

impl Drop for Member<'_> {
    fn drop(&mut self) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        // The socket must not outlive the client's task in the set.
        let mut set = lock(&self.direct.set);
        if let Some(i) = member_index(&set, &slot) {
            remove(&mut set.members, i);
        }
    }
}

/// A fan-out client's plain TCP socket, shared with the channel's task
/// while the client is direct: the client's task reads it (and writes when
/// not direct) through this, the channel's task writes through its own `Arc`.
pub(super) struct SharedTcp(pub Arc<TcpStream>);

impl AsyncRead for SharedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match self.0.try_read(unfilled) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Readiness was cleared: wait for the next.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(b)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}

impl ReadReady for SharedTcp {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_read_ready(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair on loopback: (the server's side, the client's side).
    async fn pair() -> (Arc<TcpStream>, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (Arc::new(s.expect("accept").0), c.expect("connect"))
    }

    async fn read_exact(c: &mut TcpStream, n: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut v = vec![0; n];
        c.read_exact(&mut v).await.expect("read");
        v
    }

    fn publish(d: &Direct, tx: &broadcast::Sender<Bytes>, b: &'static [u8]) {
        d.publish(tx, Bytes::from_static(b));
    }

    /// A caught-up client gets each message once, in order, whether the
    /// ring or the channel's task delivered it; leaving mid-batch hands
    /// over exactly what it has not had.
    #[tokio::test]
    async fn every_message_once_across_enter_and_leave() {
        let (tx, _) = broadcast::channel::<Bytes>(16);
        let d = Direct::default();
        let (s, mut c) = pair().await;
        let slot = Arc::new(Slot::default());
        let mut rx = tx.subscribe();
        publish(&d, &tx, b"a");
        // Behind on the ring: not entered.
        assert!(d.try_enter(&s, &rx, &slot).is_none());
        assert_eq!(rx.try_recv().ok().as_deref(), Some(&b"a"[..]));
        let m = d.try_enter(&s, &rx, &slot).expect("caught up: entered");
        publish(&d, &tx, b"b");
        publish(&d, &tx, b"c");
        assert_eq!(d.flush(&tx), 2);
        assert_eq!(read_exact(&mut c, 2).await, b"bc");
        publish(&d, &tx, b"d");
        // Leaving before the flush takes `d` along; the ring goes on after it.
        let mut h = m.leave(&tx).expect("a handoff");
        assert_eq!(h.out, vec![Bytes::from_static(b"d")]);
        assert_eq!(h.delivered, 2);
        assert_eq!(d.flush(&tx), 0, "not written twice");
        publish(&d, &tx, b"e");
        assert_eq!(h.rx.try_recv().ok().as_deref(), Some(&b"e"[..]));
        assert!(h.rx.is_empty());
    }

    /// A socket that does not take the whole batch is handed back with
    /// the rest, starting inside the frame the kernel cut.
    #[tokio::test]
    async fn a_full_socket_is_handed_back_with_the_rest() {
        let (tx, _) = broadcast::channel::<Bytes>(1024);
        let d = Direct::default();
        let (s, mut c) = pair().await;
        let slot = Arc::new(Slot::default());
        let rx = tx.subscribe();
        let m = d.try_enter(&s, &rx, &slot).expect("entered");
        // Far more than loopback buffers take while nobody reads.
        let big = Bytes::from(vec![7u8; 1 << 20]);
        let mut sent = 0usize;
        for _ in 0..64 {
            d.publish(&tx, big.clone());
            sent += big.len();
        }
        let whole = d.flush(&tx);
        assert!(whole < 64, "the kernel took everything: {whole}");
        m.handed_back().await;
        let h = m.leave(&tx).expect("handed back");
        assert_eq!(h.delivered, whole);
        let rest: usize = h.out.iter().map(Bytes::len).sum();
        assert!(rest > 0);
        // What was written plus the rest is exactly what was published.
        let written = sent - rest;
        assert_eq!(read_exact(&mut c, written).await.len(), written);
        assert_eq!(d.flush(&tx), 0);
    }

    /// A client whose task ends while direct leaves the set (its socket is
    /// not written to, or kept open, afterwards).
    #[tokio::test]
    async fn a_dropped_member_leaves() {
        let (tx, _) = broadcast::channel::<Bytes>(16);
        let d = Direct::default();
        let (s1, _c1) = pair().await;
        let (s2, mut c2) = pair().await;
        let rx = tx.subscribe();
        let (slot1, slot2) = (Arc::new(Slot::default()), Arc::new(Slot::default()));
        let m1 = d.try_enter(&s1, &rx, &slot1).expect("entered");
        let m2 = d.try_enter(&s2, &rx, &slot2).expect("entered");
        drop(m1);
        assert_eq!(Arc::strong_count(&s1), 1, "the set let go of the socket");
        publish(&d, &tx, b"x");
        assert_eq!(d.flush(&tx), 1);
        assert_eq!(read_exact(&mut c2, 1).await, b"x");
        drop(m2);
        assert_eq!(Arc::strong_count(&s2), 1);
    }
}
