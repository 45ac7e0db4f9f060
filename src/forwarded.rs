//! The client's address behind an L7 proxy: `X-Forwarded-For`, believed only from
//! `trusted_proxies`.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;

/// The client's address: the connection's, unless it comes from a trusted proxy, in which case
/// the right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_addr(headers: &HeaderMap, peer: SocketAddr, trusted: &[ipnet::IpNet]) -> SocketAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer.ip()) {
        return peer;
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    // From the right: each trusted hop vouches for the entry before it. An entry that does not
    // parse ends the walk; skipping it would let a client's own entry through.
    for entry in entries.iter().rev() {
        match forwarded_ip(entry) {
            Some(ip) if is_trusted(&ip) => continue,
            Some(ip) => return SocketAddr::new(ip, 0),
            None => return peer,
        }
    }
    peer
}

/// An `X-Forwarded-For` entry: `203.0.113.7`, `203.0.113.7:51234`, `2001:db8::1` or
/// `[2001:db8::1]:51234`.
fn forwarded_ip(entry: &str) -> Option<IpAddr> {
    entry
        .parse()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| entry.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}
