//! Connection limits: in total, per client address, and a per-address handshake rate (token
//! bucket). Every accepted connection counts from its accept to its end, whether it is still in
//! its TLS handshake, sending requests, or relayed; the count is held by a drop guard.
//!
//! Addresses are counted by [`key`]: IPv4 by address, IPv6 by its `ipv6_prefix` (a host usually
//! has a whole /64, so counting single addresses would give it a fresh allowance per address),
//! and IPv4-mapped IPv6 as the IPv4 address it is.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use prometheus_client::metrics::gauge::Gauge;

use crate::config::Limits;
use crate::outcome::Outcome;

/// The limits in force (reloadable) and the counts (not).
#[derive(Debug)]
pub struct Limiter {
    limits: ArcSwap<Limits>,
    /// `max_connections` when the config leaves it to the file-descriptor limit.
    derived_max: usize,
    total: Arc<AtomicUsize>,
    per_ip: Arc<DashMap<IpAddr, usize>>,
    buckets: DashMap<IpAddr, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The address a client is counted under: IPv4 (also IPv4-mapped IPv6) as is, IPv6 by its
/// `/prefix`.
pub fn key(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ipnet::Ipv6Net::new(v6, ipv6_prefix).map(|n| IpAddr::V6(n.network())).unwrap_or(ip),
        },
    }
}

/// Connections over a limit are still served, so that they can be told why (a 503, or a 101
/// and a 1013 close); beyond this many over it, they are closed as soon as they are accepted.
pub const OVERSHOOT: usize = 32;

/// One connection's place under the limits and on its accept thread, released when dropped.
#[must_use = "the connection is uncounted when the permit is dropped"]
#[derive(Debug)]
pub struct Permit {
    total: Arc<AtomicUsize>,
    per_ip: Arc<DashMap<IpAddr, usize>>,
    /// The key the connection is counted under, if it is counted per address.
    counted: Option<IpAddr>,
    /// Its place in the count of connections its thread serves.
    thread: Option<ThreadHeld>,
}

/// A connection counted in its accept thread's `sigrelay_thread_connections` until dropped.
#[derive(Debug)]
pub struct ThreadHeld(Gauge);

impl ThreadHeld {
    /// Counts one more connection in `thread`.
    pub fn new(thread: Gauge) -> ThreadHeld {
        thread.inc();
        ThreadHeld(thread)
    }
}

impl Drop for ThreadHeld {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Permit {
    /// Keeps the connection counted on its thread for as long as the permit lives.
    pub fn count_on(&mut self, thread: ThreadHeld) {
        self.thread = Some(thread);
    }

    fn uncount_address(&mut self) {
        if let Some(ip) = self.counted.take() {
            if let dashmap::mapref::entry::Entry::Occupied(mut e) = self.per_ip.entry(ip) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }

    /// Whether the connection counts under a client's address: not when it came from a trusted
    /// proxy that named no client.
    pub fn names_a_client(&self) -> bool {
        self.counted.is_some()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.total.fetch_sub(1, Ordering::Relaxed);
        self.uncount_address();
    }
}

impl Limiter {
    /// `derived_max` applies when `limits.max_connections` is unset.
    pub fn new(limits: Limits, derived_max: usize) -> Limiter {
        Limiter {
            limits: ArcSwap::from_pointee(limits),
            derived_max,
            total: Arc::default(),
            per_ip: Arc::default(),
            buckets: DashMap::new(),
        }
    }

    /// Puts new limits in force; connections already counted stay.
    pub fn update(&self, limits: Limits) {
        self.limits.store(Arc::new(limits));
    }

    fn limits(&self) -> arc_swap::Guard<Arc<Limits>> {
        self.limits.load()
    }

    /// The total limit in force.
    pub fn max_connections(&self) -> usize {
        self.limits().max_connections.unwrap_or(self.derived_max)
    }

    /// Counts a connection just accepted from `ip` (the TCP peer, or the address its PROXY
    /// header gave). `by_address` is false for a trusted proxy's own address: its clients are
    /// counted once a request names them ([`Limiter::attribute`]). A connection over a limit is
    /// counted too, for as long as it holds its descriptor; one more than [`OVERSHOOT`] over it is
    /// refused here, with the limit it is over.
    pub fn connection(&self, ip: IpAddr, by_address: bool) -> Result<Permit, Outcome> {
        let limits = self.limits();
        let mut permit = Permit { total: self.total.clone(), per_ip: self.per_ip.clone(), counted: None, thread: None };
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        if total > limits.max_connections.unwrap_or(self.derived_max) + OVERSHOOT {
            return Err(Outcome::OverMaxConnections);
        }
        if by_address && self.count_address(&mut permit, ip, &limits) > limits.max_connections_per_ip + OVERSHOOT {
            return Err(Outcome::OverMaxConnectionsPerIp);
        }
        Ok(permit)
    }

    /// Counts `permit`'s connection under `ip` instead of where it was: the client a trusted
    /// proxy's request names. Returns the address's count with it.
    pub fn attribute(&self, permit: &mut Permit, ip: IpAddr) -> usize {
        let limits = self.limits();
        let k = key(ip, limits.ipv6_prefix);
        if permit.counted == Some(k) {
            return self.per_ip.get(&k).map_or(0, |c| *c);
        }
        permit.uncount_address();
        self.count_address(permit, ip, &limits)
    }

    /// As [`Limiter::attribute`], for the client a PROXY header names at accept: one more than
    /// [`OVERSHOOT`] over its address's limit is refused there, as a connection from that
    /// address itself would be, so a client behind the balancer cannot hold the whole total in
    /// handshakes that never reach an upgrade.
    pub fn attribute_at_accept(&self, permit: &mut Permit, ip: IpAddr) -> Result<(), Outcome> {
        let count = self.attribute(permit, ip);
        if count > self.limits().max_connections_per_ip + OVERSHOOT {
            return Err(Outcome::OverMaxConnectionsPerIp);
        }
        Ok(())
    }

    /// Counts the connection under `ip`'s key; returns the key's count with it.
    fn count_address(&self, permit: &mut Permit, ip: IpAddr, limits: &Limits) -> usize {
        let k = key(ip, limits.ipv6_prefix);
        let mut count = self.per_ip.entry(k).or_insert(0);
        *count += 1;
        permit.counted = Some(k);
        *count
    }

    /// The limit `permit`'s connection is over now, if any, counting it: the total (refused with
    /// 503, which guards the descriptor budget) or its address's (a 1013 close).
    pub fn over(&self, permit: &Permit) -> Option<Outcome> {
        let limits = self.limits();
        if self.total() > limits.max_connections.unwrap_or(self.derived_max) {
            return Some(Outcome::OverMaxConnections);
        }
        let count = permit.counted.and_then(|k| self.per_ip.get(&k).map(|c| *c)).unwrap_or(0);
        (count > limits.max_connections_per_ip).then_some(Outcome::OverMaxConnectionsPerIp)
    }

    /// Takes one token from `ip`'s handshake bucket; false when it is empty. Every request that
    /// writes a handshake record takes one, refused or not.
    pub fn handshake(&self, ip: IpAddr) -> bool {
        let limits = self.limits();
        let now = Instant::now();
        let initial = Bucket { tokens: limits.handshake_burst, at: now };
        let mut b = self.buckets.entry(key(ip, limits.ipv6_prefix)).or_insert(initial);
        let refill = now.duration_since(b.at).as_secs_f64() * limits.handshakes_per_ip_per_s;
        b.tokens = (b.tokens + refill).min(limits.handshake_burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets buckets that have refilled, so idle addresses cost nothing. Called periodically.
    pub fn sweep(&self) {
        let limits = self.limits();
        let now = Instant::now();
        self.buckets.retain(|_, b| {
            b.tokens + now.duration_since(b.at).as_secs_f64() * limits.handshakes_per_ip_per_s < limits.handshake_burst
        });
    }

    /// Connections counted now.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: Option<usize>, per_ip: usize, rate: f64, burst: f64) -> Limits {
        Limits {
            max_connections: total,
            max_connections_per_ip: per_ip,
            handshakes_per_ip_per_s: rate,
            handshake_burst: burst,
            ipv6_prefix: 64,
        }
    }

    #[test]
    fn counts_and_releases() {
        let l = Limiter::new(limits(Some(3), 2, 1000.0, 1000.0), 100);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let p1 = l.connection(a, true).unwrap();
        let p2 = l.connection(a, true).unwrap();
        assert_eq!((l.over(&p1), l.over(&p2)), (None, None));
        let p3 = l.connection(a, true).unwrap();
        assert_eq!(l.over(&p3), Some(Outcome::OverMaxConnectionsPerIp));
        drop(p3);
        let p4 = l.connection(b, true).unwrap();
        assert_eq!(l.over(&p4), None);
        let p5 = l.connection(b, true).unwrap();
        assert_eq!(l.over(&p5), Some(Outcome::OverMaxConnections));
        drop(p5);
        drop(p1);
        let p6 = l.connection(b, true).unwrap();
        assert_eq!(l.over(&p6), None);
        assert_eq!(l.total(), 3);
        // Over a limit by more than the overshoot, a connection is refused at accept.
        let over: Vec<_> = (0..OVERSHOOT).map(|_| l.connection(b, false).unwrap()).collect();
        assert_eq!(l.connection(b, false).err(), Some(Outcome::OverMaxConnections));
        drop(over);
        assert_eq!(l.total(), 3);
    }

    #[test]
    fn a_trusted_proxys_connections_count_under_the_clients_they_name() {
        let l = Limiter::new(limits(None, 1, 1000.0, 1000.0), 100);
        let proxy: IpAddr = [10, 0, 0, 9].into();
        let mut p1 = l.connection(proxy, false).unwrap();
        let mut p2 = l.connection(proxy, false).unwrap();
        assert_eq!((l.over(&p1), l.over(&p2)), (None, None), "the proxy's own address is not limited");
        l.attribute(&mut p1, "203.0.113.7".parse().unwrap());
        l.attribute(&mut p2, "203.0.113.7".parse().unwrap());
        assert_eq!(l.over(&p2), Some(Outcome::OverMaxConnectionsPerIp));
        l.attribute(&mut p2, "203.0.113.8".parse().unwrap());
        assert_eq!((l.over(&p1), l.over(&p2)), (None, None), "re-attributed to a client with room");
    }

    #[test]
    fn a_client_a_proxy_header_names_is_refused_at_accept_past_the_overshoot() {
        let l = Limiter::new(limits(None, 1, 1000.0, 1000.0), 1000);
        let balancer: IpAddr = [10, 0, 0, 9].into();
        let client: IpAddr = "203.0.113.7".parse().unwrap();
        let held: Vec<_> = (0..=OVERSHOOT)
            .map(|_| {
                let mut p = l.connection(balancer, false).unwrap();
                l.attribute_at_accept(&mut p, client).unwrap();
                p
            })
            .collect();
        let mut p = l.connection(balancer, false).unwrap();
        assert_eq!(l.attribute_at_accept(&mut p, client), Err(Outcome::OverMaxConnectionsPerIp));
        let mut other = l.connection(balancer, false).unwrap();
        assert_eq!(l.attribute_at_accept(&mut other, "203.0.113.8".parse().unwrap()), Ok(()));
        drop(held);
    }

    #[test]
    fn ipv6_counts_by_prefix_and_mapped_ipv4_as_ipv4() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(key(ip("2001:db8::1"), 64), key(ip("2001:db8::ffff:1"), 64));
        assert_ne!(key(ip("2001:db8::1"), 64), key(ip("2001:db8:0:1::1"), 64));
        assert_eq!(key(ip("2001:db8::1"), 128), ip("2001:db8::1"));
        assert_eq!(key(ip("::ffff:10.0.0.1"), 64), ip("10.0.0.1"));
        let l = Limiter::new(limits(None, 1, 1000.0, 1000.0), 100);
        let _a = l.connection(ip("2001:db8::1"), true).unwrap();
        let same_64 = l.connection(ip("2001:db8::2"), true).unwrap();
        assert_eq!(l.over(&same_64), Some(Outcome::OverMaxConnectionsPerIp));
        let other_64 = l.connection(ip("2001:db8:0:1::2"), true).unwrap();
        assert_eq!(l.over(&other_64), None);
    }

    #[test]
    fn token_bucket_limits_bursts() {
        let l = Limiter::new(limits(None, 100, 1.0, 3.0), 100);
        let a: IpAddr = [10, 0, 0, 1].into();
        assert!((0..3).all(|_| l.handshake(a)));
        assert!(!l.handshake(a));
        assert!(l.handshake([10, 0, 0, 9].into()), "other addresses have their own bucket");
    }
}
