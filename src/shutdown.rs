//! The two stages of shutdown every connection watches, and the process signals that start it.
//! The sequence itself (stop accepting, drain, force) is [`crate::server`]'s.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long relayed connections get to finish their close handshakes after the 1012.
pub const FORCE_GRACE: Duration = Duration::from_secs(10);

/// The two stages of shutdown.
#[derive(Debug, Default, Clone)]
pub struct Signals {
    /// Stop accepting; idle HTTP connections close; live WebSockets go on.
    pub drain: CancellationToken,
    /// Close every live WebSocket now, with 1012 on both sides.
    pub close: CancellationToken,
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits the process at once.
pub async fn terminate_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutdown signal received; draining (send it again to exit at once)");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("sigrelay: second signal, exiting now");
        std::process::exit(130);
    });
}

/// On every SIGHUP, `load` (run off the async threads) reads the configuration again; each
/// file that loads is sent on the returned channel, each that does not is logged with every
/// problem and skipped, so the running configuration stays.
pub fn reload_on_sighup<F>(load: F) -> tokio::sync::mpsc::Receiver<crate::Config>
where
    F: Fn() -> Result<crate::Config, String> + Send + Sync + 'static,
{
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let load = std::sync::Arc::new(load);
    tokio::spawn(async move {
        let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
        while hup.recv().await.is_some() {
            let load = load.clone();
            match tokio::task::spawn_blocking(move || load()).await.unwrap_or_else(|e| Err(e.to_string())) {
                Ok(config) => {
                    if tx.send(config).await.is_err() {
                        return;
                    }
                }
                Err(e) => tracing::error!("reload rejected, running configuration kept: {e}"),
            }
        }
    });
    rx
}
