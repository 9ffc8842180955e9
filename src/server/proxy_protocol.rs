//! The PROXY protocol (HAProxy's, versions 1 and 2): the header an L4 load
//! balancer (HAProxy `send-proxy`, AWS NLB, …) writes at the start of each
//! connection so the server learns the client's address. A listener with
//! `proxy_protocol: true` requires it on every connection, before TLS or HTTP.
//!
//! The header is read without consuming a byte past it: we peek, and take
//! from the socket only what belongs to the header.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Version 2's fixed signature.
const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Version 1's longest header, CRLF included (the spec's bound).
const V1_MAX: usize = 107;
/// The longest version 2 address block we accept (addresses plus TLVs,
/// which balancers use for extras such as an endpoint id).
const V2_MAX_BLOCK: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("connection closed before a complete PROXY header")]
    Closed,
    #[error("no PROXY protocol header (the listener requires one)")]
    Missing,
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What a complete header says.
#[derive(Debug, PartialEq, Eq)]
pub struct Header {
    /// Bytes the header takes at the start of the stream.
    pub len: usize,
    /// The client's address; `None` for `LOCAL` (the balancer's own health
    /// check) or an unknown/unsupported family: use the socket's peer.
    pub source: Option<SocketAddr>,
}

/// Parsing a prefix of the stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    Complete(Header),
    /// Valid so far; more bytes are needed.
    Incomplete,
}

/// Parses `b`, the first bytes of a connection.
pub(crate) fn parse(b: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let sig = b.len().min(V2_SIG.len());
    if b[..sig] == V2_SIG[..sig] {
        return parse_v2(b);
    }
    let v1 = b"PROXY ";
    let n = b.len().min(v1.len());
    if b[..n] == v1[..n] {
        return parse_v1(b);
    }
    Err(ProxyHeaderError::Missing)
}

fn parse_v1(b: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let Some(end) = b.windows(2).position(|w| w == b"\r\n") else {
        return if b.len() >= V1_MAX {
            Err(ProxyHeaderError::Malformed("v1 line longer than 107 bytes"))
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    if end + 2 > V1_MAX {
        return Err(ProxyHeaderError::Malformed("v1 line longer than 107 bytes"));
    }
    let line = std::str::from_utf8(&b[..end])
        .map_err(|_| ProxyHeaderError::Malformed("v1 line is not ASCII"))?;
    let mut parts = line.split(' ');
    let _proxy = parts.next();
    let source = match parts.next() {
        Some("UNKNOWN") => None,
        Some(fam @ ("TCP4" | "TCP6")) => {
            let mut field = || {
                parts
                    .next()
                    .ok_or(ProxyHeaderError::Malformed("v1 line has too few fields"))
            };
            let (src, _dst, sport, _dport) = (field()?, field()?, field()?, field()?);
            let ip: IpAddr = match fam {
                "TCP4" => src.parse::<Ipv4Addr>().map(IpAddr::V4),
                _ => src.parse::<Ipv6Addr>().map(IpAddr::V6),
            }
            .map_err(|_| ProxyHeaderError::Malformed("v1 source address"))?;
            let port: u16 = sport
                .parse()
                .map_err(|_| ProxyHeaderError::Malformed("v1 source port"))?;
            if parts.next().is_some() {
                return Err(ProxyHeaderError::Malformed("v1 line has too many fields"));
            }
            Some(SocketAddr::new(ip, port))
        }
        _ => {
            return Err(ProxyHeaderError::Malformed(
                "v1 protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    Ok(Parsed::Complete(Header {
        len: end + 2,
        source,
    }))
}

fn parse_v2(b: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    if b.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let (ver_cmd, fam) = (b[12], b[13]);
    if ver_cmd >> 4 != 2 {
        return Err(ProxyHeaderError::Malformed("v2 version is not 2"));
    }
    let block = usize::from(u16::from_be_bytes([b[14], b[15]]));
    if block > V2_MAX_BLOCK {
        return Err(ProxyHeaderError::Malformed("v2 address block too long"));
    }
    let len = 16 + block;
    if b.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let a = &b[16..len];
    let source = match (ver_cmd & 0x0f, fam) {
        // LOCAL: the balancer speaking for itself (health checks).
        (0, _) => None,
        // PROXY over TCP or UDP, IPv4: src(4) dst(4) sport(2) dport(2).
        (1, 0x11 | 0x12) => {
            if a.len() < 12 {
                return Err(ProxyHeaderError::Malformed("v2 IPv4 block too short"));
            }
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Some(SocketAddr::new(ip.into(), u16::from_be_bytes([a[8], a[9]])))
        }
        // IPv6: src(16) dst(16) sport(2) dport(2).
        (1, 0x21 | 0x22) => {
            if a.len() < 36 {
                return Err(ProxyHeaderError::Malformed("v2 IPv6 block too short"));
            }
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&a[..16]);
            let ip = Ipv6Addr::from(ip);
            Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([a[32], a[33]]),
            ))
        }
        // UNSPEC or UNIX: nothing we can use as a client address.
        (1, _) => None,
        _ => {
            return Err(ProxyHeaderError::Malformed(
                "v2 command is not LOCAL or PROXY",
            ))
        }
    };
    Ok(Parsed::Complete(Header { len, source }))
}

/// Reads the header from the start of `tcp`, leaving every byte after it in
/// the socket. The caller bounds the time it may take.
pub async fn read(tcp: &mut TcpStream) -> Result<Header, ProxyHeaderError> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = tcp.peek(&mut buf).await?;
        if n == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        seen.extend_from_slice(&buf[..n]);
        match parse(&seen)? {
            Parsed::Complete(h) => {
                // Take exactly the header's bytes of what is waiting.
                let ours = h.len - (seen.len() - n);
                tcp.read_exact(&mut buf[..ours]).await?;
                return Ok(h);
            }
            // All of it belongs to the header: take it, wait for more.
            Parsed::Incomplete => {
                tcp.read_exact(&mut buf[..n]).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_rng as rng;

    #[test]
    fn arbitrary_bytes_never_panic_and_lengths_stay_inside() {
        let mut r = rng(7);
        let mut valid = v2(1, 0x21, &[0; 36]);
        valid.extend_from_slice(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n");
        for _ in 0..50_000 {
            let n = (r() % 300) as usize;
            let mut b: Vec<u8> = (0..n).map(|_| r() as u8).collect();
            match r() % 4 {
                0 => b.splice(0..0, V2_SIG.iter().copied()).for_each(drop),
                1 => b.splice(0..0, b"PROXY ".iter().copied()).for_each(drop),
                2 => {
                    // A valid header with a few bytes changed.
                    b = valid.clone();
                    for _ in 0..3 {
                        let i = (r() as usize) % b.len();
                        b[i] = r() as u8;
                    }
                    b.truncate((r() as usize) % (b.len() + 1));
                }
                _ => {}
            }
            if let Ok(Parsed::Complete(h)) = parse(&b) {
                assert!(h.len <= b.len(), "{b:?}");
            }
        }
    }

    fn complete(b: &[u8]) -> Header {
        match parse(b) {
            Ok(Parsed::Complete(h)) => h,
            other => panic!("{other:?} for {:?}", String::from_utf8_lossy(b)),
        }
    }

    fn v2(cmd: u8, fam: u8, block: &[u8]) -> Vec<u8> {
        let mut v = V2_SIG.to_vec();
        v.push(0x20 | cmd);
        v.push(fam);
        v.extend_from_slice(&(block.len() as u16).to_be_bytes());
        v.extend_from_slice(block);
        v
    }

    #[test]
    fn v1_addresses() {
        let h = complete(b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n");
        assert_eq!(h.len, 41);
        assert_eq!(h.source, Some("192.0.2.7:51234".parse().unwrap()));
        let h = complete(b"PROXY TCP6 2001:db8::9 2001:db8::1 4000 443\r\n");
        assert_eq!(h.source, Some("[2001:db8::9]:4000".parse().unwrap()));
        let h = complete(b"PROXY UNKNOWN\r\n");
        assert_eq!((h.len, h.source), (15, None));
        let h = complete(b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n");
        assert_eq!(h.source, None);
    }

    #[test]
    fn v1_prefixes_wait_for_more_and_bad_lines_are_refused() {
        for cut in 1..40 {
            let full = b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 443\r\n";
            assert_eq!(
                parse(&full[..cut]).unwrap(),
                Parsed::Incomplete,
                "cut {cut}"
            );
        }
        for bad in [
            &b"PROXY TCP4 192.0.2.777 10.0.0.1 1 2\r\n"[..],
            b"PROXY TCP4 192.0.2.7 10.0.0.1 99999 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2 3\r\n",
            b"PROXY TCP6 192.0.2.7 10.0.0.1 1 2\r\n",
            b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(ProxyHeaderError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = [b"PROXY ".as_slice(), &[b'x'; 120]].concat();
        assert!(matches!(parse(&long), Err(ProxyHeaderError::Malformed(_))));
        for missing in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\x16\x03\x01\x02\x00",
            b"PROXX",
        ] {
            assert!(matches!(parse(missing), Err(ProxyHeaderError::Missing)));
        }
    }

    #[test]
    fn v2_addresses_local_and_tlvs() {
        let mut b4 = vec![198, 51, 100, 4, 10, 0, 0, 1];
        b4.extend_from_slice(&40000u16.to_be_bytes());
        b4.extend_from_slice(&443u16.to_be_bytes());
        let h = complete(&v2(1, 0x11, &b4));
        assert_eq!(
            (h.len, h.source),
            (28, Some("198.51.100.4:40000".parse().unwrap()))
        );

        let mut b6 = "2001:db8::5".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        b6.extend_from_slice(&[0; 16]);
        b6.extend_from_slice(&7u16.to_be_bytes());
        b6.extend_from_slice(&443u16.to_be_bytes());
        b6.extend_from_slice(&[0x04, 0x00, 0x03, b'a', b'b', b'c']); // a TLV
        let mut stream = v2(1, 0x21, &b6);
        let header_len = stream.len();
        stream.extend_from_slice(b"\x16\x03\x01"); // TLS follows
        let h = complete(&stream);
        assert_eq!(h.len, header_len);
        assert_eq!(h.source, Some("[2001:db8::5]:7".parse().unwrap()));

        assert_eq!(complete(&v2(0, 0, &[])).source, None);
        assert_eq!(complete(&v2(1, 0x31, &[0; 216])).source, None);
        let full = v2(1, 0x11, &b4);
        for cut in 1..full.len() {
            assert_eq!(
                parse(&full[..cut]).unwrap(),
                Parsed::Incomplete,
                "cut {cut}"
            );
        }
    }

    #[test]
    fn v2_bad_headers_are_refused() {
        let mut wrong_version = v2(1, 0x11, &[0; 12]);
        wrong_version[12] = 0x11;
        let too_short = v2(1, 0x11, &[0; 8]);
        let bad_command = v2(5, 0x11, &[0; 12]);
        let mut too_long = V2_SIG.to_vec();
        too_long.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        for bad in [wrong_version, too_short, bad_command, too_long] {
            assert!(
                matches!(parse(&bad), Err(ProxyHeaderError::Malformed(_))),
                "{bad:?}"
            );
        }
    }
}
