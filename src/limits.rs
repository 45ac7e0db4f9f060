//! Connection limits: in total, per client address, and a per-address handshake rate (token
//! bucket). Counted connections are held by drop guards.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dashmap::DashMap;

use crate::config::Limits;
use crate::outcome::Outcome;

/// The limits in force (reloadable) and the counts (not).
#[derive(Debug)]
pub struct Limiter {
    limits: Mutex<Limits>,
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

/// One counted connection; released when dropped.
#[must_use = "the connection is uncounted when the permit is dropped"]
pub struct Permit {
    total: Arc<AtomicUsize>,
    per_ip: Arc<DashMap<IpAddr, usize>>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.total.fetch_sub(1, Ordering::Relaxed);
        if let dashmap::mapref::entry::Entry::Occupied(mut e) = self.per_ip.entry(self.ip) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

impl Limiter {
    /// `derived_max` applies when `limits.max_connections` is unset.
    pub fn new(limits: Limits, derived_max: usize) -> Limiter {
        Limiter {
            limits: Mutex::new(limits),
            derived_max,
            total: Arc::default(),
            per_ip: Arc::default(),
            buckets: DashMap::new(),
        }
    }

    /// Puts new limits in force; connections already counted stay.
    pub fn update(&self, limits: Limits) {
        *self.limits.lock().unwrap() = limits;
    }

    /// The total limit in force.
    pub fn max_connections(&self) -> usize {
        self.limits.lock().unwrap().max_connections.unwrap_or(self.derived_max)
    }

    /// Admits a handshake from `ip`, or says which limit it is over.
    pub fn admit(&self, ip: IpAddr) -> Result<Permit, Outcome> {
        let limits = self.limits.lock().unwrap().clone();
        if !self.take_token(ip, &limits) {
            return Err(Outcome::OverHandshakeRate);
        }
        let max_total = limits.max_connections.unwrap_or(self.derived_max);
        if self.total.fetch_add(1, Ordering::Relaxed) >= max_total {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Outcome::OverMaxConnections);
        }
        let mut count = self.per_ip.entry(ip).or_insert(0);
        if *count >= limits.max_connections_per_ip {
            drop(count);
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Outcome::OverMaxConnectionsPerIp);
        }
        *count += 1;
        drop(count);
        Ok(Permit { total: self.total.clone(), per_ip: self.per_ip.clone(), ip })
    }

    fn take_token(&self, ip: IpAddr, limits: &Limits) -> bool {
        let now = Instant::now();
        let mut b = self.buckets.entry(ip).or_insert(Bucket { tokens: limits.handshake_burst, at: now });
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
        let limits = self.limits.lock().unwrap().clone();
        let now = Instant::now();
        self.buckets.retain(|_, b| {
            b.tokens + now.duration_since(b.at).as_secs_f64() * limits.handshakes_per_ip_per_s < limits.handshake_burst
        });
    }

    /// Relayed connections counted now.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: Option<usize>, per_ip: usize, rate: f64, burst: f64) -> Limits {
        Limits { max_connections: total, max_connections_per_ip: per_ip, handshakes_per_ip_per_s: rate, handshake_burst: burst }
    }

    #[test]
    fn counts_and_releases() {
        let l = Limiter::new(limits(Some(3), 2, 1000.0, 1000.0), 100);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let p1 = l.admit(a).unwrap();
        let _p2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).err(), Some(Outcome::OverMaxConnectionsPerIp));
        let _p3 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).err(), Some(Outcome::OverMaxConnections));
        drop(p1);
        let _p4 = l.admit(b).unwrap();
        assert_eq!(l.total(), 3);
    }

    #[test]
    fn token_bucket_limits_bursts() {
        let l = Limiter::new(limits(None, 100, 1.0, 3.0), 100);
        let a: IpAddr = [10, 0, 0, 1].into();
        let permits: Vec<_> = (0..3).map(|_| l.admit(a).unwrap()).collect();
        assert_eq!(l.admit(a).err(), Some(Outcome::OverHandshakeRate));
        drop(permits);
        assert!(l.admit([10, 0, 0, 9].into()).is_ok(), "other addresses have their own bucket");
    }
}
