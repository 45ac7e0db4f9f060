//! `sigrelay healthcheck`: probes a running relay's `/healthz` over TLS on loopback, for
//! container HEALTHCHECKs (the image needs no curl or shell).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

/// How long the probe may take, per step.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Probes `addr`'s `/healthz` (an unspecified address probes loopback); `Ok` when it answers 200.
pub fn probe(mut addr: SocketAddr) -> anyhow::Result<()> {
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    // It asks "is it up", not "is it who it claims": any certificate is accepted.
    let tls = crate::tls::probe_client_config();
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let mut conn = rustls::ClientConnection::new(tls, name)?;
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("connecting to {addr}"))?;
    tcp.set_read_timeout(Some(TIMEOUT))?;
    let mut stream = rustls::Stream::new(&mut conn, &mut tcp);
    write!(stream, "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).context("reading the response")?;
    anyhow::ensure!(&head == b"HTTP/1.1 200", "{addr}/healthz answered {:?}", String::from_utf8_lossy(&head));
    Ok(())
}
