//! `sigrelay mock-gateway`: a stand-in for Twilio's gateways, for trying and load-testing a relay
//! without Twilio, and for the test suite.
//!
//! In `twilio` mode it answers just enough of the signalling (TCMP v2) and insights protocols for
//! the real SDK's `Video.connect(token, { tracks: [] })` to resolve, and for a connected room to
//! reconnect (a `sync` hello gets `synced`). In `echo` mode it sends every message back; a text
//! message `close <code> <reason>` makes it close with that code instead, and `reset` makes it
//! drop the connection with a TCP reset (for fault tests). For every
//! connection it emits a JSON `connection` event (host, path, first message type, the hello's
//! body type and session, the token's presence, `twr` and SHA-256) and a `close` event; in
//! `twilio` mode a `room` event when it answers a connect (`connected`) or a reconnect's `sync`
//! (`synced`), with the client's RSP version.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::tls;
use crate::token;
use crate::tools::pki;

/// `sigrelay mock-gateway`'s arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Listen address; port 0 picks a free port. The bound address is the first line on stdout.
    #[arg(long, default_value = "127.0.0.1:9443")]
    listen: SocketAddr,
    /// Certificate chain (PEM). Without --cert/--key a throwaway CA and a certificate for the
    /// Twilio host names are made, and the CA is written out for sigrelay's `ca_file`.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Where to write the throwaway CA (default: a new directory under the system temp dir).
    #[arg(long, conflicts_with = "cert")]
    ca_out: Option<PathBuf>,
    /// `twilio` answers like Twilio's gateways; `echo` sends every message back.
    #[arg(long, value_enum, default_value_t = Mode::Twilio)]
    mode: Mode,
    /// An ICE server URL for the `iced` answer (repeat for more), e.g.
    /// `turns:global.turn.twilio.com:443?transport=tcp` or `stun:global.stun.twilio.com:3478`.
    #[arg(long = "ice-url")]
    ice_urls: Vec<String>,
    /// The username TURN URLs get (long-term credentials, as the TURN server knows them).
    #[arg(long, default_value = "sigrelay")]
    ice_username: String,
    /// The credential TURN URLs get.
    #[arg(long, default_value = "sigrelay")]
    ice_credential: String,
}

/// The `iced` answer's servers: one entry per URL, with the credentials on TURN URLs.
pub fn ice_servers(urls: &[String], username: &str, credential: &str) -> Vec<Value> {
    urls.iter()
        .map(|u| match u.starts_with("turn") {
            true => json!({"urls": u, "username": username, "credential": credential}),
            false => json!({"urls": u}),
        })
        .collect()
}

/// Runs `sigrelay mock-gateway` until SIGINT.
pub fn main(args: Args) -> ExitCode {
    super::exit("mock-gateway", run(args).map(|()| true))
}

/// Writes a private key readable by its owner only.
fn write_private(path: &std::path::Path, pem: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    // `mode` applies only to a new file; an old one keeps its bits unless told.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(pem.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

fn run(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter("warn").init();
    let (certs, key) = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => (tls::load_certs("--cert", cert)?, tls::load_key("--key", key)?),
        _ => {
            let ca = pki::TestCa::new("sigrelay mock-gateway CA")?;
            let leaf = ca.leaf(&pki::twilio_names())?;
            let ca_path = match args.ca_out.clone() {
                Some(p) => p,
                None => {
                    let dir = std::env::temp_dir().join(format!("sigrelay-mock-gateway-{}", std::process::id()));
                    std::fs::create_dir_all(&dir)?;
                    dir.join("ca.pem")
                }
            };
            std::fs::write(&ca_path, &ca.cert_pem).with_context(|| format!("writing {}", ca_path.display()))?;
            eprintln!("mock-gateway: wrote its CA to {}; set [upstream] ca_file to it", ca_path.display());
            // The same certificate, for a TURN server (coturn) standing in for global.turn.twilio.com.
            let dir = ca_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            let (cert_out, key_out) = (dir.join("mock-gateway.pem"), dir.join("mock-gateway-key.pem"));
            std::fs::write(&cert_out, &leaf.cert_pem).with_context(|| format!("writing {}", cert_out.display()))?;
            write_private(&key_out, &leaf.key_pem)?;
            eprintln!(
                "mock-gateway: wrote its certificate (for the Twilio host names) to {} and {}",
                cert_out.display(),
                key_out.display()
            );
            use rustls_pki_types::pem::PemObject;
            let certs = rustls_pki_types::CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
            let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())?;
            (certs, key)
        }
    };
    let tls = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
        println!("{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        });
        let ice = ice_servers(&args.ice_urls, &args.ice_username, &args.ice_credential);
        serve_with_ice(listener, Arc::new(tls), args.mode, ice, Events::Stdout, shutdown).await;
        anyhow::Ok(())
    })
}

/// What the mock gateway does with messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Speak enough of Twilio's protocols for `Video.connect` to resolve.
    Twilio,
    /// Send every message back.
    Echo,
}

/// The `negotiatedTimeout` the mock offers; the SDK sends heartbeats just under it.
const NEGOTIATED_TIMEOUT_MS: u64 = 5000;

/// Where events go: stdout lines, or a channel for tests.
#[derive(Clone)]
pub enum Events {
    Stdout,
    Channel(mpsc::UnboundedSender<Value>),
}

impl Events {
    fn emit(&self, event: Value) {
        match self {
            Events::Stdout => println!("{event}"),
            Events::Channel(tx) => {
                let _ = tx.send(event);
            }
        }
    }
}

/// Serves until `shutdown` fires.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, mode: Mode, events: Events, shutdown: CancellationToken) {
    serve_with_ice(listener, tls, mode, Vec::new(), events, shutdown).await
}

/// Serves until `shutdown` fires, answering `ice` hellos with these ICE servers.
pub async fn serve_with_ice(listener: TcpListener, tls: Arc<rustls::ServerConfig>, mode: Mode, ice: Vec<Value>, events: Events, shutdown: CancellationToken) {
    let ice = Arc::new(Value::Array(ice));
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "mock gateway accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let (acceptor, events, shutdown, ice) = (acceptor.clone(), events.clone(), shutdown.clone(), ice.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = connection(tcp, peer, acceptor, mode, ice, events) => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

#[derive(Default)]
struct Seen {
    path: String,
    user_agent: Option<String>,
    origin: Option<String>,
    forwarded_for: Option<String>,
    cookie: bool,
    authorization: bool,
}

// tungstenite's header callback returns its own (large) error response type.
#[allow(clippy::result_large_err)]
async fn connection(tcp: TcpStream, peer: SocketAddr, acceptor: TlsAcceptor, mode: Mode, ice: Arc<Value>, events: Events) {
    let _ = tcp.set_nodelay(true);
    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
    let host = tls.get_ref().1.server_name().map(str::to_string);
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    // A STUN header is 20 bytes, and any WebSocket upgrade request longer.
    let mut first = [0u8; 20];
    if tls.read_exact(&mut first).await.is_err() {
        return;
    }
    if crate::turn::is_stun(&first) {
        return stun_answers(tls, first, host, events).await;
    }
    let tls = crate::prefixed::Prefixed::new(&first, tls);
    let mut seen = Seen::default();
    let callback = |req: &Request, resp: Response| {
        let h = |name: &str| req.headers().get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        seen.path = req.uri().path().to_string();
        seen.user_agent = h("user-agent");
        seen.origin = h("origin");
        seen.forwarded_for = h("x-forwarded-for");
        seen.cookie = req.headers().contains_key("cookie");
        seen.authorization = req.headers().contains_key("authorization");
        Ok(resp)
    };
    // Signalling-sized buffers: tungstenite's 128 KiB defaults cost a zeroed allocation per
    // connection, which showed up as a tenth of the gateway's CPU under handshake churn.
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async_with_config(tls, callback, Some(config)).await else { return };

    let mut identity = "participant".to_string();
    let mut first = true;
    let mut msgs = 0u64;
    let mut heartbeat: Option<tokio::time::Interval> = None;
    let (mut close_code, mut close_reason) = (None, String::new());
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = async { heartbeat.as_mut().unwrap().tick().await }, if heartbeat.is_some() => {
                if ws.send(Message::text(r#"{"type":"heartbeat"}"#)).await.is_err() { break }
                continue;
            }
        };
        let msg = match msg {
            Some(Ok(msg)) => msg,
            // A conforming endpoint fails the connection with a close that says why (RFC 6455
            // §7.1.7), then lets the close handshake finish, rather than dropping the socket.
            Some(Err(e @ (WsError::Utf8(_) | WsError::Protocol(_) | WsError::Capacity(_)))) => {
                let code = match e {
                    WsError::Utf8(_) => CloseCode::Invalid,
                    WsError::Capacity(_) => CloseCode::Size,
                    _ => CloseCode::Protocol,
                };
                close_code = Some(u16::from(code));
                close_reason = e.to_string();
                let _ = ws.close(Some(CloseFrame { code, reason: "".into() })).await;
                let _ = tokio::time::timeout(Duration::from_secs(2), async { while let Some(Ok(_)) = ws.next().await {} }).await;
                break;
            }
            _ => break,
        };
        let text = match &msg {
            Message::Text(t) => Some(t.as_str().to_string()),
            Message::Close(frame) => {
                close_code = frame.as_ref().map(|f| u16::from(f.code));
                close_reason = frame.as_ref().map(|f| f.reason.to_string()).unwrap_or_default();
                continue; // tungstenite answers the close; the stream then ends
            }
            Message::Binary(_) => None,
            _ => continue,
        };
        msgs += 1;
        let parsed: Option<Value> = text.as_deref().and_then(|t| serde_json::from_str(t).ok());
        if first {
            first = false;
            let tok = parsed.as_ref().and_then(|v| {
                v.pointer("/body/token").or_else(|| v.get("token")).and_then(Value::as_str).map(str::to_string)
            });
            let info = tok.as_deref().and_then(|t| token::decode(t).ok());
            if let Some(id) = info.as_ref().and_then(|i| i.identity.clone()) {
                identity = id;
            }
            events.emit(json!({
                "event": "connection",
                "host": host,
                "resumed": resumed,
                "peer": peer.to_string(),
                "path": seen.path,
                "first_type": parsed.as_ref().and_then(|v| v.get("type")).and_then(Value::as_str),
                // The hello's body: `ice` (a fresh connect), `sync` (a reconnect, with the
                // session it resumes) or `connect`.
                "body_type": parsed.as_ref().and_then(|v| v.pointer("/body/type")).and_then(Value::as_str),
                "session": parsed.as_ref().and_then(|v| v.pointer("/body/session")).and_then(Value::as_str),
                "token_present": tok.is_some(),
                "twr": info.as_ref().and_then(|i| i.region.clone()),
                "token_sha256": tok.as_ref().map(|t| hex(&Sha256::digest(t.as_bytes()))),
                "user_agent": seen.user_agent,
                "origin": seen.origin,
                "x_forwarded_for": seen.forwarded_for,
                "cookie": seen.cookie,
                "authorization": seen.authorization,
            }));
        }
        let replies = match mode {
            Mode::Echo if text.as_deref() == Some("reset") => {
                let tcp = ws.get_ref().get_ref().get_ref().0;
                let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
                close_code = Some(1006);
                break;
            }
            Mode::Echo => match text.as_deref().and_then(|t| t.strip_prefix("close ")) {
                Some(rest) => {
                    let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
                    let code = code.parse::<u16>().unwrap_or(1000);
                    let frame = CloseFrame { code: CloseCode::from(code), reason: reason.to_string().into() };
                    let _ = ws.close(Some(frame)).await;
                    continue;
                }
                None => vec![msg],
            },
            Mode::Twilio => {
                let (replies, start_heartbeats) = twilio_replies(parsed.as_ref(), &identity, &ice);
                let state = replies.iter().filter_map(|r| r.pointer("/body/type").and_then(Value::as_str)).find(|t| *t == "connected" || *t == "synced");
                if let Some(state) = state {
                    // The client's RSP version: 2 from every 2.x SDK, 3 from the 3.0 previews.
                    let rsp_version = parsed.as_ref().and_then(|v| v.pointer("/body/version")).cloned();
                    events.emit(json!({"event": "room", "path": seen.path, "state": state, "rsp_version": rsp_version}));
                }
                if start_heartbeats && heartbeat.is_none() {
                    let period = Duration::from_millis(NEGOTIATED_TIMEOUT_MS / 2);
                    heartbeat = Some(tokio::time::interval_at(tokio::time::Instant::now() + period, period));
                }
                replies.into_iter().map(|v| Message::text(v.to_string())).collect()
            }
        };
        for reply in replies {
            if ws.send(reply).await.is_err() {
                break;
            }
        }
    }
    events.emit(json!({
        "event": "close",
        "host": host,
        "path": seen.path,
        "code": close_code,
        "reason": close_reason,
        "msgs": msgs,
    }));
}

/// A stand-in for a TURN server, on connections that start with a STUN message: Binding requests
/// get a Binding success (enough for `diagnose`'s probe), and every other STUN-framed message
/// comes back as it was (what `loadtest --turn` measures), until the connection ends. `first`
/// is the first message's header.
async fn stun_answers<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut io: S, first: [u8; 20], host: Option<String>, events: Events) {
    let mut message = first.to_vec();
    let (mut answered, mut echoed) = (0u64, 0u64);
    loop {
        let len = u16::from_be_bytes([message[2], message[3]]) as usize;
        message.resize(20 + len, 0);
        if io.read_exact(&mut message[20..]).await.is_err() {
            break;
        }
        let written = if message[..2] == [0x00, 0x01] {
            // A Binding success: the request's cookie and transaction id, no attributes.
            answered += 1;
            let mut answer = message[..20].to_vec();
            answer[..4].copy_from_slice(&[0x01, 0x01, 0x00, 0x00]);
            io.write_all(&answer).await
        } else {
            echoed += 1;
            io.write_all(&message).await
        };
        message.resize(20, 0);
        if written.is_err() || io.read_exact(&mut message).await.is_err() {
            break;
        }
    }
    events.emit(json!({"event": "stun", "host": host, "answered": answered, "echoed": echoed}));
}

/// The messages a Twilio gateway sends in answer to one client message, and whether
/// heartbeats start (after `welcome`).
fn twilio_replies(msg: Option<&Value>, identity: &str, ice: &Value) -> (Vec<Value>, bool) {
    let Some(msg) = msg else { return (vec![], false) };
    let body = msg.get("body").unwrap_or(&Value::Null);
    let body_type = body.get("type").and_then(Value::as_str);
    match msg.get("type").and_then(Value::as_str) {
        Some("hello") => {
            let mut out = vec![json!({"type": "welcome", "negotiatedTimeout": NEGOTIATED_TIMEOUT_MS})];
            match body_type {
                Some("ice") => out.push(json!({"type": "msg", "body": {"type": "iced", "ice_servers": ice, "version": 1}})),
                // A connect carried in the hello itself, and a reconnect's `sync`.
                Some("connect") => out.push(json!({"type": "msg", "body": room_state("connected", body, identity)})),
                Some("sync") => out.push(json!({"type": "msg", "body": room_state("synced", body, identity)})),
                _ => {}
            }
            (out, true)
        }
        Some("msg") if body_type == Some("connect") => (vec![json!({"type": "msg", "body": room_state("connected", body, identity)})], false),
        // Insights.
        Some("connect") => (vec![json!({"type": "connected", "session": "IS00000000000000000000000000000001"})], false),
        _ => (vec![], false),
    }
}

/// The room as the gateway describes it in `connected` and, after a reconnect, `synced`: one
/// room with the client as its only participant. `synced` leaves out `peer_connections`, as
/// the SDK expects (it keeps the ones it has).
fn room_state(kind: &str, body: &Value, identity: &str) -> Value {
    let name = body.get("name").and_then(Value::as_str).unwrap_or("room");
    let mut state = json!({
        "type": kind, "version": 2,
        "session": "SE00000000000000000000000000000001",
        "sid": "RM00000000000000000000000000000001",
        "name": name,
        "options": {"session_timeout": 30, "signaling_region": "au1", "media_region": "au1"},
        "participant": {"sid": "PA00000000000000000000000000000001", "identity": identity, "revision": 1, "tracks": []},
        "participants": [],
        "published": {"revision": 1, "tracks": []},
        "recording": {"is_recording": false, "revision": 1},
        "subscribed": {"revision": 1, "tracks": []},
    });
    if kind == "connected" {
        state["peer_connections"] = json!([]);
    }
    state
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of a token as the mock gateway reports it, for comparing in tests.
pub fn token_sha256(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}
