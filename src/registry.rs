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
}

impl Registry {
    /// Adds a connection for as long as the returned guard lives.
    pub fn insert(&self, conn: LiveConn) -> Registered {
        let conn_id = conn.conn_id.clone();
        self.conns.insert(conn_id.clone(), conn);
        Registered { conns: self.conns.clone(), conn_id }
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
    }
}
