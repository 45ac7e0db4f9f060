//! sigrelay: a TLS-terminating WebSocket relay for Twilio Video's signalling and insights
//! sockets. It accepts the browser's WebSocket on the company's own domain, forwards it to the
//! region-correct Twilio gateway, and writes one handshake record (and one close record) per
//! connection. ARCHITECTURE.md walks one connection through these modules in order:
//!
//! - [`server`]: [`run`] and [`serve`], the drain sequence; [`app`]: the shared state;
//! - [`listener`]: accepts TCP on every thread, the PROXY header, TLS, HTTP/1.1;
//! - [`request`]: answers each request: probes, [`diag`], or a route's upgrade ([`upgrade`]
//!   validates it, [`route`] matches it, [`forwarded`] finds the client's address);
//! - [`relay`]: the relayed WebSocket: [`first_message`], [`route::decide`], [`upstream`],
//!   then the frame [`pump`] ([`frame`] is its codec);
//! - [`session`]: the one owner of each handshake and close record ([`records`] writes them,
//!   [`metrics`] counts them, [`outcome`] names them);
//! - [`admin`], [`registry`], [`limits`], [`shutdown`], [`systemd`], [`tls`], [`proxy_protocol`],
//!   [`token`], [`probe`], [`healthcheck`], [`respond`]; [`tools`] beside it all.

pub mod admin;
pub mod app;
pub mod config;
pub mod diag;
pub mod first_message;
pub mod forwarded;
pub mod frame;
pub mod healthcheck;
pub mod ice;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod outcome;
pub mod prefixed;
pub mod probe;
pub mod proxy_protocol;
pub mod pump;
pub mod records;
pub mod registry;
pub mod relay;
pub mod request;
pub mod respond;
pub mod route;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod systemd;
pub mod tls;
pub mod tls_stream;
pub mod token;
pub mod turn;
#[cfg(feature = "tools")]
pub mod tools;
pub mod upgrade;
pub mod upstream;
pub mod utf8;

pub use app::{App, Current, StartError};
pub use config::Config;
pub use records::Records;
pub use server::{run, serve};
