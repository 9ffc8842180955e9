//! `upgate-bench-backend`: fast WebSocket backends for the benchmark.
//!
//! One thread, hand-rolled framing. On every `--listen` address it echoes
//! data frames back unmasked and answers pings and closes (several loopback
//! addresses let the 100k-connection scenario stay under the port range).
//! On every `--feed` address it is a feed: one clock publishes `--feed-rate`
//! binary messages per second of `--feed-size` bytes to every connection
//! (as a broadcast server would), whose first 8 bytes are the publish time
//! (nanoseconds since the Unix epoch, little endian), so a client can
//! measure delivery latency, directly or through a fan-out.
//!
//! With `--floor`, feed connections are served the least costly way there
//! is: after the handshake each socket goes to one plain thread that, once
//! per tick, writes everything due to every connection with one write(2)
//! each (no runtime, no task per connection, messages stamped with the time
//! they were due). It is the benchmark's floor: what the kernel allows for
//! this many loopback sockets on this machine, whatever the server.

mod epoll_relay;
mod proto;

/// The allocator upgate uses: the floor targets' memory is then what the
/// least work costs, not another allocator's fragmentation.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn accept_key(key: &[u8]) -> String {
    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key)
}

/// What a feed connection receives.
#[derive(Clone, Copy)]
struct Feed {
    rate: u32,
    size: usize,
}

/// The published frames every feed connection receives.
type Frames = tokio::sync::broadcast::Sender<std::sync::Arc<Vec<u8>>>;

/// How feed connections are served after the handshake.
#[derive(Clone)]
enum FeedMode {
    /// A task per connection reading a broadcast channel.
    Tasks(Frames),
    /// Handed to the floor thread.
    Floor(std::sync::mpsc::Sender<std::net::TcpStream>),
}

/// One floor connection: its socket and what it has not yet taken.
struct FloorConn {
    s: std::net::TcpStream,
    pending: Vec<u8>,
}

/// The floor writer: every tick, one write per connection carrying every
/// message due since its last write. A connection more than 1 MiB behind,
/// or failing, is dropped.
fn floor(f: Feed, rx: std::sync::mpsc::Receiver<std::net::TcpStream>) {
    use std::io::Write;
    let period_ns = (1e9 / f64::from(f.rate.max(1))) as u64;
    let wall0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let t0 = std::time::Instant::now();
    let mut conns: Vec<FloorConn> = Vec::new();
    let mut sent = 0u64;
    let mut payload = vec![b'f'; f.size.max(8)];
    let mut batch = Vec::new();
    loop {
        while let Ok(s) = rx.try_recv() {
            conns.push(FloorConn {
                s,
                pending: Vec::new(),
            });
        }
        let due = t0.elapsed().as_nanos() as u64 / period_ns + 1;
        if due == sent {
            let next = std::time::Duration::from_nanos(due * period_ns);
            std::thread::sleep(next.saturating_sub(t0.elapsed()));
            continue;
        }
        batch.clear();
        for k in sent..due {
            payload[..8].copy_from_slice(&(wall0 + k * period_ns).to_le_bytes());
            proto::put_frame(&mut batch, proto::OP_BINARY, &payload, false);
        }
        sent = due;
        conns.retain_mut(|c| {
            let out: &[u8] = if c.pending.is_empty() {
                &batch
            } else {
                c.pending.extend_from_slice(&batch);
                &c.pending
            };
            let n = match (&c.s).write(out) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(_) => return false,
            };
            if c.pending.is_empty() {
                c.pending.extend_from_slice(&batch[n..]);
            } else {
                c.pending.drain(..n);
            }
            c.pending.len() < 1 << 20
        });
    }
}

/// The feed's clock: one frame per period, stamped when published.
async fn publish(f: Feed, tx: Frames) {
    let period = std::time::Duration::from_secs_f64(1.0 / f64::from(f.rate.max(1)));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut payload = vec![b'f'; f.size.max(8)];
    loop {
        tick.tick().await;
        let ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        payload[..8].copy_from_slice(&ns.to_le_bytes());
        let mut out = Vec::with_capacity(payload.len() + 10);
        proto::put_frame(&mut out, proto::OP_BINARY, &payload, false);
        let _ = tx.send(std::sync::Arc::new(out));
    }
}

async fn serve(mut s: TcpStream, feed: Option<FeedMode>) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let n = proto::read_head(&mut s, &mut buf).await?;
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    let key = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_string())
        })
        .ok_or_else(|| std::io::Error::other("no key"))?;
    if !head.to_ascii_lowercase().contains("upgrade: websocket") {
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
            .await?;
        return Ok(());
    }
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key.as_bytes())
    );
    s.write_all(resp.as_bytes()).await?;
    buf.drain(..n);
    match feed {
        Some(FeedMode::Tasks(f)) => return feed_loop(s, f.subscribe()).await,
        Some(FeedMode::Floor(tx)) => {
            let s = s.into_std()?;
            return tx
                .send(s)
                .map_err(|_| std::io::Error::other("floor thread gone"));
        }
        None => {}
    }
    // Echo loop: read whatever is there, answer every complete frame in one write.
    let mut out = Vec::with_capacity(4096);
    let mut tmp = vec![0u8; 64 * 1024];
    loop {
        let mut at = 0;
        while let Some(f) = proto::parse(&buf[at..]) {
            let (start, end) = (at + f.start, at + f.end());
            if let Some(m) = f.mask {
                if m != [0; 4] {
                    for (i, b) in buf[start..end].iter_mut().enumerate() {
                        *b ^= m[i & 3];
                    }
                }
            }
            match f.opcode {
                proto::OP_TEXT | proto::OP_BINARY | 0 => {
                    proto::put_frame(&mut out, f.opcode, &buf[start..end], false)
                }
                proto::OP_PING => {
                    proto::put_frame(&mut out, proto::OP_PONG, &buf[start..end], false)
                }
                proto::OP_CLOSE => {
                    proto::put_frame(&mut out, proto::OP_CLOSE, &buf[start..end], false);
                    s.write_all(&out).await?;
                    return Ok(()); // the server closes the TCP connection first
                }
                _ => {}
            }
            at = end;
        }
        buf.drain(..at);
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
        if buf.capacity() > 256 * 1024 && buf.len() < 4096 {
            buf.shrink_to(4096);
        }
    }
}

/// Sends every published message; answers pings, ends on close. A
/// connection that falls behind the publisher skips what it missed.
async fn feed_loop(
    mut s: TcpStream,
    mut rx: tokio::sync::broadcast::Receiver<std::sync::Arc<Vec<u8>>>,
) -> std::io::Result<()> {
    let (mut out, mut inbuf, mut tmp) = (Vec::new(), Vec::new(), [0u8; 4096]);
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Ok(frame) => s.write_all(&frame).await?,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return Ok(()),
            },
            n = s.read(&mut tmp) => {
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                inbuf.extend_from_slice(&tmp[..n]);
                while let Some(fr) = proto::parse(&inbuf) {
                    let body: Vec<u8> = match fr.mask {
                        Some(m) => inbuf[fr.start..fr.end()].iter().enumerate().map(|(i, b)| b ^ m[i & 3]).collect(),
                        None => inbuf[fr.start..fr.end()].to_vec(),
                    };
                    out.clear();
                    match fr.opcode {
                        proto::OP_PING => proto::put_frame(&mut out, proto::OP_PONG, &body, false),
                        proto::OP_CLOSE => {
                            proto::put_frame(&mut out, proto::OP_CLOSE, &body, false);
                            s.write_all(&out).await?;
                            return Ok(());
                        }
                        _ => {}
                    }
                    s.write_all(&out).await?;
                    inbuf.drain(..fr.end());
                }
            }
        }
    }
}

/// The floor for a WebSocket proxy's work: accept (the listener's
/// `TCP_NODELAY` is inherited), read the request head, connect to `up`, write
/// the head, then copy bytes both ways until either side ends. No parsing
/// beyond the head's end, no routing, no logging, no limits: what every
/// proxy must do at least, so its CPU per handshake and per message is
/// the kernel's share plus the least user-space work.
async fn relay(l: TcpListener, up: SocketAddr, ka: Duration) {
    loop {
        let Ok((mut c, _)) = l.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut b = pass_head(&mut c, up, ka).await?;
            tokio::io::copy_bidirectional(&mut c, &mut b).await.ok()
        });
    }
}

/// Reads a request head from `c` (up to 16 KiB), connects to `up` and
/// writes the head there: the relays' one step before copying. A nonzero
/// `ka` turns on TCP keepalive on the upstream socket as upgate does
/// (`server.tcp_keepalive`, the same calls).
async fn pass_head<S: tokio::io::AsyncRead + Unpin>(
    c: &mut S,
    up: SocketAddr,
    ka: Duration,
) -> Option<TcpStream> {
    let mut head = Vec::with_capacity(1024);
    loop {
        if head.len() > 16 << 10 || c.read_buf(&mut head).await.ok()? == 0 {
            return None;
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let mut b = TcpStream::connect(up).await.ok()?;
    b.set_nodelay(true).ok()?;
    b.write_all(&head).await.ok()?;
    upgate::backend::upstream::keepalive((&b).into(), ka);
    Some(b)
}

/// The floor for a TLS-terminating proxy's memory and CPU: the relay above
/// behind upgate's own rustls config (same provider, certificate, ALPN and
/// resumption), and a copy that holds no buffer while both sides are quiet
/// (it waits for either socket to be readable, then reads into a buffer
/// made for that read). What an idle connection costs here is rustls's
/// state, two sockets and one task: the least a rustls-based proxy keeps.
async fn tls_relay(l: TcpListener, up: SocketAddr, ka: Duration, tls: tokio_rustls::TlsAcceptor) {
    loop {
        let Ok((c, _)) = l.accept().await else {
            continue;
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            let mut c = tls.accept(c).await.ok()?;
            let mut b = pass_head(&mut c, up, ka).await?;
            lean_copy(&mut c, &mut b).await
        });
    }
}

/// Copies both ways until either side ends, holding a buffer only while
/// moving data. tokio-rustls returns `Pending` only once the socket would
/// block and rustls holds no plaintext, so waiting on the raw socket's
/// readiness after that misses nothing.
async fn lean_copy(
    c: &mut tokio_rustls::server::TlsStream<TcpStream>,
    b: &mut TcpStream,
) -> Option<()> {
    use futures_util::FutureExt as _;
    loop {
        // Drain what is there now, each way, through one buffer made for
        // this wake-up (capacity only: reads fill it, nothing zeroes it).
        let mut buf = Vec::with_capacity(16 << 10);
        loop {
            buf.clear();
            match c.read_buf(&mut buf).now_or_never() {
                None => break,
                Some(Ok(0)) | Some(Err(_)) => return None,
                Some(Ok(_)) => b.write_all(&buf).await.ok()?,
            }
        }
        loop {
            buf.clear();
            match b.try_read_buf(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Ok(0) | Err(_) => return None,
                Ok(_) => {
                    c.write_all(&buf).await.ok()?;
                    c.flush().await.ok()?;
                }
            }
        }
        drop(buf);
        tokio::select! {
            r = c.get_ref().0.readable() => r.ok()?,
            r = b.readable() => r.ok()?,
        }
    }
}

/// A listener with `TCP_NODELAY` set once, for accepted sockets to inherit.
fn listen_nodelay(a: SocketAddr, ka: Duration) -> std::io::Result<TcpListener> {
    TcpListener::from_std(std_listen_nodelay(a, ka)?)
}

/// A nonblocking listener whose accepted sockets inherit `TCP_NODELAY` (and
/// TCP keepalive when `ka` is nonzero, as upgate's listeners do).
fn std_listen_nodelay(a: SocketAddr, ka: Duration) -> std::io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::for_address(a), socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    upgate::backend::upstream::keepalive((&s).into(), ka);
    s.bind(&a.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// A relay's `LISTEN=UPSTREAM` argument.
fn relay_spec(flag: &str, v: Option<String>) -> std::io::Result<(SocketAddr, SocketAddr)> {
    let bad = || std::io::Error::other(format!("{flag} needs LISTEN=UPSTREAM"));
    let v = v.ok_or_else(bad)?;
    let (l, u) = v.split_once('=').ok_or_else(bad)?;
    Ok((
        l.parse().map_err(std::io::Error::other)?,
        u.parse().map_err(std::io::Error::other)?,
    ))
}

fn main() -> std::io::Result<()> {
    let mut relays: Vec<(SocketAddr, SocketAddr)> = Vec::new();
    let mut tls_relays: Vec<(SocketAddr, SocketAddr)> = Vec::new();
    let mut epoll_relays: Vec<(SocketAddr, SocketAddr)> = Vec::new();
    let mut cert_key: Option<(std::path::PathBuf, std::path::PathBuf)> = None;
    let mut addrs: Vec<SocketAddr> = Vec::new();
    let mut feeds: Vec<SocketAddr> = Vec::new();
    let mut feed = Feed {
        rate: 10,
        size: 100,
    };
    let mut use_floor = false;
    let mut ka = Duration::ZERO;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => {
                let v = args
                    .next()
                    .ok_or_else(|| std::io::Error::other("--listen needs an address"))?;
                addrs.push(v.parse().map_err(std::io::Error::other)?);
            }
            "--feed" => {
                let v = args
                    .next()
                    .ok_or_else(|| std::io::Error::other("--feed needs an address"))?;
                feeds.push(v.parse().map_err(std::io::Error::other)?);
            }
            "--feed-rate" => {
                let v = args
                    .next()
                    .ok_or_else(|| std::io::Error::other("--feed-rate needs a number"))?;
                feed.rate = v.parse().map_err(std::io::Error::other)?;
            }
            "--feed-size" => {
                let v = args
                    .next()
                    .ok_or_else(|| std::io::Error::other("--feed-size needs a number"))?;
                feed.size = v.parse().map_err(std::io::Error::other)?;
            }
            "--floor" => use_floor = true,
            "--relay" => relays.push(relay_spec(&a, args.next())?),
            "--tls-relay" => tls_relays.push(relay_spec(&a, args.next())?),
            "--epoll-relay" => epoll_relays.push(relay_spec(&a, args.next())?),
            "--keepalive" => {
                let v = args
                    .next()
                    .ok_or_else(|| std::io::Error::other("--keepalive needs seconds"))?;
                ka = Duration::from_secs(v.parse().map_err(std::io::Error::other)?);
            }
            "--cert" => {
                let (c, k) = (args.next(), args.next());
                match (c, k) {
                    (Some(c), Some(k)) => cert_key = Some((c.into(), k.into())),
                    _ => return Err(std::io::Error::other("--cert needs CERT.pem KEY.pem")),
                }
            }
            "-h" | "--help" => {
                println!(
                    "upgate-bench-backend [--listen ADDR]... [--feed ADDR]... [--feed-rate MSGS_PER_S] [--feed-size BYTES] [--floor] [--relay LISTEN=UPSTREAM]... [--tls-relay LISTEN=UPSTREAM --cert CERT.pem KEY.pem] [--epoll-relay LISTEN=UPSTREAM]... [--keepalive SECS]\n\
                     Fast WebSocket backends for the benchmark: echo on --listen, a timestamped feed on --feed\n\
                     (--floor: feed connections written by one plain thread, the kernel floor);\n\
                     --relay: the least a proxy does (read the head, connect, copy both ways), the proxy floor;\n\
                     --tls-relay: the same behind upgate's rustls config, holding no buffer while idle;\n\
                     --epoll-relay: the relay on one thread on epoll, no runtime, fewest system calls (its own thread each);\n\
                     --keepalive: the relays turn on TCP keepalive as upgate's server.tcp_keepalive does (listener and upstream sockets)."
                );
                return Ok(());
            }
            other => return Err(std::io::Error::other(format!("unknown argument {other}"))),
        }
    }
    let acceptor = match (&cert_key, tls_relays.is_empty()) {
        (_, true) => None,
        (None, false) => return Err(std::io::Error::other("--tls-relay needs --cert")),
        (Some((cert, key)), false) => {
            let files = [upgate::config::CertFiles {
                cert: cert.clone(),
                key: key.clone(),
                line: 0,
            }];
            let resumption = upgate::tls::Resumption::new().map_err(std::io::Error::other)?;
            let cfg =
                upgate::tls::server_config(&files, &resumption).map_err(std::io::Error::other)?;
            Some(tokio_rustls::TlsAcceptor::from(cfg))
        }
    };
    let mut epoll_threads = Vec::new();
    for (l, up) in epoll_relays {
        let l = std_listen_nodelay(l, ka)?;
        eprintln!(
            "upgate-bench-backend: epoll relay on {:?} to {up}",
            l.local_addr()
        );
        epoll_threads.push(std::thread::spawn(move || epoll_relay::run(l, up, ka)));
    }
    if !epoll_threads.is_empty()
        && addrs.is_empty()
        && feeds.is_empty()
        && relays.is_empty()
        && tls_relays.is_empty()
    {
        // Nothing for a runtime to do: no runtime.
        for t in epoll_threads {
            t.join()
                .map_err(|_| std::io::Error::other("epoll relay panicked"))??;
        }
        return Ok(());
    }
    if addrs.is_empty() && feeds.is_empty() && relays.is_empty() && tls_relays.is_empty() {
        addrs.push("127.0.0.1:9001".parse().map_err(std::io::Error::other)?);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut set = tokio::task::JoinSet::new();
        let frames: Frames = tokio::sync::broadcast::channel(1024).0;
        let mode = if feeds.is_empty() {
            None
        } else if use_floor {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || floor(feed, rx));
            Some(FeedMode::Floor(tx))
        } else {
            set.spawn(publish(feed, frames.clone()));
            Some(FeedMode::Tasks(frames))
        };
        let all = addrs
            .into_iter()
            .map(|a| (a, None))
            .chain(feeds.into_iter().map(|a| (a, mode.clone())));
        for (a, mode) in all {
            let l = TcpListener::bind(a).await?;
            eprintln!(
                "upgate-bench-backend: {} on {a}",
                if mode.is_some() { "feed" } else { "echo" }
            );
            set.spawn(async move {
                loop {
                    if let Ok((s, _)) = l.accept().await {
                        let mode = mode.clone();
                        tokio::spawn(async move {
                            let _ = serve(s, mode).await;
                        });
                    }
                }
            });
        }
        for (l, up) in relays {
            let l = listen_nodelay(l, ka)?;
            eprintln!(
                "upgate-bench-backend: relay on {:?} to {up}",
                l.local_addr()
            );
            set.spawn(relay(l, up, ka));
        }
        for (l, up) in tls_relays {
            let l = listen_nodelay(l, ka)?;
            let Some(acceptor) = acceptor.clone() else {
                break;
            };
            eprintln!(
                "upgate-bench-backend: TLS relay on {:?} to {up}",
                l.local_addr()
            );
            set.spawn(tls_relay(l, up, ka, acceptor));
        }
        while set.join_next().await.is_some() {}
        Ok(())
    })
}
