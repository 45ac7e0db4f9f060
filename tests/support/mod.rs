//! Test support: a test CA, the mock gateway and fault gateways on 127.0.0.1:0, sigrelay itself
//! in-process with records on a channel, and a TLS WebSocket client. Nothing leaves loopback:
//! gateway host names reach the fakes through `[upstream.resolve]` with system DNS off.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use sigrelay::tools::mock_gateway::{self, Events, Mode};
use sigrelay::tools::pki::TestCa;
use sigrelay::{App, Config, Records};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(10);

/// The test tokens from ../shared/fixtures/tokens.json.
pub fn token(name: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/tokens.json");
    let text = std::fs::read_to_string(path).expect("../shared/fixtures/tokens.json is beside the repo");
    let v: Value = serde_json::from_str(&text).unwrap();
    v[name].as_str().unwrap_or_else(|| panic!("no token {name}")).to_string()
}

/// The SDK's signalling hello carrying a token.
pub fn hello(token: &str) -> String {
    format!(r#"{{"id":"a5ea453e","timeout":5000,"type":"hello","version":2,"body":{{"edge":"roaming","token":"{token}","type":"ice","version":1}}}}"#)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A test CA with a certificate for the Twilio gateway names and one for the relay.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: TestCa,
    pub ca_file: PathBuf,
    pub relay_cert: PathBuf,
    pub relay_key: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        Pki::named("sigrelay test CA")
    }

    /// A PKI whose CA has its own name (CAs are told apart by name, then signature).
    pub fn named(ca_name: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(ca_name).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca.cert_pem).unwrap();
        let relay = ca.leaf(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        let relay_cert = dir.path().join("relay.pem");
        let relay_key = dir.path().join("relay-key.pem");
        std::fs::write(&relay_cert, &relay.cert_pem).unwrap();
        std::fs::write(&relay_key, &relay.key_pem).unwrap();
        Pki { dir, ca, ca_file, relay_cert, relay_key }
    }

    /// A TLS server config with a certificate from this CA for `names`.
    pub fn server_tls(&self, names: &[String]) -> Arc<rustls::ServerConfig> {
        let leaf = self.ca.leaf(names).unwrap();
        server_tls_from_pem(&leaf.cert_pem, &leaf.key_pem)
    }

    /// A client config trusting only this CA.
    pub fn client_tls(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca.cert_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

pub fn server_tls_from_pem(cert: &str, key: &str) -> Arc<rustls::ServerConfig> {
    let certs = CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    )
}

/// The mock gateway, its events on a channel.
pub struct Gateway {
    pub addr: SocketAddr,
    pub events: UnboundedReceiver<Value>,
    stop: CancellationToken,
}

impl Gateway {
    pub async fn start(pki: &Pki, mode: Mode) -> Gateway {
        Gateway::start_with_ice(pki, mode, Vec::new()).await
    }

    /// A mock gateway whose `iced` answer lists these ICE servers.
    pub async fn start_with_ice(pki: &Pki, mode: Mode, ice: Vec<Value>) -> Gateway {
        let tls = pki.server_tls(&sigrelay::tools::pki::twilio_names());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        tokio::spawn(mock_gateway::serve_with_ice(listener, tls, mode, ice, Events::Channel(tx), stop.clone()));
        Gateway { addr, events, stop }
    }

    /// The next event of the given kind.
    pub async fn event(&mut self, kind: &str) -> Value {
        let fut = async {
            loop {
                let e = self.events.recv().await.expect("gateway events channel closed");
                if e["event"] == kind {
                    return e;
                }
            }
        };
        tokio::time::timeout(WAIT, fut).await.unwrap_or_else(|_| panic!("no gateway {kind} event"))
    }

    /// Asserts no event arrives for a short while.
    pub async fn assert_quiet(&mut self) {
        if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(300), self.events.recv()).await {
            panic!("unexpected gateway event {e}");
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Every Twilio host the default routes and the TURN relay can pick, mapped to `addr`.
pub fn resolve_all_to(addr: SocketAddr) -> String {
    // The mock gateway answers the TURN probe's STUN Binding request too.
    resolve_gateways_to(addr) + &format!("\"global.turn.twilio.com\" = \"{addr}\"\n")
}

/// Every signalling and insights host the default routes can pick, mapped to `addr`.
pub fn resolve_gateways_to(addr: SocketAddr) -> String {
    let mut s = String::from("[upstream.resolve]\n");
    for r in sigrelay::config::DEFAULT_REGIONS {
        let label = if *r == "gll" { "global" } else { r };
        s += &format!("\"{label}.vss.twilio.com\" = \"{addr}\"\n");
        s += &format!("\"sdkgw.{r}.twilio.com\" = \"{addr}\"\n");
    }
    s
}

/// sigrelay, in-process on 127.0.0.1:0, records on a channel.
pub struct Relay {
    pub addr: SocketAddr,
    pub records: tokio::sync::mpsc::Receiver<String>,
    pub app: Arc<App>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    /// Starts with `[server]` cert/key and `[upstream]` ca_file from `pki`; `extra` is appended
    /// TOML (use `server_extra` for keys in `[server]` and `upstream_extra` for `[upstream]`).
    pub async fn start(pki: &Pki, server_extra: &str, upstream_extra: &str, extra: &str) -> Relay {
        Relay::start_with_admin(pki, server_extra, upstream_extra, "", extra).await
    }

    /// As `start`, with keys for `[admin]` (which listens on 127.0.0.1:0).
    pub async fn start_with_admin(pki: &Pki, server_extra: &str, upstream_extra: &str, admin_extra: &str, extra: &str) -> Relay {
        Relay::start_config(Relay::config(pki, server_extra, upstream_extra, admin_extra, extra)).await
    }

    /// The configuration `start_with_admin` runs.
    pub fn config(pki: &Pki, server_extra: &str, upstream_extra: &str, admin_extra: &str, extra: &str) -> Config {
        let text = format!(
            "[server]\ncert = {:?}\nkey = {:?}\n{server_extra}\n[upstream]\nca_file = {:?}\nsystem_dns = false\n{upstream_extra}\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n{admin_extra}\n{extra}",
            pki.relay_cert, pki.relay_key, pki.ca_file
        );
        Config::parse(&text, "test.toml").unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    /// The usual set-up: the given gateway answers for every Twilio host.
    pub async fn to_gateway(pki: &Pki, gw: &Gateway, server_extra: &str) -> Relay {
        Relay::start(pki, server_extra, "", &resolve_all_to(gw.addr)).await
    }

    pub async fn start_config(config: Config) -> Relay {
        Relay::start_config_on(config, TcpListener::bind("127.0.0.1:0").await.unwrap()).await
    }

    /// As `start_config`, on a listener already bound (when the config must name its port).
    pub async fn start_config_on(config: Config, listener: TcpListener) -> Relay {
        let (records, rx) = Records::channel(1 << 20);
        let app = App::new(config, records).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let served = sigrelay::serve(app.clone(), listener, async {
            let _ = shutdown_rx.await;
        });
        let done = tokio::spawn(async move { served.await.expect("relay serves") });
        // serve binds the admin listener, then starts every thread accepting: wait for both.
        for _ in 0..2000 {
            if app.ready() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(app.ready(), "the relay did not come up");
        Relay { addr, records: rx, app, shutdown: Some(tx), done: Some(done) }
    }

    /// The next record of the given event (`handshake` or `close`).
    pub async fn record(&mut self, event: &str) -> Value {
        let fut = async {
            loop {
                let line = self.records.recv().await.expect("records channel closed");
                let v: Value = serde_json::from_str(&line).unwrap();
                assert_ne!(v["outcome"], "relay_error", "a record's owner was dropped without an outcome: {v}");
                if v["event"] == event {
                    return v;
                }
            }
        };
        tokio::time::timeout(WAIT, fut).await.unwrap_or_else(|_| panic!("no {event} record"))
    }

    /// The close records already written (handshake records are passed over).
    pub fn written_closes(&mut self) -> Vec<Value> {
        let mut closes = Vec::new();
        while let Ok(line) = self.records.try_recv() {
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["event"] == "close" {
                closes.push(v);
            }
        }
        closes
    }

    /// Asserts that no record arrives for a short while.
    pub async fn assert_no_record(&mut self) {
        if let Ok(Some(line)) = tokio::time::timeout(Duration::from_millis(300), self.records.recv()).await {
            panic!("unexpected record {line}");
        }
    }

    /// Signals shutdown (the drain starts) without waiting for it to finish.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Signals shutdown and waits for `serve` to return.
    pub async fn stop(&mut self) {
        self.begin_stop();
        if let Some(done) = self.done.take() {
            tokio::time::timeout(Duration::from_secs(60), done).await.expect("relay stopped").unwrap();
        }
    }

    /// Opens a WebSocket through the relay.
    pub async fn ws(&self, pki: &Pki, path: &str) -> Ws {
        self.ws_with(pki, path, &[]).await.expect("websocket upgrade")
    }

    pub async fn ws_with(
        &self,
        pki: &Pki,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
        let tls = self.tls(pki).await;
        let mut req = format!("wss://localhost:{}{path}", self.addr.port()).into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        let (ws, _) = tokio_tungstenite::client_async(req, tls).await?;
        Ok(ws)
    }

    /// A TLS connection to the relay with SNI `localhost`.
    pub async fn tls(&self, pki: &Pki) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(pki.client_tls());
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap()
    }

    /// Sends raw request bytes over TLS and returns the response head and body as text.
    pub async fn raw(&self, pki: &Pki, request: &str) -> String {
        let mut tls = self.tls(pki).await;
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // A record owner dropped unfinished writes `relay_error`, whether or not a test read it.
        if !std::thread::panicking() {
            let metrics = self.app.metrics.encode();
            assert!(!metrics.contains("outcome=\"relay_error\""), "a record's owner was dropped without an outcome:\n{metrics}");
        }
    }
}

pub type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// Reads messages until a close frame (returned) or the end of the stream (`None`).
pub async fn read_close(ws: &mut Ws) -> Option<CloseFrame> {
    let fut = async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Close(frame)) => return frame,
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    };
    tokio::time::timeout(WAIT, fut).await.expect("close frame in time")
}

/// The next text or binary message.
pub async fn next_data(ws: &mut Ws) -> Message {
    let fut = async {
        loop {
            match ws.next().await {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return m,
                Some(Ok(_)) => continue,
                other => panic!("stream ended: {other:?}"),
            }
        }
    };
    tokio::time::timeout(WAIT, fut).await.expect("message in time")
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
}

/// A gateway stand-in that misbehaves in one way.
pub enum Fault {
    /// Answers every request head with these bytes, then closes.
    Respond(&'static str),
    /// Accepts TCP and never says anything.
    Silent,
    /// Finishes TLS (with this server config) and then never answers the request.
    TlsThenSilent(Arc<rustls::ServerConfig>),
    /// Finishes TLS and answers the request head with these bytes.
    TlsRespond(Arc<rustls::ServerConfig>, &'static str),
    /// Finishes TLS, accepts the WebSocket upgrade, then never reads or writes again.
    TlsUpgradeThenSilent(Arc<rustls::ServerConfig>),
    /// Finishes TLS, accepts the upgrade, sends half of a frame, then resets the connection.
    TlsUpgradeThenPartialFrameAndReset(Arc<rustls::ServerConfig>),
    /// Finishes TLS and sends its 101 and a text frame, "greeting", in one write; then holds.
    TlsUpgradeThenGreet(Arc<rustls::ServerConfig>),
    /// Finishes TLS and answers the upgrade with this head, `{accept}` and `{accept_lower}`
    /// replaced by the right Sec-WebSocket-Accept (and its lowercase); then holds.
    TlsUpgradeAnswer(Arc<rustls::ServerConfig>, &'static str),
}

/// Starts a fault gateway; returns its address.
pub async fn fault_gateway(fault: Fault) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fault = Arc::new(fault);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            match &*fault {
                Fault::Silent => held.push(tcp),
                Fault::Respond(bytes) => {
                    let bytes = *bytes;
                    tokio::spawn(async move { respond_after_head(tcp, bytes).await });
                }
                Fault::TlsUpgradeThenSilent(cfg)
                | Fault::TlsUpgradeThenPartialFrameAndReset(cfg)
                | Fault::TlsUpgradeThenGreet(cfg)
                | Fault::TlsUpgradeAnswer(cfg, _) => {
                    let partial = matches!(&*fault, Fault::TlsUpgradeThenPartialFrameAndReset(_));
                    let greet = matches!(&*fault, Fault::TlsUpgradeThenGreet(_));
                    let template = match &*fault {
                        Fault::TlsUpgradeAnswer(_, t) => Some(*t),
                        _ => None,
                    };
                    let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
                    tokio::spawn(async move {
                        let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match tls.read(&mut buf).await {
                                Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                                _ => return,
                            }
                        }
                        let head = String::from_utf8_lossy(&head).into_owned();
                        let key = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: ").or_else(|| l.strip_prefix("sec-websocket-key: ")))
                            .unwrap_or_default()
                            .trim()
                            .to_string();
                        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                        let mut resp = match template {
                            Some(t) => t.replace("{accept}", &accept).replace("{accept_lower}", &accept.to_lowercase()).into_bytes(),
                            None => format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").into_bytes(),
                        };
                        if greet {
                            resp.extend_from_slice(&[0x81, 8]);
                            resp.extend_from_slice(b"greeting");
                        }
                        let _ = tls.write_all(&resp).await;
                        if partial {
                            // A 100-byte text frame, cut after 10 bytes of payload.
                            let mut frame = vec![0x81, 100];
                            frame.extend_from_slice(&[b'x'; 10]);
                            let _ = tls.write_all(&frame).await;
                            let _ = tls.flush().await;
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            let _ = socket2::SockRef::from(tls.get_ref().0).set_linger(Some(Duration::ZERO));
                            drop(tls);
                            return;
                        }
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        drop(tls);
                    });
                }
                Fault::TlsThenSilent(cfg) | Fault::TlsRespond(cfg, _) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
                    let reply = match &*fault {
                        Fault::TlsRespond(_, r) => Some(*r),
                        _ => None,
                    };
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else { return };
                        match reply {
                            Some(r) => respond_after_head(tls, r).await,
                            None => {
                                tokio::time::sleep(Duration::from_secs(60)).await;
                                drop(tls);
                            }
                        }
                    });
                }
            }
        }
    });
    addr
}

async fn respond_after_head<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S, reply: &str) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
    let _ = s.write_all(reply.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// A port with nothing listening on it.
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// A minimal WebSocket client on raw frames, for close codes tungstenite will not report as
/// sent (it turns 1014, which browsers accept, into 1002).
pub struct RawWs {
    tls: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl RawWs {
    pub async fn connect(relay: &Relay, pki: &Pki, path: &str) -> RawWs {
        let mut tls = relay.tls(pki).await;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        tls.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = tls.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        buf.drain(..end);
        RawWs { tls, buf }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.tls.write_all(bytes).await.unwrap();
    }

    pub async fn send_text(&mut self, text: &str) {
        let mut frame = Vec::new();
        sigrelay::frame::encode_frame(&mut frame, sigrelay::frame::OpCode::Text, text.as_bytes(), Some([1, 2, 3, 4]));
        self.tls.write_all(&frame).await.unwrap();
    }

    pub async fn send_close(&mut self, code: u16, reason: &str) {
        self.tls.write_all(&sigrelay::frame::close_frame(code, reason, Some([7, 7, 7, 7]))).await.unwrap();
    }

    pub async fn send_pong(&mut self) {
        let mut frame = Vec::new();
        sigrelay::frame::encode_frame(&mut frame, sigrelay::frame::OpCode::Pong, b"", Some([5, 6, 7, 8]));
        self.tls.write_all(&frame).await.unwrap();
    }

    /// The next frame's opcode and payload, or `None` at the end of the stream.
    pub async fn next_frame(&mut self) -> Option<(sigrelay::frame::OpCode, Vec<u8>)> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(h) = sigrelay::frame::parse_header(&self.buf).unwrap() {
                let len = h.frame_len() as usize;
                if self.buf.len() >= len {
                    let payload = self.buf[h.header_len..len].to_vec();
                    self.buf.drain(..len);
                    return Some((h.opcode, payload));
                }
            }
            match tokio::time::timeout(WAIT, self.tls.read(&mut chunk)).await.expect("frame in time") {
                Ok(n) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// Reads until a close frame; returns its code and reason.
    pub async fn read_close(&mut self) -> Option<(u16, String)> {
        while let Some((op, payload)) = self.next_frame().await {
            if op == sigrelay::frame::OpCode::Close {
                let (code, reason) = sigrelay::frame::parse_close_payload(&payload);
                return Some((code?, reason));
            }
        }
        None
    }
}

/// A plain HTTP/1.1 request (for the admin listener); returns the status and body.
pub async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut out)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

impl Relay {
    /// The admin listener's address.
    pub fn admin(&self) -> SocketAddr {
        *self.app.admin_addr.get().expect("admin listener")
    }

    /// A TLS connection with the given SNI; returns it and the certificate the relay presented.
    pub async fn tls_as(&self, pki: &Pki, sni: &str) -> (TlsStream<TcpStream>, Vec<u8>) {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(pki.client_tls());
        let tls = connector.connect(ServerName::try_from(sni.to_string()).unwrap(), tcp).await.unwrap();
        let cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        (tls, cert)
    }
}

/// A WebSocket over an already-open stream (e.g. after writing a PROXY header).
pub async fn ws_over<S>(stream: S, url: &str) -> WebSocketStream<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio_tungstenite::client_async(url, stream).await.expect("websocket upgrade").0
}

/// A browser script from tests/browser that runs while the test talks to it: JSON lines from its
/// stdout, commands on its stdin. It runs in a process group of its own, which is killed whole
/// when the `Script` is dropped, so a failed test leaves no browser, Xvfb or driver behind.
pub struct Script {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    stderr: tokio::task::JoinHandle<String>,
}

impl Script {
    /// Starts `script` with `spec` (as JSON in its first argument).
    pub fn start(script: &str, spec: &Value) -> Script {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let mut child = tokio::process::Command::new("node")
            .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser").join(script))
            .arg(spec.to_string())
            .env("CHROMIUM", chromium())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
        let stderr = tokio::spawn(async move {
            let mut all = String::new();
            while let Ok(Some(l)) = err.next_line().await {
                all += &l;
                all.push('\n');
            }
            all
        });
        Script { child, lines, stderr }
    }

    /// The next JSON line the script prints (within a minute); panics with its stderr if it
    /// ends first.
    pub async fn event(&mut self) -> Value {
        match tokio::time::timeout(Duration::from_secs(60), self.lines.next_line()).await {
            Ok(Ok(Some(line))) => serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")),
            other => {
                self.kill_group();
                let stderr = self.stderr_now().await;
                panic!("the browser script ended without an event ({other:?}); its stderr:\n{stderr}");
            }
        }
    }

    /// Kills the script and everything it started.
    fn kill_group(&mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child's process group.
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
        }
    }

    /// What the script wrote to stderr, waiting a little for the rest once it has been killed.
    async fn stderr_now(&mut self) -> String {
        match tokio::time::timeout(Duration::from_secs(5), &mut self.stderr).await {
            Ok(Ok(text)) => text,
            _ => "(stderr still open)".into(),
        }
    }

    /// Sends one command line.
    pub async fn send(&mut self, command: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(format!("{command}\n").as_bytes()).await.unwrap();
        stdin.flush().await.unwrap();
    }

    /// Waits for the script to exit, and asserts it succeeded.
    pub async fn finish(mut self) {
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.expect("the browser script exits").unwrap();
        if !status.success() {
            self.kill_group();
            panic!("the browser script failed; its stderr:\n{}", self.stderr_now().await);
        }
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// Runs a browser script from tests/browser with `spec` (as JSON in its first argument), within
/// `limit`; the JSON lines it printed.
pub async fn browser_script(script: &str, spec: &Value, limit: Duration) -> Vec<Value> {
    let child = tokio::process::Command::new("node")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser").join(script))
        .arg(spec.to_string())
        .env("CHROMIUM", chromium())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let out = tokio::time::timeout(limit, child.wait_with_output()).await.expect("the browser script ends").unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed; its stderr:\n{stderr}");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.iter().all(|l| l.get("error").is_none()), "{lines:?}\n{stderr}");
    lines
}

/// Debian's Chromium, or `$CHROMIUM`.
pub fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

/// Runs `cmd` with `stdin` written to its standard input; its exit status and output.
pub fn output_with_stdin(cmd: &mut std::process::Command, stdin: &str) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

/// Whether a test's outside tool is installed: without it the test is skipped, saying `why`,
/// except in CI (`CI` set), where its absence is a failure.
pub fn tool_ready(ready: bool, why: &str) -> bool {
    if !ready {
        if std::env::var_os("CI").is_some() {
            panic!("{why}");
        }
        eprintln!("SKIPPED: {why}");
    }
    ready
}

/// Whether Chromium, node and the npm packages are here; in CI their absence is a failure.
pub fn browser_ready() -> bool {
    let modules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/node_modules/twilio-video/dist/twilio-video.min.js");
    let node = std::process::Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    let ready = modules.exists() && std::path::Path::new(&chromium()).exists() && node;
    tool_ready(ready, "browser tests need Chromium, node and tests/browser/node_modules: run tests/run.sh")
}
