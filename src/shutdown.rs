//! Shutdown in order: stop accepting, let live connections finish for `drain_timeout`, then
//! close the rest with 1012 on both sides and wait for them to go.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::listener::Acceptors;
use crate::App;

/// How long relayed connections get to finish their close handshakes after the 1012.
pub(crate) const FORCE_GRACE: Duration = Duration::from_secs(10);

/// The two stages of shutdown.
#[derive(Debug, Default, Clone)]
pub struct Signals {
    /// Stop accepting; idle HTTP connections close; live WebSockets go on.
    pub drain: CancellationToken,
    /// Close every live WebSocket now, with 1012 on both sides.
    pub close: CancellationToken,
}

/// Runs the shutdown sequence; returns when every connection task has ended (or the grace ran out).
pub async fn drain(app: &App, accepting: &mut Acceptors) {
    app.shutdown.drain.cancel();
    accepting.stopped().await;
    app.tracker.close();
    let live = app.registry.len();
    if live > 0 {
        tracing::info!(live, drain_timeout = ?app.current().config.server.drain_timeout, "draining live connections");
    }
    if tokio::time::timeout(app.current().config.server.drain_timeout, app.tracker.wait()).await.is_err() {
        tracing::info!(live = app.registry.len(), "drain timeout reached; closing the rest with 1012");
        app.shutdown.close.cancel();
        if tokio::time::timeout(FORCE_GRACE, app.tracker.wait()).await.is_err() {
            tracing::warn!(tasks = app.tracker.len(), "connections still open after the forced close");
        }
    }
}
