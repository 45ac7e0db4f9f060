//! sigrelay: a TLS-terminating WebSocket relay for Twilio Video's signalling and insights
//! sockets. It accepts the browser's WebSocket on the company's own domain, forwards it to the
//! region-correct Twilio gateway, and writes one handshake record (and one close record) per
//! connection.
//!
//! Where things happen:
//! - [`listener`]: accepts TCP, runs the TLS handshake, serves HTTP/1.1;
//! - [`handshake`]: routes the request, validates the upgrade, answers 101;
//! - [`relay`]: reads the first message's token, connects upstream ([`upstream`]), runs the
//!   frame [`pump`];
//! - [`records`]: the handshake and close records; [`outcome`]: their outcome words.

pub mod config;
pub mod frame;
pub mod handshake;
pub mod listener;
pub mod mock_gateway;
pub mod outcome;
pub mod pki;
pub mod pump;
pub mod records;
pub mod registry;
pub mod relay;
pub mod routing;
pub mod shutdown;
pub mod tls;
pub mod token;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use records::Records;

/// State shared by every connection of one running relay.
pub struct App {
    pub config: Config,
    pub router: routing::Router,
    pub connector: upstream::Connector,
    pub records: Records,
    pub registry: registry::Registry,
    pub shutdown: shutdown::Signals,
    /// Every connection and session task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    pub tls: TlsAcceptor,
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

impl App {
    /// Builds the shared state: TLS on both hops, routes, connector.
    pub fn new(config: Config, records: Records) -> Result<Arc<App>, StartError> {
        let server_tls = tls::server_config(&config)?;
        let client_tls = tls::client_config(&config)?;
        Ok(Arc::new(App {
            router: routing::Router::new(&config),
            connector: upstream::Connector::new(&config, client_tls),
            records,
            registry: registry::Registry::default(),
            shutdown: shutdown::Signals::default(),
            tracker: TaskTracker::new(),
            tls: TlsAcceptor::from(server_tls),
            config,
        }))
    }
}

/// Serves on an already-bound listener until `shutdown` resolves, then drains: stops accepting,
/// gives live connections `drain_timeout`, closes the rest with 1012, and returns.
pub async fn serve(app: Arc<App>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let accepting = app.tracker.spawn(listener::accept_loop(listener, app.clone()));
    shutdown.await;
    shutdown::drain(&app, accepting).await;
}

/// Runs the relay with records on stdout: the entry point `main` uses.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let (records, writer) = Records::stdout();
    let app = App::new(config, records)?;
    serve(app, listener, shutdown).await;
    // The writer thread ends once every Records handle is gone; a task still stuck after the
    // forced close must not keep the process alive.
    let _ = tokio::time::timeout(Duration::from_secs(5), tokio::task::spawn_blocking(|| writer.finish())).await;
    Ok(())
}
