//! The relay as a library function: [`run`] serves an already-bound listener until shutdown, then
//! drains in order (stop accepting, give live connections `drain_timeout`, close the rest with
//! 1012, wait for them).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::app::{App, StartError};
use crate::config::Config;
use crate::listener::Acceptors;
use crate::records::Records;
use crate::shutdown::FORCE_GRACE;
use crate::tls::TlsError;

/// Everything `sigrelay check-config` checks beyond the file itself: that the certificates and
/// trust anchors load. Returns a one-line summary, or every problem.
pub fn check(config: &Config) -> Result<String, Vec<String>> {
    let mut problems = Vec::new();
    let dev_pending = !config.server.cert.exists() && crate::config::is_dev_cert_path(&config.server.cert);
    if !dev_pending {
        if let Err(e) = crate::tls::CertStore::load(config) {
            problems.push(e.to_string());
        }
    }
    if let Err(e) = crate::tls::client_config(config) {
        problems.push(e.to_string());
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let note = if dev_pending { " (a self-signed dev certificate will be generated at start)" } else { "" };
    Ok(format!("{} route(s), {} region(s){note}", config.routes.len(), config.regions.len()))
}

/// What `sigrelay run` does before binding: the throwaway dev certificate if one is due, loud
/// warnings for setups only fit for testing, and the descriptor limit raised to the hard one.
pub fn prepare(config: &Config) -> Result<(), TlsError> {
    if crate::tls::ensure_dev_cert(&config.server.cert, &config.server.key)? {
        tracing::warn!(
            cert = %config.server.cert.display(),
            "GENERATED A SELF-SIGNED CERTIFICATE FOR localhost. Browsers will not trust it. \
             For anything but local testing, set [server] cert and key to a real certificate."
        );
    }
    if !config.server.tls {
        tracing::warn!(
            "TLS IS OFF ([server] tls = false): serving plain HTTP. Only do this behind a load \
             balancer that terminates TLS, on a network nobody else can reach."
        );
    }
    // Each relayed connection holds two descriptors; take all the kernel allows.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(nofile = n, "file-descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file-descriptor limit"),
    }
    Ok(())
}

/// How often certificate files are checked for changes.
const CERT_POLL: Duration = Duration::from_secs(1);

/// How long the records writer gets to flush at exit.
const RECORDS_FLUSH: Duration = Duration::from_secs(5);

/// Runs the relay with records on stdout until `shutdown` resolves, putting each configuration
/// `reloads` yields in force (see [`App::reload`]): the entry point `sigrelay run` uses.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    mut reloads: mpsc::Receiver<Config>,
) -> Result<(), StartError> {
    let (records, writer) = Records::stdout();
    let app = App::new(config, records)?;
    let reloader = {
        let app = app.clone();
        tokio::spawn(async move {
            while let Some(config) = reloads.recv().await {
                // systemd hears of a reload only while the relay is ready: before the accept
                // threads are up the READY=1 that follows would claim start-up had finished, and
                // during a drain it would undo STOPPING=1. The configuration is applied all the same.
                let told = app.ready() && app.systemd.reloading();
                let reloading = app.clone();
                // File reads and key parsing stay off this thread, which also serves connections.
                match tokio::task::spawn_blocking(move || reloading.reload(config)).await.expect("reload does not panic") {
                    Ok(()) => tracing::info!("configuration reloaded"),
                    Err(e) => tracing::error!("reload rejected, running configuration kept: {e}"),
                }
                if told {
                    app.systemd.ready("configuration reloaded");
                }
            }
        })
    };
    let served = serve(app.clone(), listener, shutdown).await;
    reloader.abort();
    drop(app);
    // The writer thread ends once every Records handle is gone; a task still stuck after the
    // forced close must not keep the process alive.
    let _ = tokio::time::timeout(RECORDS_FLUSH, tokio::task::spawn_blocking(|| writer.finish())).await;
    served
}

/// Serves on an already-bound listener until `shutdown` resolves, then drains: stops accepting
/// (`/readyz` turns 503), gives live connections `drain_timeout`, closes the rest with 1012
/// spread over `drain_jitter`, and returns.
pub async fn serve(app: Arc<App>, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let background = CancellationToken::new();
    let mut helpers = Vec::new();
    let current = app.current();
    if let Some(addr) = current.config.admin.listen {
        let admin = TcpListener::bind(addr).await.map_err(|source| StartError::Admin { addr, source })?;
        let bound = admin.local_addr().map_err(|source| StartError::Admin { addr, source })?;
        let _ = app.admin_addr.set(bound);
        tracing::info!(admin = %bound, "admin listener up (/metrics, /connections, /readyz)");
        if let Some(f) = &current.config.admin.token_file {
            let token = std::fs::read_to_string(f).map_err(StartError::AdminToken)?.trim().to_string();
            app.admin_token.store(Some(Arc::new(token)));
        }
        helpers.push(tokio::spawn(crate::admin::serve(admin, app.clone(), current.config.admin.clone(), background.clone())));
    }
    helpers.push(tokio::spawn(background_chores(app.clone(), background.clone())));
    if current.config.turn.enabled {
        let told = current.turn_public_url.as_deref().unwrap_or("(nothing: ICE servers pass unchanged)");
        tracing::info!(upstream = %current.config.turn.upstream.url, browsers_told = told, "TURN over TLS relayed on the main listener");
    }
    let threads = current.config.server.threads;
    let mut accepting = match Acceptors::start(listener, app.clone(), threads).await {
        Ok(a) => a,
        Err(e) => {
            background.cancel();
            return Err(StartError::Threads(e));
        }
    };
    app.set_accepting();
    app.systemd.ready(&format!("accepting on {threads} thread(s)"));
    shutdown.await;
    drain(&app, &mut accepting).await;
    accepting.join().await;
    background.cancel();
    for h in helpers {
        let _ = h.await;
    }
    Ok(())
}

/// The shutdown sequence; returns when every connection task has ended (or the grace ran out).
async fn drain(app: &App, accepting: &mut Acceptors) {
    app.shutdown.drain.cancel();
    app.systemd.stopping("draining");
    accepting.stopped().await;
    app.tracker.close();
    let drain_timeout = app.current().config.server.drain_timeout;
    let live = app.registry.len();
    if live > 0 {
        tracing::info!(live, ?drain_timeout, "draining live connections");
    }
    if tokio::time::timeout(drain_timeout, app.tracker.wait()).await.is_err() {
        tracing::info!(live = app.registry.len(), "drain timeout reached; closing the rest with 1012");
        app.shutdown.close.cancel();
        if tokio::time::timeout(FORCE_GRACE, app.tracker.wait()).await.is_err() {
            tracing::warn!(tasks = app.tracker.len(), "connections still open after the forced close");
        }
    }
}

/// Certificate files checked for changes; idle rate-limit buckets forgotten.
async fn background_chores(app: Arc<App>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(CERT_POLL);
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        ticks += 1;
        // File reads and key parsing stay off this thread, which also serves connections.
        let (certs, current) = (app.certs.clone(), app.current());
        match tokio::task::spawn_blocking(move || certs.reload(&current.config)).await.expect("the reload check does not panic") {
            Ok(true) => {
                app.metrics.set_certificates(&app.certs.expiry());
                tracing::info!("certificate files changed; new handshakes use the new certificates")
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "certificate files changed but cannot be used; keeping the ones in service"),
        }
        if ticks % 60 == 0 {
            app.limiter.sweep();
        }
    }
}
