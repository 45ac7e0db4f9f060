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
    // From the right: each trusted hop vouches for the entry before it. A line that is not
    // visible ASCII, or an entry that does not parse, ends the walk: skipping it would let a
    // client's own entry through.
    let lines: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
    for line in lines.iter().rev() {
        let Ok(line) = line.to_str() else { return peer };
        for entry in line.rsplit(',').map(str::trim) {
            match forwarded_ip(entry) {
                Some(ip) if is_trusted(&ip) => continue,
                Some(ip) => return SocketAddr::new(ip, 0),
                None => return peer,
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn walk(lines: &[&[u8]]) -> SocketAddr {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append("x-forwarded-for", HeaderValue::from_bytes(l).unwrap());
        }
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        client_addr(&h, "10.0.0.1:443".parse().unwrap(), &trusted)
    }

    #[test]
    fn walks_from_the_right_and_stops_at_what_it_cannot_read() {
        assert_eq!(walk(&[b"203.0.113.7, 10.0.0.2"]).ip().to_string(), "203.0.113.7");
        assert_eq!(walk(&[b"198.51.100.1", b"203.0.113.7:4000"]).ip().to_string(), "203.0.113.7");
        assert_eq!(walk(&[b"198.51.100.1, junk, 10.0.0.2"]).to_string(), "10.0.0.1:443");
        // A client's own entry behind a line of non-ASCII bytes is not believed.
        assert_eq!(walk(&[b"198.51.100.1", b"\xff"]).to_string(), "10.0.0.1:443");
        assert_eq!(walk(&[b"198.51.100.1", b"10.0.0.3 \xc3\xa9"]).to_string(), "10.0.0.1:443");
    }
}
