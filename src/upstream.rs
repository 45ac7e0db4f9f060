//! Connecting to a gateway: DNS, TCP, TLS and the WebSocket upgrade, each phase timed, all of
//! them together bounded by `connect_timeout`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::config::Config;
use crate::outcome::Outcome;
use crate::routing::UpstreamTarget;

/// The phase of a gateway connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Dns,
    Connect,
    Proxy,
    Tls,
    WebSocket,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Dns => "dns",
            Phase::Connect => "connect",
            Phase::Proxy => "proxy",
            Phase::Tls => "tls",
            Phase::WebSocket => "websocket",
        })
    }
}

/// Why the gateway could not be reached. Every variant is the upstream's side.
#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("dns: {0}")]
    Dns(String),
    #[error("connect: {0}")]
    Connect(String),
    #[error("proxy: {0}")]
    Proxy(String),
    #[error("timeout in the {phase} phase after {}", humantime::format_duration(*.after))]
    Timeout { phase: Phase, after: Duration },
    #[error("tls: {0}")]
    Tls(String),
    #[error("gateway answered the upgrade with HTTP {status}")]
    Rejected { status: u16 },
    #[error("websocket handshake: {0}")]
    Protocol(String),
}

impl UpstreamError {
    /// The handshake record's outcome.
    pub fn outcome(&self) -> Outcome {
        match self {
            UpstreamError::Dns(_) => Outcome::UpstreamDnsError,
            UpstreamError::Connect(_) => Outcome::UpstreamConnectError,
            UpstreamError::Proxy(_) => Outcome::UpstreamProxyError,
            UpstreamError::Timeout { .. } => Outcome::UpstreamTimeout,
            UpstreamError::Tls(_) => Outcome::UpstreamTlsError,
            UpstreamError::Rejected { .. } => Outcome::UpstreamRejected,
            UpstreamError::Protocol(_) => Outcome::UpstreamProtocolError,
        }
    }
}

/// How long each finished phase took.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub dns: Option<Duration>,
    pub proxy: Option<Duration>,
    pub connect: Option<Duration>,
    pub tls: Option<Duration>,
    pub websocket: Option<Duration>,
}

/// Browser headers passed on to the gateway. Cookie and Authorization never are.
#[derive(Debug, Clone, Default)]
pub struct ForwardHeaders {
    pub user_agent: Option<HeaderValue>,
    pub origin: Option<HeaderValue>,
    pub forwarded_for: Option<HeaderValue>,
}

/// A relayed gateway connection, after its 101.
pub struct Connected {
    pub io: TokioIo<Upgraded>,
    pub addr: SocketAddr,
    pub status: u16,
}

/// Opens gateway connections.
#[derive(Clone)]
pub struct Connector {
    tls: TlsConnector,
    resolve: Arc<BTreeMap<String, SocketAddr>>,
    system_dns: bool,
    timeout: Duration,
    proxy: Option<(String, u16)>,
}

impl Connector {
    /// A connector with the config's trust anchors, overrides and timeout.
    pub fn new(config: &Config, tls: Arc<rustls::ClientConfig>) -> Connector {
        Connector {
            tls: TlsConnector::from(tls),
            resolve: Arc::new(config.upstream.resolve.clone()),
            system_dns: config.upstream.system_dns,
            timeout: config.upstream.connect_timeout,
            proxy: config.upstream.proxy.clone(),
        }
    }

    /// Connects and upgrades, recording each finished phase in `timings`.
    pub async fn connect(
        &self,
        target: &UpstreamTarget,
        headers: &ForwardHeaders,
        timings: &mut Timings,
    ) -> Result<Connected, UpstreamError> {
        let started = Instant::now();
        let mut phase = Phase::Dns;
        let attempt = self.phases(target, headers, &mut phase, timings);
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout { phase, after: started.elapsed() }),
        }
    }

    async fn phases(
        &self,
        target: &UpstreamTarget,
        headers: &ForwardHeaders,
        phase: &mut Phase,
        timings: &mut Timings,
    ) -> Result<Connected, UpstreamError> {
        // Through a proxy, DNS and TCP are for the proxy; the proxy resolves the gateway.
        let (host, port) = match &self.proxy {
            Some((h, p)) => (h.as_str(), *p),
            None => (target.host.as_str(), target.port),
        };
        let t = Instant::now();
        let addrs = self.resolve(host, port).await?;
        timings.dns = Some(t.elapsed());

        *phase = Phase::Connect;
        let t = Instant::now();
        let (mut tcp, mut addr) = connect_any(&addrs).await?;
        timings.connect = Some(t.elapsed());

        if self.proxy.is_some() {
            *phase = Phase::Proxy;
            let t = Instant::now();
            // A resolve override still names where the gateway is.
            let authority = match self.resolve.get(&target.host) {
                Some(a) => a.to_string(),
                None => format!("{}:{}", target.host, target.port),
            };
            connect_through_proxy(&mut tcp, &authority).await?;
            if let Some(a) = self.resolve.get(&target.host) {
                addr = *a;
            }
            timings.proxy = Some(t.elapsed());
        }

        *phase = Phase::Tls;
        let t = Instant::now();
        let tls = self
            .tls
            .connect(target.server_name.clone(), tcp)
            .await
            .map_err(|e| UpstreamError::Tls(e.to_string()))?;
        timings.tls = Some(t.elapsed());

        *phase = Phase::WebSocket;
        let t = Instant::now();
        let (io, status) = upgrade(TokioIo::new(tls), target, headers).await?;
        timings.websocket = Some(t.elapsed());
        Ok(Connected { io, addr, status })
    }

    async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, UpstreamError> {
        if let Some(addr) = self.resolve.get(host) {
            return Ok(vec![*addr]);
        }
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if !self.system_dns {
            return Err(UpstreamError::Dns(format!(
                "{host} is not in [upstream.resolve] and upstream.system_dns is off"
            )));
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| UpstreamError::Dns(format!("{host}: {e}")))?
            .collect();
        if addrs.is_empty() {
            return Err(UpstreamError::Dns(format!("{host}: no addresses")));
        }
        Ok(addrs)
    }
}

/// Asks an HTTP proxy to open a tunnel (`CONNECT`) and reads its answer, no further.
async fn connect_through_proxy(tcp: &mut TcpStream, authority: &str) -> Result<(), UpstreamError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = |e: std::io::Error| UpstreamError::Proxy(e.to_string());
    tcp.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .map_err(io)?;
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    // Byte by byte: nothing after the answer's blank line may be consumed, it is the tunnel's.
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 {
            return Err(UpstreamError::Proxy("answer head too long".into()));
        }
        if tcp.read(&mut byte).await.map_err(io)? == 0 {
            return Err(UpstreamError::Proxy("closed the connection before answering CONNECT".into()));
        }
        head.push(byte[0]);
    }
    let status_line = String::from_utf8_lossy(&head[..head.iter().position(|&b| b == b'\r').unwrap_or(0)]).into_owned();
    let ok = status_line.split_whitespace().nth(1).is_some_and(|code| code.starts_with('2'));
    if !ok {
        return Err(UpstreamError::Proxy(format!("CONNECT {authority} answered {status_line:?}")));
    }
    Ok(())
}

/// Tries each address in turn.
async fn connect_any(addrs: &[SocketAddr]) -> Result<(TcpStream, SocketAddr), UpstreamError> {
    let mut errors = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        // A black-holed address must not eat the whole connect_timeout while others remain.
        let attempt = TcpStream::connect(addr);
        let result = if i + 1 < addrs.len() {
            tokio::time::timeout(PER_ADDRESS, attempt).await.unwrap_or_else(|_| {
                Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 1s, trying the next address"))
            })
        } else {
            attempt.await
        };
        match result {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                return Ok((tcp, *addr));
            }
            Err(e) => errors.push(format!("{addr}: {e}")),
        }
    }
    Err(UpstreamError::Connect(errors.join("; ")))
}

/// How long one of several gateway addresses gets to accept before the next is tried.
const PER_ADDRESS: Duration = Duration::from_secs(1);

/// Sends the upgrade request as an HTTP/1.1 client and checks the 101. hyper keeps any bytes the
/// gateway sent after its response inside the returned stream.
async fn upgrade<T>(
    io: TokioIo<T>,
    target: &UpstreamTarget,
    headers: &ForwardHeaders,
) -> Result<(TokioIo<Upgraded>, u16), UpstreamError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let protocol = |e: hyper::Error| UpstreamError::Protocol(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(protocol)?;
    let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
    let host = if target.port == 443 { target.host.clone() } else { format!("{}:{}", target.host, target.port) };
    let mut req = http::Request::get(target.path_and_query.as_str())
        .header(header::HOST, host)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_KEY, key.as_str())
        .header(header::SEC_WEBSOCKET_VERSION, "13");
    for (name, value) in [
        (header::USER_AGENT, &headers.user_agent),
        (header::ORIGIN, &headers.origin),
        (header::HeaderName::from_static("x-forwarded-for"), &headers.forwarded_for),
    ] {
        if let Some(v) = value {
            req = req.header(name, v);
        }
    }
    let req = req.body(Empty::<bytes::Bytes>::new()).map_err(|e| UpstreamError::Protocol(e.to_string()))?;

    let conn = conn.with_upgrades();
    tokio::pin!(conn);
    let send = sender.send_request(req);
    tokio::pin!(send);
    // On a 101 the connection future finishes (handing its IO to the upgrade) in the same wake
    // as the response arrives, so its finishing first is not an early close.
    let mut conn_done = false;
    let resp = loop {
        tokio::select! {
            biased;
            r = &mut send => break r.map_err(protocol)?,
            r = &mut conn, if !conn_done => {
                r.map_err(protocol)?;
                conn_done = true;
            }
        }
    };
    let status = resp.status().as_u16();
    if status != 101 {
        return Err(UpstreamError::Rejected { status });
    }
    let h = resp.headers();
    let is = |name: header::HeaderName, want: &str| {
        h.get(name).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case(want))
    };
    if !is(header::UPGRADE, "websocket") {
        return Err(UpstreamError::Protocol("101 without Upgrade: websocket".into()));
    }
    if !is(header::SEC_WEBSOCKET_ACCEPT, &derive_accept_key(key.as_bytes())) {
        return Err(UpstreamError::Protocol("wrong Sec-WebSocket-Accept".into()));
    }
    if h.contains_key(header::SEC_WEBSOCKET_EXTENSIONS) {
        return Err(UpstreamError::Protocol("gateway chose an extension that was not offered".into()));
    }
    let upgraded = if conn_done {
        hyper::upgrade::on(resp).await
    } else {
        tokio::join!(hyper::upgrade::on(resp), conn).0
    };
    let upgraded = upgraded.map_err(protocol)?;
    Ok((TokioIo::new(upgraded), status))
}
