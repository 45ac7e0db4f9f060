//! The owners of a connection's records, so that "exactly one handshake record per attempt and
//! one close record per opened WebSocket" holds by construction:
//!
//! - a [`PendingHandshake`] is made for each attempt that needs a handshake record and is
//!   consumed by writing it: [`fail`](PendingHandshake::fail) with an outcome, or
//!   [`open`](PendingHandshake::open) once the WebSocket is relayed (or echoed by `/diag`);
//! - [`open`](PendingHandshake::open) returns an [`OpenSession`], consumed by
//!   [`finish`](OpenSession::finish), which writes the close record.
//!
//! Each owner counts its record in the metrics as it writes it. One dropped unfinished writes a
//! fallback record, and in debug builds fails an assertion unless the relay is shutting down
//! (the only time a connection's task may be dropped half-way).

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::frame;
use crate::limits::Permit;
use crate::metrics::RouteRegion;
use crate::outcome::{Outcome, Side};
use crate::pump::Counters;
use crate::records::{millis, CloseRecord, HandshakeRecord};
use crate::registry::{LiveConn, Registered};

/// What the listener knows about a connection before any request: who, and over what.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The TCP peer, or the address a PROXY protocol header gave.
    pub client_addr: SocketAddr,
    pub sni: Option<String>,
    /// `None` on a plain (no TLS) listener.
    pub tls_ms: Option<f64>,
}

/// What the listener knows about a connection its requests arrive on.
pub struct ConnContext {
    pub app: Arc<App>,
    pub peer: Peer,
    /// When the connection was accepted: everything before its upgrade must fit in
    /// `handshake_timeout` from here.
    pub accepted: Instant,
    /// The connection's place under the limits; the request that upgrades it takes it along.
    permit: Mutex<Option<Permit>>,
    /// Set once a request arrives, so a connection that never sends one still gets a record.
    saw_request: AtomicBool,
}

impl ConnContext {
    /// The context of a connection from `peer`, accepted at `accepted` and counted by `permit`.
    pub fn new(app: &Arc<App>, peer: Peer, accepted: Instant, permit: Permit) -> ConnContext {
        ConnContext { app: app.clone(), peer, accepted, permit: Mutex::new(Some(permit)), saw_request: AtomicBool::new(false) }
    }

    /// Notes that a request arrived.
    pub fn note_request(&self) {
        self.saw_request.store(true, Ordering::Relaxed);
    }

    /// Whether any request arrived on the connection.
    pub fn saw_request(&self) -> bool {
        self.saw_request.load(Ordering::Relaxed)
    }

    /// Whether the connection is known by its client's address (see [`Permit::names_a_client`]).
    pub fn names_a_client(&self) -> bool {
        self.permit.lock().unwrap().as_ref().is_some_and(Permit::names_a_client)
    }

    /// Which limit an upgrade from `client` is over, if any, once the connection counts under
    /// `client`'s address (the client a trusted proxy names): the total cap (then it is refused
    /// with 503, guarding the descriptor budget), the per-address limit, or, when `!rate_ok`,
    /// the handshake rate.
    pub fn over_limit(&self, client: SocketAddr, rate_ok: bool) -> Option<Outcome> {
        let limiter = &self.app.limiter;
        let mut permit = self.permit.lock().unwrap();
        let permit = permit.as_mut().expect("only the request that upgrades takes the permit");
        if client != self.peer.client_addr {
            // Past the limit it is refused just below, with a close the browser can read.
            let _ = limiter.attribute(permit, client.ip());
        }
        limiter.over(permit).or((!rate_ok).then_some(Outcome::OverHandshakeRate))
    }

    /// The connection's permit, for the request that upgrades it to take along.
    pub fn take_permit(&self) -> Permit {
        self.permit.lock().unwrap().take().expect("a connection upgrades once")
    }
}

/// A new connection id: a ULID, unique across a fleet without coordination.
fn new_conn_id() -> String {
    ulid::Ulid::new().to_string()
}

/// How long the relay's own close frame to a browser it will not relay may take to write.
const REJECT_WRITE: Duration = Duration::from_secs(2);

/// The handshake record of one connection attempt, which only this type writes.
#[must_use = "a handshake record is written by fail() or open()"]
pub struct PendingHandshake {
    app: Arc<App>,
    /// `None` once written.
    record: Option<Box<HandshakeRecord>>,
    /// When the attempt started; `total_ms` counts from here.
    started: Instant,
}

impl PendingHandshake {
    /// A record for a new attempt by `peer` that started at `started`.
    pub fn new(app: &Arc<App>, peer: &Peer, started: Instant) -> PendingHandshake {
        let record = HandshakeRecord {
            tls_ms: peer.tls_ms,
            ..HandshakeRecord::new(new_conn_id(), peer.client_addr, peer.sni.clone())
        };
        PendingHandshake { app: app.clone(), record: Some(Box::new(record)), started }
    }

    /// The connection id the record (and every close reason the relay sends) carries.
    pub fn conn_id(&self) -> &str {
        &self.record().conn_id
    }

    /// The record as learned so far.
    pub fn record(&self) -> &HandshakeRecord {
        self.record.as_deref().expect("the record is written only by consuming self")
    }

    /// The record, to fill in fields as they are learned.
    pub fn record_mut(&mut self) -> &mut HandshakeRecord {
        self.record.as_deref_mut().expect("the record is written only by consuming self")
    }

    /// When the attempt started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Writes the record of an attempt that failed; returns its connection id.
    pub fn fail(mut self, outcome: Outcome, error: impl Into<String>) -> String {
        let record = self.record_mut();
        record.outcome = Some(outcome);
        record.error = Some(error.into());
        let conn_id = record.conn_id.clone();
        self.write();
        conn_id
    }

    /// Counts an attempt that failed in the metrics without writing its record: for connections
    /// that failed before a request once their address has used up its handshake tokens, so a
    /// flood of them cannot push real records out of the queue.
    pub fn suppress(mut self, outcome: Outcome) {
        if let Some(mut record) = self.record.take() {
            record.outcome = Some(outcome);
            self.app.metrics.handshake(&record);
            self.app.metrics.records_suppressed.inc();
        }
    }

    /// Writes the record of an attempt that became a WebSocket (outcome `ok`) and returns the
    /// owner of its close record. `live` registers it in `/connections` and the live gauge (the
    /// relayed routes do; the `/diag` echo does not). `permit` is held until the session ends.
    pub fn open(mut self, live: bool, permit: Option<Permit>) -> OpenSession {
        let record = self.record_mut();
        record.outcome = Some(Outcome::Ok);
        let close = CloseRecord {
            conn_id: record.conn_id.clone(),
            client_addr: record.client_addr,
            route: record.route.clone(),
            region: record.region.clone(),
            upstream_url: record.upstream_url.clone(),
            ..Default::default()
        };
        let app = self.app.clone();
        self.write();
        let counters = Arc::new(Counters::default());
        let operator = CancellationToken::new();
        let live = live.then(|| {
            let gauge = app
                .metrics
                .live
                .get_or_create(&RouteRegion {
                    route: close.route.clone().unwrap_or_default(),
                    region: close.region.clone().unwrap_or_default(),
                })
                .clone();
            app.registry.insert(
                LiveConn {
                    conn_id: close.conn_id.clone(),
                    client_addr: close.client_addr,
                    route: close.route.clone(),
                    region: close.region.clone(),
                    upstream: close.upstream_url.clone(),
                    started: Instant::now(),
                    counters: counters.clone(),
                    operator: operator.clone(),
                },
                gauge,
            )
        });
        OpenSession { app, close: Some(close), live, counters, operator, opened: Instant::now(), permit }
    }

    /// Waits for hyper to hand over the upgraded connection, which happens once the 101 has
    /// been written, within `limit`. On failure the record is written and `None` returned.
    pub async fn upgraded(self, upgrade: OnUpgrade, limit: Duration) -> Option<(PendingHandshake, TokioIo<Upgraded>)> {
        match tokio::time::timeout(limit, upgrade).await {
            Ok(Ok(io)) => Some((self, TokioIo::new(io))),
            Ok(Err(e)) => {
                self.fail(Outcome::ClientGone, format!("upgrade failed: {e}"));
                None
            }
            Err(_) => {
                self.fail(Outcome::ClientTimeout, "the 101 could not be delivered within handshake_timeout");
                None
            }
        }
    }

    /// Ends an accepted WebSocket that will not be relayed: writes the record, then tells the
    /// browser why in a close frame (the outcome's code, reason `<outcome> conn=<id>`).
    pub async fn reject<S: AsyncWrite + Unpin>(self, client: &mut S, outcome: Outcome, error: impl Into<String>) {
        let conn_id = self.fail(outcome, error);
        let frame = frame::close_frame(outcome.client_close_code(), &format!("{outcome} conn={conn_id}"), None);
        let _ = tokio::time::timeout(REJECT_WRITE, async {
            client.write_all(&frame).await?;
            client.shutdown().await
        })
        .await;
    }

    fn write(&mut self) {
        if let Some(mut record) = self.record.take() {
            record.total_ms = Some(millis(self.started.elapsed()));
            self.app.metrics.handshake(&record);
            self.app.records.handshake(&mut record);
        }
    }
}

impl Drop for PendingHandshake {
    fn drop(&mut self) {
        let Some(record) = self.record.as_deref_mut() else { return };
        let stopping = self.app.shutdown.drain.is_cancelled();
        record.outcome = Some(if stopping { Outcome::Shutdown } else { Outcome::RelayError });
        record.error = Some("the connection's task ended before its handshake had an outcome".into());
        self.write();
        debug_assert!(stopping || std::thread::panicking(), "a handshake record was neither failed nor opened");
    }
}

/// How an opened WebSocket ended, for its close record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closing {
    pub outcome: Outcome,
    pub closed_by: Side,
    /// The code of the close that ended it: the peer's own, or the one the relay sent.
    pub close_code: Option<u16>,
    pub close_reason: Option<String>,
    /// What the side at fault did, when one broke the protocol.
    pub error: Option<String>,
}

/// An opened WebSocket's close record, which only this type writes, and the resources the
/// connection holds until it ends (its `/connections` entry, live gauge and limit permit).
#[must_use = "the close record is written by finish()"]
pub struct OpenSession {
    app: Arc<App>,
    /// `None` once written.
    close: Option<CloseRecord>,
    live: Option<Registered>,
    counters: Arc<Counters>,
    operator: CancellationToken,
    opened: Instant,
    permit: Option<Permit>,
}

impl OpenSession {
    /// Messages and bytes so far, shared with `/connections`.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Cancelled when an operator closes the connection through the admin API.
    pub fn operator(&self) -> &CancellationToken {
        &self.operator
    }

    /// The connection id.
    pub fn conn_id(&self) -> &str {
        &self.close.as_ref().expect("written only by consuming self").conn_id
    }

    /// Writes the close record.
    pub fn finish(mut self, closing: Closing) {
        self.write(closing);
    }

    fn write(&mut self, closing: Closing) {
        let Some(mut close) = self.close.take() else { return };
        // Off /connections, the live gauge and the limits before the close record says the
        // connection ended, so a client that reads the record and reconnects is not refused.
        drop(self.live.take());
        drop(self.permit.take());
        let c = &self.counters;
        close.outcome = Some(closing.outcome);
        close.closed_by = Some(closing.closed_by);
        close.close_code = closing.close_code;
        close.close_reason = closing.close_reason;
        close.error = closing.error;
        close.duration_ms = millis(self.opened.elapsed());
        close.msgs_up = c.msgs_up.load(Relaxed);
        close.msgs_down = c.msgs_down.load(Relaxed);
        close.bytes_up = c.bytes_up.load(Relaxed);
        close.bytes_down = c.bytes_down.load(Relaxed);
        self.app.metrics.close(&close);
        self.app.records.close(&mut close);
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        if self.close.is_none() {
            return;
        }
        let stopping = self.app.shutdown.drain.is_cancelled();
        let outcome = if stopping { Outcome::Shutdown } else { Outcome::RelayError };
        self.write(Closing { outcome, closed_by: Side::Relay, close_code: None, close_reason: None, error: None });
        debug_assert!(stopping || std::thread::panicking(), "a close record was never finished");
    }
}
