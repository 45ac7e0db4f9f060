//! The registry of live relayed connections. Entries are held by drop guards, so every way a
//! connection ends removes its entry.

use std::net::SocketAddr;
use std::sync::Arc;

use dashmap::DashMap;
use tokio::time::Instant;

use crate::pump::Counters;

/// One live relayed connection.
#[derive(Debug)]
pub struct LiveConn {
    pub conn_id: String,
    pub client_addr: Option<SocketAddr>,
    pub route: Option<String>,
    pub region: Option<String>,
    pub upstream: Option<String>,
    pub started: Instant,
    pub counters: Arc<Counters>,
    /// Cancelled to close the connection from the admin API.
    pub operator: tokio_util::sync::CancellationToken,
}

impl LiveConn {
    /// The connection as the admin API lists it.
    pub fn to_json(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.counters;
        serde_json::json!({
            "conn_id": self.conn_id,
            "client_addr": self.client_addr,
            "route": self.route,
            "region": self.region,
            "upstream": self.upstream,
            "age_ms": self.started.elapsed().as_millis() as u64,
            "msgs_up": c.msgs_up.load(Relaxed),
            "msgs_down": c.msgs_down.load(Relaxed),
            "bytes_up": c.bytes_up.load(Relaxed),
            "bytes_down": c.bytes_down.load(Relaxed),
        })
    }
}

/// Live connections by `conn_id`.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    conns: Arc<DashMap<String, LiveConn>>,
}

/// Removes its connection from the registry when dropped.
#[must_use = "the entry is removed when the guard is dropped"]
pub struct Registered {
    conns: Arc<DashMap<String, LiveConn>>,
    conn_id: String,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Registry {
    /// Adds a connection for as long as the returned guard lives; `gauge` (the live-connections
    /// metric for its route and region) counts it for as long too.
    pub fn insert(&self, conn: LiveConn, gauge: prometheus_client::metrics::gauge::Gauge) -> Registered {
        let conn_id = conn.conn_id.clone();
        self.conns.insert(conn_id.clone(), conn);
        gauge.inc();
        Registered { conns: self.conns.clone(), conn_id, gauge }
    }

    /// Every live connection, oldest first, as the admin API lists them.
    pub fn list(&self) -> Vec<serde_json::Value> {
        let mut conns: Vec<_> = self.conns.iter().map(|c| (c.started, c.to_json())).collect();
        conns.sort_by_key(|(started, _)| *started);
        conns.into_iter().map(|(_, json)| json).collect()
    }

    /// Asks a live connection to close (1001, "closed by operator"); false if there is none.
    pub fn close(&self, conn_id: &str) -> bool {
        match self.conns.get(conn_id) {
            Some(c) => {
                c.operator.cancel();
                true
            }
            None => false,
        }
    }

    /// How many relayed connections are live.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether no relayed connection is live.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.conns.remove(&self.conn_id);
        self.gauge.dec();
    }
}
