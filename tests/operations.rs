//! Operating sigrelay: drain and readiness, the admin API and metrics, keepalive and timeouts,
//! limits, real client addresses, origins, egress through a CONNECT proxy, certificates by SNI
//! and their reload, and plain mode. Real servers on 127.0.0.1:0.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use serde_json::Value;
use sigrelay::tools::mock_gateway::Mode;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The value of the first metric line that starts with `prefix`.
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn echo_once(ws: &mut Ws, text: &str) {
    send_text(ws, text).await;
    assert_eq!(next_data(ws).await.to_text().unwrap(), text);
}

#[tokio::test]
async fn admin_lists_meters_and_closes_live_connections() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;
    let mut ws = relay.ws(&pki, "/au1/signaling").await;
    echo_once(&mut ws, "hi").await;
    let r = relay.record("handshake").await;
    let id = r["conn_id"].as_str().unwrap().to_string();

    // The pump counts a message once its write has returned, so the echo can reach the browser
    // (and this request the admin thread) a moment before the count does.
    let mut list: Vec<Value> = Vec::new();
    for _ in 0..200 {
        let (status, body) = http(relay.admin(), "GET", "/connections", &[]).await;
        assert_eq!(status, 200);
        list = serde_json::from_str(&body).unwrap();
        if list.len() == 1 && list[0]["msgs_down"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["conn_id"], id.as_str());
    assert_eq!((list[0]["route"].as_str(), list[0]["region"].as_str()), (Some("signaling"), Some("au1")));
    assert_eq!((list[0]["msgs_up"].as_u64(), list[0]["msgs_down"].as_u64()), (Some(1), Some(1)));
    assert_eq!(list[0]["upstream"], "wss://au1.vss.twilio.com/signaling");

    let (status, m) = http(relay.admin(), "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(metric(&m, r#"sigrelay_handshakes_total{route="signaling",region="au1",outcome="ok"}"#), Some(1.0), "{m}");
    assert_eq!(metric(&m, r#"sigrelay_connections_live{route="signaling",region="au1"}"#), Some(1.0), "{m}");
    assert_eq!(metric(&m, r#"sigrelay_messages_total{direction="up"}"#), Some(1.0), "{m}");
    assert!(metric(&m, r#"sigrelay_bytes_total{direction="down"}"#).unwrap() > 0.0);
    assert!(metric(&m, r#"sigrelay_upstream_phase_duration_seconds_count{phase="tls"}"#).unwrap() >= 1.0, "{m}");
    assert!(m.contains("sigrelay_handshake_duration_seconds_bucket"));

    let (status, _) = http(relay.admin(), "DELETE", &format!("/connections/{id}"), &[]).await;
    assert_eq!(status, 204);
    let frame = read_close(&mut ws).await.expect("close frame");
    assert_eq!((u16::from(frame.code), frame.reason.as_str()), (1001, "closed by operator"));
    assert_eq!(gw.event("close").await["code"], 1001);
    let c = relay.record("close").await;
    assert_eq!((c["outcome"].as_str(), c["closed_by"].as_str()), (Some("closed_by_operator"), Some("relay")));

    let (_, body) = http(relay.admin(), "GET", "/connections", &[]).await;
    assert_eq!(body.trim(), "[]");
    let (_, m) = http(relay.admin(), "GET", "/metrics", &[]).await;
    assert_eq!(metric(&m, r#"sigrelay_connections_live{route="signaling",region="au1"}"#), Some(0.0));
    assert_eq!(metric(&m, r#"sigrelay_closes_total{route="signaling",outcome="closed_by_operator",closed_by="relay"}"#), Some(1.0), "{m}");
    assert_eq!(http(relay.admin(), "DELETE", "/connections/nope", &[]).await.0, 404);
}

#[tokio::test]
async fn admin_token_guards_all_but_the_probes() {
    let pki = Pki::new();
    let token_file = pki.dir.path().join("admin-token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let relay = Relay::start_with_admin(&pki, "", "", &format!("token_file = {token_file:?}"), "").await;
    let admin = relay.admin();
    assert_eq!(http(admin, "GET", "/metrics", &[]).await.0, 401);
    assert_eq!(http(admin, "GET", "/connections", &[("authorization", "Bearer wrong")]).await.0, 401);
    assert_eq!(http(admin, "GET", "/metrics", &[("authorization", "Bearer s3cret")]).await.0, 200);
    assert_eq!(http(admin, "GET", "/healthz", &[]).await.0, 200);
    assert_eq!(http(admin, "GET", "/readyz", &[]).await.0, 200);
    assert!(admin.ip().is_loopback());
}

/// A rewritten token file is in force after a reload: a leaked token is replaced without a
/// restart. A reload whose token file is empty is refused and the running token kept.
#[tokio::test]
async fn a_reload_puts_a_rewritten_admin_token_in_force() {
    let pki = Pki::new();
    let token_file = pki.dir.path().join("admin-token");
    std::fs::write(&token_file, "old-token\n").unwrap();
    let admin_keys = format!("token_file = {token_file:?}");
    let relay = Relay::start_with_admin(&pki, "", "", &admin_keys, "").await;
    let admin = relay.admin();
    let get = |t: &'static str| async move { http(admin, "GET", "/metrics", &[("authorization", &format!("Bearer {t}"))]).await.0 };
    assert_eq!(get("old-token").await, 200);
    std::fs::write(&token_file, "new-token\n").unwrap();
    relay.app.reload(Relay::config(&pki, "", "", &admin_keys, "")).unwrap();
    assert_eq!(get("old-token").await, 401, "the old token no longer opens the admin endpoints");
    assert_eq!(get("new-token").await, 200);
    std::fs::write(&token_file, "\n").unwrap();
    // `[admin]` stays as it runs, so the reload reads the running token file whatever the new
    // file says (this one, naming none, would not pass validation with the empty file).
    let err = relay.app.reload(Relay::config(&pki, "", "", "", "")).unwrap_err().to_string();
    assert!(err.contains("admin.token_file") && err.contains("empty"), "{err}");
    assert_eq!(get("new-token").await, 200, "a refused reload keeps the token in force");
}

/// What needs a restart stays as it runs: a file that turns the PROXY protocol off and drops
/// its balancers is refused on reload (until the restart every connection still brings a
/// header, and none would be believed); one that keeps a balancer is taken, with the PROXY
/// protocol still on.
#[tokio::test]
async fn a_reload_keeps_the_running_proxy_protocol_and_needs_its_balancers() {
    let pki = Pki::new();
    let relay = Relay::start(&pki, "proxy_protocol = true\nproxy_protocol_from = [\"127.0.0.0/8\"]", "", "").await;
    let err = relay.app.reload(Relay::config(&pki, "", "", "", "")).unwrap_err().to_string();
    assert!(err.contains("proxy_protocol_from"), "{err}");
    assert_eq!(relay.app.current().config.server.proxy_protocol_from.len(), 1, "the running list is kept");
    relay.app.reload(Relay::config(&pki, "proxy_protocol_from = [\"127.0.0.1\"]", "", "", "")).unwrap();
    let now = relay.app.current();
    assert!(now.config.server.proxy_protocol, "the PROXY protocol stays on until a restart");
    assert_eq!(now.config.server.proxy_protocol_from.len(), 1);
    // And the listener still believes the listed balancer's header.
    let mut tcp = TcpStream::connect(relay.addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 203.0.113.9 10.0.0.1 51000 443\r\n").await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(pki.client_tls());
    let mut tls = connector.connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut resp = String::new();
    tls.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

#[tokio::test]
async fn drain_turns_readyz_503_then_closes_with_1012() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "drain_timeout = \"1500ms\"\ndrain_jitter = \"300ms\"").await;
    let resp = relay.raw(&pki, "GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let mut sockets = Vec::new();
    for _ in 0..3 {
        let mut ws = relay.ws(&pki, "/au1/signaling").await;
        echo_once(&mut ws, "hi").await;
        sockets.push(ws);
    }
    let admin = relay.admin();
    let addr = relay.addr;
    let stopping = tokio::spawn(async move {
        relay.stop().await;
        relay
    });
    let mut ready = 200;
    for _ in 0..100 {
        ready = http(admin, "GET", "/readyz", &[]).await.0;
        if ready == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ready, 503, "readyz turns 503 at once");
    let m = http(admin, "GET", "/metrics", &[]).await.1;
    assert_eq!(metric(&m, "sigrelay_ready "), Some(0.0), "the readiness gauge follows: {m}");
    // Every thread's accept loop stops on the same signal; the socket closes once the last has.
    let mut accepting = true;
    for _ in 0..200 {
        accepting = TcpStream::connect(addr).await.is_ok();
        if !accepting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!accepting, "no longer accepting");
    // Live connections still work during the drain.
    echo_once(&mut sockets[0], "still here").await;
    for ws in &mut sockets {
        let frame = read_close(ws).await.expect("close frame");
        assert_eq!(u16::from(frame.code), 1012);
    }
    for _ in 0..3 {
        assert_eq!(gw.event("close").await["code"], 1012);
    }
    let mut relay = stopping.await.unwrap();
    let closes = relay.written_closes();
    for v in &closes {
        assert_eq!((v["outcome"].as_str(), v["closed_by"].as_str()), (Some("shutdown"), Some("relay")));
    }
    assert_eq!(closes.len(), 3);
}

#[tokio::test]
async fn half_open_browser_is_found_by_missed_pongs() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "ping_interval = \"300ms\"").await;

    // A browser that never answers a ping is closed as silent.
    let mut silent = RawWs::connect(&relay, &pki, "/au1/signaling").await;
    silent.send_text("hi").await;
    let (code, reason) = silent.read_close().await.expect("close frame");
    let r = relay.record("handshake").await;
    assert_eq!((code, reason), (1001, format!("client_silent conn={}", r["conn_id"].as_str().unwrap())));
    let c = relay.record("close").await;
    assert_eq!((c["outcome"].as_str(), c["closed_by"].as_str()), (Some("client_silent"), Some("relay")));
    gw.event("connection").await;
    assert_eq!(gw.event("close").await["code"], 1001);

    // A browser that reads (tungstenite answers pings while polled) stays connected.
    let mut alive = relay.ws(&pki, "/au1/signaling").await;
    echo_once(&mut alive, "hi").await;
    let mut pings = 0;
    let _ = tokio::time::timeout(Duration::from_millis(1500), async {
        while let Some(Ok(m)) = alive.next().await {
            pings += matches!(m, Message::Ping(_)) as u32;
        }
    })
    .await;
    assert!(pings >= 3, "the relay pinged the browser ({pings})");
    echo_once(&mut alive, "still here").await;
    assert_eq!(relay.record("handshake").await["outcome"], "ok");
    relay.assert_no_record().await;
}

#[tokio::test]
async fn silent_gateway_is_found_by_missed_pongs() {
    let pki = Pki::new();
    let silent = fault_gateway(Fault::TlsUpgradeThenSilent(pki.server_tls(&sigrelay::tools::pki::twilio_names()))).await;
    let mut relay = Relay::start(&pki, "ping_interval = \"200ms\"", "", &format!("[upstream.resolve]\n\"au1.vss.twilio.com\" = \"{silent}\"")).await;
    let mut ws = RawWs::connect(&relay, &pki, "/au1/signaling").await;
    ws.send_text("hi").await;
    let r = relay.record("handshake").await;
    assert_eq!(r["outcome"], "ok");
    // RawWs does not answer pings either; answer them so only the gateway is silent.
    let close = loop {
        match ws.next_frame().await.expect("a frame") {
            (sigrelay::frame::OpCode::Ping, _) => ws.send_pong().await,
            (sigrelay::frame::OpCode::Close, payload) => break sigrelay::frame::parse_close_payload(&payload),
            _ => {}
        }
    };
    assert_eq!(close, (Some(1001), format!("upstream_silent conn={}", r["conn_id"].as_str().unwrap())));
    assert_eq!(relay.record("close").await["outcome"], "upstream_silent");
}

#[tokio::test]
async fn idle_timeout_closes_quiet_connections() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "idle_timeout = \"400ms\"\nping_interval = \"off\"").await;
    let mut ws = relay.ws(&pki, "/au1/signaling").await;
    echo_once(&mut ws, "hi").await;
    let frame = read_close(&mut ws).await.expect("close frame");
    let r = relay.record("handshake").await;
    assert_eq!(u16::from(frame.code), 1001);
    assert_eq!(frame.reason.as_str(), format!("idle_timeout conn={}", r["conn_id"].as_str().unwrap()));
    let c = relay.record("close").await;
    assert_eq!(c["outcome"], "idle_timeout");
    assert!(c["duration_ms"].as_f64().unwrap() >= 400.0);
}

#[tokio::test]
async fn limits_refuse_naming_the_limit() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let limits = "[limits]\nmax_connections_per_ip = 2\n";
    let mut relay = Relay::start(&pki, "", "", &format!("{limits}{}", resolve_all_to(gw.addr))).await;
    let mut a = relay.ws(&pki, "/au1/signaling").await;
    let mut b = relay.ws(&pki, "/au1/signaling").await;
    echo_once(&mut a, "a").await;
    echo_once(&mut b, "b").await;
    let mut c = RawWs::connect(&relay, &pki, "/au1/signaling").await;
    let (code, reason) = c.read_close().await.expect("close");
    let mut refused = None;
    for _ in 0..3 {
        let r = relay.record("handshake").await;
        if r["outcome"] != "ok" {
            refused = Some(r);
        }
    }
    let refused = refused.expect("a refused handshake record");
    assert_eq!(refused["outcome"], "over_max_connections_per_ip");
    assert_eq!((code, reason), (1013, format!("over_max_connections_per_ip conn={}", refused["conn_id"].as_str().unwrap())));
    drop(a);
    relay.record("close").await;
    let mut d = relay.ws(&pki, "/au1/signaling").await;
    echo_once(&mut d, "room again").await;

    // The total cap guards the descriptor budget: refused before the upgrade with a 503, which a
    // load balancer can retry elsewhere, and a record.
    let mut relay = Relay::start(&pki, "", "", &format!("[limits]\nmax_connections = 1\n{}", resolve_all_to(gw.addr))).await;
    let mut held = relay.ws(&pki, "/au1/signaling").await;
    echo_once(&mut held, "holding").await;
    assert_eq!(relay.record("handshake").await["outcome"], "ok");
    let upgrade = "GET /au1/signaling HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let answer = relay.raw(&pki, upgrade).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 5"), "{answer}");
    let refused = relay.record("handshake").await;
    assert_eq!(refused["outcome"], "over_max_connections");
    assert!(answer.contains(&format!("conn={}", refused["conn_id"].as_str().unwrap())), "{answer}");
    drop(held);
    relay.record("close").await;
    let mut again = relay.ws(&pki, "/au1/signaling").await;
    echo_once(&mut again, "room again").await;

    let rate = "[limits]\nhandshakes_per_ip_per_s = 0.1\nhandshake_burst = 2\n";
    let mut relay = Relay::start(&pki, "", "", &format!("{rate}{}", resolve_all_to(gw.addr))).await;
    for _ in 0..2 {
        let mut ws = relay.ws(&pki, "/au1/signaling").await;
        echo_once(&mut ws, "x").await;
    }
    let (code, reason) = RawWs::connect(&relay, &pki, "/au1/signaling").await.read_close().await.unwrap();
    assert_eq!(code, 1013);
    assert!(reason.starts_with("over_handshake_rate conn="), "{reason}");
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        outcomes.push(relay.record("handshake").await["outcome"].as_str().unwrap().to_string());
    }
    assert_eq!(outcomes, ["ok", "ok", "over_handshake_rate"]);
}

/// A header read through a buffer: split over two segments, its end in the same segment as the
/// TLS ClientHello behind it.
#[tokio::test]
async fn a_proxy_header_split_and_sharing_a_segment_with_tls_is_read_exactly() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "proxy_protocol = true\nproxy_protocol_from = [\"127.0.0.0/8\"]").await;
    let header = b"PROXY TCP4 203.0.113.9 10.0.0.1 51000 443\r\n";
    let mut tcp = TcpStream::connect(relay.addr).await.unwrap();
    tcp.write_all(&header[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Corked, the header's rest and the ClientHello leave in one segment when uncorked.
    let sock = socket2::SockRef::from(&tcp).try_clone().unwrap();
    sock.set_tcp_cork(true).unwrap();
    tcp.write_all(&header[10..]).await.unwrap();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = sock.set_tcp_cork(false);
    });
    let connector = tokio_rustls::TlsConnector::from(pki.client_tls());
    let tls = connector.connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    let mut ws = ws_over(tls, "wss://localhost/au1/signaling").await;
    echo_once(&mut ws, "split").await;
    assert_eq!(relay.record("handshake").await["client_addr"], "203.0.113.9:51000");
    gw.event("connection").await;
}

/// The client a PROXY header names is held to its per-address limit from accept, as a direct
/// client is: past 32 over it, its next connection is closed before its TLS handshake.
#[tokio::test]
async fn a_client_behind_the_balancer_is_refused_at_accept_past_its_limit() {
    let pki = Pki::new();
    let mut relay = Relay::start(
        &pki,
        "proxy_protocol = true\nproxy_protocol_from = [\"127.0.0.0/8\"]\nhandshake_timeout = \"10s\"",
        "",
        "[limits]\nmax_connections_per_ip = 1",
    )
    .await;
    let header = b"PROXY TCP4 203.0.113.9 10.0.0.1 51000 443\r\n";
    // One more than the limit plus the overshoot: whichever the relay counts last is refused
    // (two threads accept, so not necessarily the last connected).
    let mut conns = Vec::new();
    for _ in 0..sigrelay::limits::OVERSHOOT + 2 {
        let mut tcp = TcpStream::connect(relay.addr).await.unwrap();
        tcp.write_all(header).await.unwrap();
        conns.push(tcp);
    }
    let r = relay.record("handshake").await;
    assert_eq!(r["outcome"], "over_max_connections_per_ip", "{r}");
    assert_eq!(r["client_addr"], "203.0.113.9:51000", "{r}");
    let mut buf = [0u8; 1];
    let mut closed = 0;
    for tcp in &mut conns {
        match tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0) | Err(_)) => closed += 1,
            Ok(Ok(n)) => panic!("{n} bytes before a ClientHello"),
        }
    }
    assert_eq!(closed, 1, "exactly the one over the overshoot is closed at accept");
    // Another client behind the same balancer has its own limit.
    let mut other = TcpStream::connect(relay.addr).await.unwrap();
    other.write_all(b"PROXY TCP4 203.0.113.10 10.0.0.1 51000 443\r\n").await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(300), other.read(&mut buf)).await.is_err(), "still open");
}

/// PROXY headers are believed only from the balancers listed; the rest are refused.
#[tokio::test]
async fn a_proxy_header_from_an_unlisted_peer_is_refused() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "proxy_protocol = true\nproxy_protocol_from = [\"10.0.0.0/8\"]").await;
    let mut tcp = TcpStream::connect(relay.addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut sink)).await;
    assert!(sink.is_empty());
    let r = relay.record("handshake").await;
    assert_eq!(r["outcome"], "bad_proxy_header");
    assert!(r["client_addr"].as_str().unwrap().starts_with("127.0.0.1:"), "{r}");
    assert!(r["error"].as_str().unwrap().contains("proxy_protocol_from"), "{r}");
    // Turning the protocol on without saying which balancers send it is a configuration error.
    let err = sigrelay::Config::parse("[server]\nproxy_protocol = true\n", "t.toml").unwrap_err();
    assert!(err.to_string().contains("server.proxy_protocol_from"), "{err}");
}

async fn proxied_ws(relay: &Relay, pki: &Pki, header: &[u8]) -> WebSocketOverTls {
    let mut tcp = TcpStream::connect(relay.addr).await.unwrap();
    tcp.write_all(header).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(pki.client_tls());
    let tls = connector.connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    ws_over(tls, "wss://localhost/au1/signaling").await
}

type WebSocketOverTls = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

#[tokio::test]
async fn proxy_protocol_v1_v2_and_garbage() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "proxy_protocol = true\nproxy_protocol_from = [\"127.0.0.1\"]").await;

    let mut ws = proxied_ws(&relay, &pki, b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n").await;
    echo_once(&mut ws, "v1").await;
    assert_eq!(relay.record("handshake").await["client_addr"], "203.0.113.7:51000");
    assert_eq!(gw.event("connection").await["x_forwarded_for"], "203.0.113.7");

    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend_from_slice(&[0x21, 0x11, 0, 12, 198, 51, 100, 9, 10, 0, 0, 1]);
    v2.extend_from_slice(&4242u16.to_be_bytes());
    v2.extend_from_slice(&443u16.to_be_bytes());
    let mut ws = proxied_ws(&relay, &pki, &v2).await;
    echo_once(&mut ws, "v2").await;
    assert_eq!(relay.record("handshake").await["client_addr"], "198.51.100.9:4242");

    // A balancer's own health check: the connection's address stands.
    let mut ws = proxied_ws(&relay, &pki, b"PROXY UNKNOWN\r\n").await;
    echo_once(&mut ws, "local").await;
    assert!(relay.record("handshake").await["client_addr"].as_str().unwrap().starts_with("127.0.0.1:"));

    for garbage in [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"PROXY TCP4 nonsense\r\n"] {
        let mut tcp = TcpStream::connect(relay.addr).await.unwrap();
        tcp.write_all(garbage).await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut sink)).await;
        assert!(sink.is_empty(), "nothing answered to garbage");
        assert_eq!(relay.record("handshake").await["outcome"], "bad_proxy_header");
    }
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "trusted_proxies = [\"127.0.0.0/8\", \"10.0.0.0/8\"]").await;
    let mut ws = relay.ws_with(&pki, "/au1/signaling", &[("x-forwarded-for", "198.51.100.1, 203.0.113.5, 10.1.2.3")]).await.unwrap();
    echo_once(&mut ws, "hi").await;
    assert_eq!(relay.record("handshake").await["client_addr"], "203.0.113.5:0");
    assert_eq!(gw.event("connection").await["x_forwarded_for"], "203.0.113.5");
    // A proxy that appends ip:port: the client's own entry must not slip past it.
    let mut ws = relay.ws_with(&pki, "/au1/signaling", &[("x-forwarded-for", "9.9.9.9, 203.0.113.7:51234")]).await.unwrap();
    echo_once(&mut ws, "ported").await;
    assert_eq!(relay.record("handshake").await["client_addr"], "203.0.113.7:0");
    // An entry that does not parse ends the walk at the connection's own address.
    let mut ws = relay.ws_with(&pki, "/au1/signaling", &[("x-forwarded-for", "9.9.9.9, unknown")]).await.unwrap();
    echo_once(&mut ws, "garbled").await;
    assert!(relay.record("handshake").await["client_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    // So does a line that is not visible ASCII: skipping it would let the entry before it through.
    let mut tls = relay.tls(&pki).await;
    let mut req = b"GET /au1/signaling HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
        Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Forwarded-For: 198.51.100.1\r\n"
        .to_vec();
    req.extend_from_slice(b"X-Forwarded-For: 10.9.9.9 \xe2\x80\x8b\r\n\r\n");
    tls.write_all(&req).await.unwrap();
    let mut head = [0u8; 12];
    tls.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    tls.write_all(&sigrelay::frame::close_frame(1000, "", Some([1, 2, 3, 4]))).await.unwrap();
    assert!(relay.record("handshake").await["client_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
}

#[tokio::test]
async fn origins_outside_the_allow_list_get_403() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "allowed_origins = [\"https://*.example.com\"]").await;
    let mut ws = relay.ws_with(&pki, "/au1/signaling", &[("origin", "https://app.example.com")]).await.unwrap();
    echo_once(&mut ws, "hi").await;
    assert_eq!(relay.record("handshake").await["outcome"], "ok");
    let err = relay.ws_with(&pki, "/au1/signaling", &[("origin", "https://evil.example.net")]).await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    let r = relay.record("handshake").await;
    assert_eq!((r["outcome"].as_str(), r["origin"].as_str()), (Some("forbidden_origin"), Some("https://evil.example.net")));
    let mut ws = relay.ws(&pki, "/au1/signaling").await;
    echo_once(&mut ws, "no origin: not a browser page").await;
}

/// A CONNECT proxy on loopback that tunnels only to loopback, reporting each target.
async fn connect_proxy(answer: &'static str) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let line = String::from_utf8_lossy(&head).lines().next().unwrap_or("").to_string();
                let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let _ = tx.send(target.clone());
                let target: SocketAddr = match target.parse() {
                    Ok(t) if answer.contains(" 200 ") => t,
                    _ => {
                        let _ = client.write_all(answer.as_bytes()).await;
                        return;
                    }
                };
                assert!(target.ip().is_loopback(), "the test proxy tunnels only to loopback");
                let mut upstream = TcpStream::connect(target).await.unwrap();
                client.write_all(answer.as_bytes()).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn egress_through_a_connect_proxy() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let (proxy, mut targets) = connect_proxy("HTTP/1.1 200 Connection established\r\n\r\n").await;
    let mut relay = Relay::start(&pki, "", &format!("proxy = \"http://{proxy}\""), &resolve_all_to(gw.addr)).await;
    let mut ws = relay.ws(&pki, "/au1/signaling").await;
    send_text(&mut ws, "through the proxy").await;
    let r = relay.record("handshake").await;
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(next_data(&mut ws).await.to_text().unwrap(), "through the proxy");
    assert_eq!(targets.recv().await.unwrap(), gw.addr.to_string());
    assert!(r["upstream_proxy_ms"].as_f64().is_some(), "{r}");

    let (refusing, _) = connect_proxy("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n").await;
    let mut relay = Relay::start(&pki, "", &format!("proxy = \"http://{refusing}\""), &resolve_all_to(gw.addr)).await;
    let mut ws = RawWs::connect(&relay, &pki, "/au1/signaling").await;
    ws.send_text("hi").await;
    let (code, _) = ws.read_close().await.unwrap();
    assert_eq!(code, 1014);
    let r = relay.record("handshake").await;
    assert_eq!(r["outcome"], "upstream_proxy_error");
    assert!(r["error"].as_str().unwrap().contains("403"), "{r}");
}

/// A certificate's `notAfter`, in Unix seconds.
fn not_after(pem: &str) -> f64 {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    x509_parser::parse_x509_certificate(&der).unwrap().1.validity().not_after.timestamp() as f64
}

#[tokio::test]
async fn certificate_expiry_state_and_limit_gauges_follow_the_relay() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let write = |name: &str, leaf: &sigrelay::tools::pki::Leaf| {
        let (cert, key) = (pki.dir.path().join(format!("{name}.pem")), pki.dir.path().join(format!("{name}-key.pem")));
        std::fs::write(&cert, &leaf.cert_pem).unwrap();
        std::fs::write(&key, &leaf.key_pem).unwrap();
        (cert, key)
    };
    let main = pki.ca.leaf_for_days(&["localhost".into(), "127.0.0.1".into()], 30).unwrap();
    let other = pki.ca.leaf_for_days(&["other.test".into(), "*.wild.test".into()], 10).unwrap();
    let (main_cert, main_key) = write("main", &main);
    let (other_cert, other_key) = write("other", &other);
    let config = |extra: bool| {
        let certs = if extra { format!("[[server.certs]]\ncert = {other_cert:?}\nkey = {other_key:?}\n") } else { String::new() };
        let text = format!(
            "[server]\ncert = {main_cert:?}\nkey = {main_key:?}\n{certs}[limits]\nmax_connections = 500\n\
             [upstream]\nca_file = {:?}\nsystem_dns = false\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
            pki.ca_file,
            resolve_all_to(gw.addr)
        );
        sigrelay::Config::parse(&text, "test.toml").unwrap()
    };
    let mut relay = Relay::start_config(config(true)).await;
    let scrape = || async { http(relay.admin(), "GET", "/metrics", &[]).await.1 };
    let expiry = |sni: &str| format!("sigrelay_certificate_not_after_timestamp_seconds{{sni=\"{sni}\"}}");
    let m = scrape().await;
    assert_eq!(metric(&m, &expiry("localhost")), Some(not_after(&main.cert_pem)), "{m}");
    assert_eq!(metric(&m, &expiry("other.test")), Some(not_after(&other.cert_pem)), "{m}");
    assert_eq!(metric(&m, &expiry("*.wild.test")), Some(not_after(&other.cert_pem)), "{m}");
    assert_eq!(metric(&m, "sigrelay_max_connections "), Some(500.0), "{m}");
    assert_eq!(metric(&m, "sigrelay_ready "), Some(1.0), "{m}");
    assert_eq!(metric(&m, "sigrelay_connections_open "), Some(0.0), "{m}");

    let mut ws = relay.ws(&pki, "/au1/signaling").await;
    echo_once(&mut ws, "counted").await;
    assert_eq!(metric(&scrape().await, "sigrelay_connections_open "), Some(1.0));

    // A renewed file is picked up by the poll, without a reload.
    let renewed = pki.ca.leaf_for_days(&["localhost".into(), "127.0.0.1".into()], 90).unwrap();
    write("main", &renewed);
    let mut seen = None;
    for _ in 0..50 {
        seen = metric(&scrape().await, &expiry("localhost"));
        if seen == Some(not_after(&renewed.cert_pem)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, Some(not_after(&renewed.cert_pem)), "the renewed certificate's notAfter");

    // A reload that drops the extra pair drops its names, and puts the new limit in force.
    let mut without = config(false);
    without.limits.max_connections = Some(200);
    relay.app.reload(without).unwrap();
    let m = scrape().await;
    assert_eq!(metric(&m, &expiry("other.test")), None, "{m}");
    assert_eq!(metric(&m, &expiry("localhost")), Some(not_after(&renewed.cert_pem)), "{m}");
    assert_eq!(metric(&m, "sigrelay_max_connections "), Some(200.0), "{m}");

    drop(ws);
    let _ = relay.record("close").await;
    relay.stop().await;
}

#[tokio::test]
async fn certificates_by_sni_and_reload_without_touching_live_connections() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    // Kubernetes mounts a Secret as symlinks into a directory swapped by renaming a symlink.
    let secret = pki.dir.path().join("secret");
    let gen1 = pki.dir.path().join("..2026_11_24_1");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::create_dir_all(&gen1).unwrap();
    std::fs::copy(&pki.relay_cert, gen1.join("tls.crt")).unwrap();
    std::fs::copy(&pki.relay_key, gen1.join("tls.key")).unwrap();
    std::os::unix::fs::symlink(&gen1, secret.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", secret.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", secret.join("tls.key")).unwrap();
    let other = pki.ca.leaf(&["other.test".into()]).unwrap();
    let (other_cert, other_key) = (pki.dir.path().join("other.pem"), pki.dir.path().join("other-key.pem"));
    std::fs::write(&other_cert, &other.cert_pem).unwrap();
    std::fs::write(&other_key, &other.key_pem).unwrap();

    let text = format!(
        "[server]\ncert = {:?}\nkey = {:?}\n[[server.certs]]\ncert = {other_cert:?}\nkey = {other_key:?}\n\
         [upstream]\nca_file = {:?}\nsystem_dns = false\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        secret.join("tls.crt"),
        secret.join("tls.key"),
        pki.ca_file,
        resolve_all_to(gw.addr)
    );
    let relay = Relay::start_config(sigrelay::Config::parse(&text, "test.toml").unwrap()).await;
    let der = |pem: &str| {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
    };
    let first = der(&std::fs::read_to_string(&pki.relay_cert).unwrap());
    assert_eq!(relay.tls_as(&pki, "localhost").await.1, first);
    assert_eq!(relay.tls_as(&pki, "other.test").await.1, der(&other.cert_pem), "picked by SNI");

    let mut live = relay.ws(&pki, "/au1/signaling").await;
    echo_once(&mut live, "before").await;

    // The swap: a new generation directory, then the ..data symlink replaced atomically.
    let renewed = pki.ca.leaf(&["localhost".into(), "127.0.0.1".into()]).unwrap();
    let gen2 = pki.dir.path().join("..2026_11_24_2");
    std::fs::create_dir_all(&gen2).unwrap();
    std::fs::write(gen2.join("tls.crt"), &renewed.cert_pem).unwrap();
    std::fs::write(gen2.join("tls.key"), &renewed.key_pem).unwrap();
    std::os::unix::fs::symlink(&gen2, secret.join("..data_tmp")).unwrap();
    std::fs::rename(secret.join("..data_tmp"), secret.join("..data")).unwrap();
    let mut served = Vec::new();
    for _ in 0..50 {
        served = relay.tls_as(&pki, "localhost").await.1;
        if served != first {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served, der(&renewed.cert_pem), "new handshakes get the new certificate");
    echo_once(&mut live, "after: the live connection is untouched").await;

    // A broken file keeps the certificate in service.
    std::fs::write(gen2.join("tls.crt"), "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(relay.tls_as(&pki, "localhost").await.1, der(&renewed.cert_pem));
    echo_once(&mut live, "still fine").await;
}

#[tokio::test]
async fn reload_changes_routes_and_keeps_live_connections() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;
    let mut live = relay.ws(&pki, "/au1/signaling").await;
    echo_once(&mut live, "hi").await;
    let text = format!(
        "[server]\ncert = {:?}\nkey = {:?}\nallowed_origins = [\"https://app.example.com\"]\n[upstream]\nca_file = {:?}\nsystem_dns = false\n\
         [routing]\nregions = [\"au1\", \"de1\"]\n[[routes]]\npath = \"/sig2\"\nupstream = \"wss://{{region}}.vss.twilio.com/signaling\"\n\
         region_from = [\"path\"]\ndefault_region = \"au1\"\n{}",
        pki.relay_cert, pki.relay_key, pki.ca_file, resolve_all_to(gw.addr)
    );
    relay.app.reload(sigrelay::Config::parse(&text, "reload.toml").unwrap()).unwrap();
    let resp = relay.raw(&pki, "GET /signaling HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    let mut ws = relay.ws(&pki, "/de1/sig2").await;
    echo_once(&mut ws, "new route").await;
    assert!(relay.ws_with(&pki, "/de1/sig2", &[("origin", "https://evil.example")]).await.is_err());
    echo_once(&mut live, "the old connection keeps its route").await;
    relay.record("handshake").await;
    relay.record("handshake").await;
    let r = relay.record("handshake").await;
    assert_eq!((r["route"].as_str(), r["region"].as_str()), (Some("/sig2"), Some("de1")));
}

#[tokio::test]
async fn plain_mode_serves_ws_without_tls() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "tls = false").await;
    let tcp = TcpStream::connect(relay.addr).await.unwrap();
    let mut ws = ws_over(tcp, &format!("ws://127.0.0.1:{}/au1/signaling", relay.addr.port())).await;
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::text("plain")).await.unwrap();
    let back = ws.next().await.unwrap().unwrap();
    assert_eq!(back.to_text().unwrap(), "plain");
    let r = relay.record("handshake").await;
    assert_eq!((r["outcome"].as_str(), r["tls_ms"].clone()), (Some("ok"), Value::Null));
}

#[tokio::test]
async fn oversized_request_heads_are_refused() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;
    let big = "a".repeat(100 * 1024);
    let resp = relay.raw(&pki, &format!("GET /au1/signaling HTTP/1.1\r\nHost: localhost\r\nCookie: {big}\r\n\r\n")).await;
    assert!(resp.is_empty() || resp.starts_with("HTTP/1.1 431"), "{}", &resp[..resp.len().min(200)]);
    let r = relay.record("handshake").await;
    assert_eq!(r["outcome"], "bad_request");
}
