//! Handshake and close records: flat JSON objects, one per line, on stdout. Only the
//! [`session`](crate::session) owners write them.
//!
//! Records go through a bounded queue to a writer thread, so a slow stdout consumer never stalls
//! a connection; past [`QUEUE`] waiting records they are dropped, counted and logged, never
//! silently. The writer writes them in batches, at most 10 ms late, and `RecordsWriter::finish`
//! waits for it at shutdown.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::outcome::{Outcome, Side};

/// Everything one handshake record says. Unknown values are written as `null`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HandshakeRecord {
    pub ts: String,
    pub event: &'static str,
    pub conn_id: String,
    pub client_addr: Option<SocketAddr>,
    pub sni: Option<String>,
    pub path: Option<String>,
    pub origin: Option<String>,
    pub user_agent: Option<String>,
    pub route: Option<String>,
    pub region: Option<String>,
    pub region_source: Option<&'static str>,
    pub token_present: bool,
    pub token_region: Option<String>,
    pub token_exp: Option<i64>,
    pub token_expired: Option<bool>,
    pub region_mismatch: Option<bool>,
    /// What the first message was: `ice` (a fresh connect asking for ICE servers), `sync` (a
    /// reconnect), `connect`; `null` when it could not be read.
    pub first_message: Option<String>,
    /// Whether the gateway's ICE servers were pointed at the relay's TURN (`null`: not asked for,
    /// or rewriting off on this route), and how many entries were.
    pub ice_rewritten: Option<bool>,
    pub ice_servers_rewritten: Option<u32>,
    pub upstream_url: Option<String>,
    pub upstream_addr: Option<SocketAddr>,
    pub upstream_status: Option<u16>,
    pub outcome: Option<Outcome>,
    pub error: Option<String>,
    pub tls_ms: Option<f64>,
    pub upstream_dns_ms: Option<f64>,
    pub upstream_proxy_ms: Option<f64>,
    pub upstream_connect_ms: Option<f64>,
    pub upstream_tls_ms: Option<f64>,
    pub upstream_ws_ms: Option<f64>,
    pub total_ms: Option<f64>,
}

impl HandshakeRecord {
    /// A record for a new connection attempt.
    pub fn new(conn_id: String, client_addr: SocketAddr, sni: Option<String>) -> Self {
        HandshakeRecord {
            event: "handshake",
            conn_id,
            client_addr: Some(client_addr),
            sni,
            ..Default::default()
        }
    }
}

/// The record written when a relayed connection ends.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CloseRecord {
    pub ts: String,
    pub event: &'static str,
    pub conn_id: String,
    pub client_addr: Option<SocketAddr>,
    pub route: Option<String>,
    pub region: Option<String>,
    pub upstream_url: Option<String>,
    pub outcome: Option<Outcome>,
    pub duration_ms: f64,
    pub closed_by: Option<Side>,
    pub close_code: Option<u16>,
    pub close_reason: Option<String>,
    /// What the side at fault did, when the relay failed the connection (`client_protocol_error`
    /// and the like).
    pub error: Option<String>,
    pub msgs_up: u64,
    pub msgs_down: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// Milliseconds with microsecond precision, as records carry them.
pub fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// How long the writer thread lets records gather after writing a batch: the most a record
/// waits beyond its connection's end.
const BATCH_WINDOW: Duration = Duration::from_millis(10);

/// Records waiting for the writer, at most. A stdout reader that falls this far behind costs
/// records (counted in `sigrelay_records_dropped_total`, and logged), never memory without bound
/// and never a stalled connection.
pub const QUEUE: usize = 65_536;

/// A cloneable handle that writes records.
#[derive(Clone)]
pub struct Records {
    tx: mpsc::Sender<String>,
    dropped: Arc<Dropped>,
}

/// Records dropped because the queue was full.
#[derive(Debug, Default)]
struct Dropped {
    counter: Counter,
    /// Dropped since the last log line, and when that was (seconds since the Unix epoch).
    since_log: AtomicU64,
    logged_at: AtomicU64,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Records")
    }
}

/// Waits for every record sent before it to be written.
pub struct RecordsWriter {
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Records {
    /// Records written as lines to stdout by a dedicated thread.
    pub fn stdout() -> (Records, RecordsWriter) {
        let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
        let thread = std::thread::Builder::new()
            .name("sigrelay-records".into())
            .spawn(move || {
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::new(stdout.lock());
                while let Some(line) = rx.blocking_recv() {
                    let mut ok = writeln!(out, "{line}").is_ok();
                    while let Ok(line) = rx.try_recv() {
                        ok &= writeln!(out, "{line}").is_ok();
                    }
                    ok &= out.flush().is_ok();
                    if !ok {
                        // Records are the product; losing them silently is not an option.
                        tracing::error!("cannot write records to stdout; records are being lost");
                    }
                    // Under load, let records gather: one write per window instead of a
                    // thread wake-up and a write per record. Idle, the thread just blocks.
                    std::thread::sleep(BATCH_WINDOW);
                }
            })
            .expect("spawning the records thread");
        (Records { tx, dropped: Arc::default() }, RecordsWriter { thread: Some(thread) })
    }

    /// Records delivered as JSON lines on a channel of `capacity` (for tests and embedding).
    pub fn channel(capacity: usize) -> (Records, mpsc::Receiver<String>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Records { tx, dropped: Arc::default() }, rx)
    }

    /// The count of records dropped because the queue was full, for the metrics.
    pub fn dropped_counter(&self) -> Counter {
        self.dropped.counter.clone()
    }

    /// Writes a handshake record, stamping its time.
    pub fn handshake(&self, record: &mut HandshakeRecord) {
        record.ts = now_rfc3339();
        self.send(record);
    }

    /// Writes a close record, stamping its time.
    pub fn close(&self, record: &mut CloseRecord) {
        record.event = "close";
        record.ts = now_rfc3339();
        self.send(record);
    }

    /// Queues a record without ever waiting: a full queue drops it, counted and logged (at most
    /// one log line a second).
    fn send<T: Serialize>(&self, record: &T) {
        let line = match serde_json::to_string(record) {
            Ok(line) => line,
            Err(e) => return tracing::error!(error = %e, "cannot serialize a record"),
        };
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                let d = &self.dropped;
                d.counter.inc();
                d.since_log.fetch_add(1, Relaxed);
                let now = unix_now() as u64;
                let last = d.logged_at.load(Relaxed);
                if now > last && d.logged_at.compare_exchange(last, now, Relaxed, Relaxed).is_ok() {
                    let dropped = d.since_log.swap(0, Relaxed);
                    tracing::error!(dropped, queue = QUEUE, "the records queue is full (stdout is not being read fast enough): records dropped");
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => tracing::error!("records writer is gone; a record was lost"),
        }
    }
}

impl RecordsWriter {
    /// Waits until every record sent so far is written. Call after the last `Records` clone is
    /// dropped, or it waits forever.
    pub fn finish(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Now, as RFC 3339 in UTC with milliseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Now, as unix seconds (what token `exp` and `nbf` are in).
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let (records, mut rx) = Records::channel(2);
        let started = std::time::Instant::now();
        for _ in 0..5 {
            records.handshake(&mut HandshakeRecord::new("C".into(), "127.0.0.1:1".parse().unwrap(), None));
        }
        assert!(started.elapsed() < Duration::from_secs(1), "sending never waits for the writer");
        assert_eq!(records.dropped_counter().get(), 3);
        assert!(rx.try_recv().is_ok() && rx.try_recv().is_ok() && rx.try_recv().is_err());
    }
}
