//! The PROXY protocol (v1 text and v2 binary) header that L4 load balancers put before the
//! client's bytes, parsed with the `ppp` crate. It is believed only from the balancers listed in
//! `proxy_protocol_from`; the bytes read past it are put back, so the TLS handshake that follows
//! starts at the right byte.

use std::net::SocketAddr;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::prefixed::Prefixed;

/// Longest header read: v1 is at most 107 bytes; v2 carries 16 bytes plus addresses and TLVs.
const MAX_HEADER: usize = 1024;

/// Parses a PROXY header at the start of `buf`. `Ok(None)` means more bytes are needed;
/// `Ok(Some((len, addr)))` gives the header's length and the client address it names (`None`
/// for LOCAL or UNKNOWN, i.e. the balancer's own health checks).
pub fn parse(buf: &[u8]) -> Result<Option<(usize, Option<SocketAddr>)>, String> {
    use ppp::{HeaderResult, PartialResult};
    let result = HeaderResult::parse(buf);
    if result.is_incomplete() {
        return if buf.len() >= MAX_HEADER { Err("header too long".into()) } else { Ok(None) };
    }
    match result {
        HeaderResult::V1(Ok(h)) => {
            let addr = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                ppp::v1::Addresses::Unknown => None,
            };
            Ok(Some((h.header.len(), addr)))
        }
        HeaderResult::V2(Ok(h)) => {
            let addr = match (h.command, h.addresses) {
                (ppp::v2::Command::Local, _) => None,
                (_, ppp::v2::Addresses::IPv4(a)) => Some(SocketAddr::from((a.source_address, a.source_port))),
                (_, ppp::v2::Addresses::IPv6(a)) => Some(SocketAddr::from((a.source_address, a.source_port))),
                _ => None,
            };
            Ok(Some((h.len(), addr)))
        }
        HeaderResult::V1(Err(e)) => Err(format!("not a PROXY header: {e}")),
        HeaderResult::V2(Err(e)) => Err(format!("not a PROXY header: {e}")),
    }
}

/// Reads the header off `tcp` through a buffer, by `deadline`. Returns the client address it
/// names (if any) and the stream with whatever followed the header put back in front.
pub async fn read(mut tcp: TcpStream, deadline: Instant) -> Result<(Option<SocketAddr>, Prefixed<TcpStream>), String> {
    let mut buf = [0u8; MAX_HEADER];
    let mut filled = 0;
    let read = async {
        loop {
            let n = tcp.read(&mut buf[filled..]).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed before a PROXY header".to_string());
            }
            filled += n;
            if let Some((len, addr)) = parse(&buf[..filled])? {
                return Ok((len, addr));
            }
        }
    };
    let (len, addr) = tokio::time::timeout_at(deadline, read).await.map_err(|_| "PROXY header did not arrive in time".to_string())??;
    Ok((addr, Prefixed::new(&buf[len..filled], tcp)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2() {
        let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n\x16\x03\x01";
        assert_eq!(parse(v1).unwrap(), Some((v1.len() - 3, Some("203.0.113.7:51000".parse().unwrap()))));
        assert_eq!(parse(b"PROXY TCP4 203.0.113.7 10.0").unwrap(), None);
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap(), Some((15, None)));

        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0, 12]);
        v2.extend_from_slice(&[198, 51, 100, 9, 10, 0, 0, 1]);
        v2.extend_from_slice(&4242u16.to_be_bytes());
        v2.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(parse(&v2).unwrap(), Some((28, Some("198.51.100.9:4242".parse().unwrap()))));
        assert_eq!(parse(&v2[..20]).unwrap(), None);

        assert!(parse(b"GET / HTTP/1.1\r\n\r\n").is_err());
        assert!(parse(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03").is_err());
    }
}
