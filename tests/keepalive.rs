//! `server.tcp_keepalive`: the gateway's sockets to clients and to backends
//! carry TCP keepalive, so peers that vanish without a FIN are found.
//! Checked in the kernel's own socket table (/proc/net/tcp).

mod support;

use std::net::SocketAddr;

use support::*;

/// The timer of the IPv4 socket from `local` to `remote`: (kind, ticks
/// left). Kind 2 is the keepalive timer; 0 is none.
fn timer(local: SocketAddr, remote: SocketAddr) -> Option<(u8, u64)> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(a) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(a.ip().octets()),
            a.port()
        ),
        SocketAddr::V6(_) => unreachable!("IPv4 only"),
    };
    let (l, r) = (hex(local), hex(remote));
    std::fs::read_to_string("/proc/net/tcp")
        .ok()?
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 5 && f[1] == l && f[2] == r)
        .and_then(|f| {
            let (kind, when) = f[5].split_once(':')?;
            Some((
                u8::from_str_radix(kind, 16).ok()?,
                u64::from_str_radix(when, 16).ok()?,
            ))
        })
}

/// The timer once the socket is idle: kind 1 (retransmission, while data
/// still waits for its ACK) gives way to keepalive (2) or none (0).
async fn idle_timer(local: SocketAddr, remote: SocketAddr) -> (u8, u64) {
    let t0 = std::time::Instant::now();
    loop {
        let t = timer(local, remote).expect("the socket is in the table");
        if t.0 != 1 || t0.elapsed() > std::time::Duration::from_secs(5) {
            return t;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The gateway's socket towards `backend`: its local address.
fn towards(backend: SocketAddr) -> Option<SocketAddr> {
    let want = format!(":{:04X}", backend.port());
    std::fs::read_to_string("/proc/net/tcp")
        .ok()?
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[2].ends_with(&want) && f[3] == "01")
        .and_then(|f| {
            let (ip, port) = f[1].split_once(':')?;
            let ip = u32::from_str_radix(ip, 16).ok()?.to_le_bytes();
            Some(SocketAddr::from((ip, u16::from_str_radix(port, 16).ok()?)))
        })
}

async fn session_timers(keepalive: &str) -> ((u8, u64), (u8, u64)) {
    let be = echo_backends(&["a"]).await;
    let gw = gateway(&format!(
        "server: {{ tcp_keepalive: {keepalive} }}\nlisten:\n  - addr: 127.0.0.1:0\npools:\n  p: {{ backends: [ws://{}] }}\nroutes:\n  - {{ name: r, path: /, pool: p }}\n",
        be.addrs[0]
    ))
    .await;
    let tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let me = tcp.local_addr().unwrap();
    let mut s = ws_over(tcp, "h", "/", &[]).await.unwrap();
    assert_eq!(roundtrip(&mut s, "x").await, "x");
    let client_side = idle_timer(gw.addr(), me).await;
    let out = towards(be.addrs[0]).expect("the gateway's socket to the backend");
    let backend_side = idle_timer(out, be.addrs[0]).await;
    drop(s);
    (client_side, backend_side)
}

#[tokio::test]
async fn client_and_backend_sockets_carry_keepalive() {
    let (client, backend) = session_timers("45s").await;
    // USER_HZ ticks: at most 45 s away.
    for (side, (kind, left)) in [("client", client), ("backend", backend)] {
        assert_eq!(kind, 2, "{side} socket has no keepalive timer");
        assert!(left <= 45 * 100, "{side}: {left} ticks");
    }
}

#[tokio::test]
async fn zero_turns_keepalive_off() {
    let (client, backend) = session_timers("0s").await;
    assert_ne!(client.0, 2, "client socket has a keepalive timer");
    assert_ne!(backend.0, 2, "backend socket has a keepalive timer");
}
