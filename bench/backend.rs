//! `upgate-bench-backend`: a fast WebSocket echo server for the benchmark.
//!
//! One thread, hand-rolled framing, echoes data frames back unmasked, answers
//! pings and closes. Listens on every `--listen` address (several loopback
//! addresses let the 100k-connection scenario stay under the port range).

mod proto;

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn accept_key(key: &[u8]) -> String {
    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key)
}

async fn serve(mut s: TcpStream) -> std::io::Result<()> {
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

fn main() -> std::io::Result<()> {
    let mut addrs: Vec<SocketAddr> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => {
                let v = args
                    .next()
                    .ok_or_else(|| std::io::Error::other("--listen needs an address"))?;
                addrs.push(v.parse().map_err(std::io::Error::other)?);
            }
            "-h" | "--help" => {
                println!("upgate-bench-backend --listen ADDR [--listen ADDR ...]\nA fast WebSocket echo server for the benchmark.");
                return Ok(());
            }
            other => return Err(std::io::Error::other(format!("unknown argument {other}"))),
        }
    }
    if addrs.is_empty() {
        addrs.push("127.0.0.1:9001".parse().map_err(std::io::Error::other)?);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut set = tokio::task::JoinSet::new();
        for a in addrs {
            let l = TcpListener::bind(a).await?;
            eprintln!("upgate-bench-backend: echo on {a}");
            set.spawn(async move {
                loop {
                    if let Ok((s, _)) = l.accept().await {
                        tokio::spawn(async move {
                            let _ = serve(s).await;
                        });
                    }
                }
            });
        }
        while set.join_next().await.is_some() {}
        Ok(())
    })
}
