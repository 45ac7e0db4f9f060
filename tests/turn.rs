//! Media through the relay: TURN over TLS on the relay's own port, piped to the TURN upstream,
//! and the gateway's ICE servers pointed at it. Real servers on 127.0.0.1:0: the mock gateway,
//! and a TLS stand-in for the TURN upstream (coturn itself, with browsers, is in
//! tests/media.rs).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use sigrelay::tools::mock_gateway::Mode;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

const TURN_HOST: &str = "global.turn.twilio.com";

fn twilio_ice() -> Vec<Value> {
    vec![
        json!({"urls": "turns:global.turn.twilio.com:443?transport=tcp", "username": "u", "credential": "c"}),
        json!({"urls": "turn:global.turn.twilio.com:3478?transport=udp", "username": "u", "credential": "c"}),
        json!({"urls": "stun:global.stun.twilio.com:3478?transport=udp"}),
    ]
}

/// Reads frames until a text one, returning it parsed.
async fn next_json(raw: &mut RawWs) -> Value {
    loop {
        let (op, payload) = raw.next_frame().await.expect("a frame");
        if op == sigrelay::frame::OpCode::Text {
            return serde_json::from_slice(&payload).unwrap();
        }
    }
}

#[tokio::test]
async fn the_iced_turn_server_is_the_relays_and_the_rest_stay() {
    let pki = Pki::new();
    let gw = Gateway::start_with_ice(&pki, Mode::Twilio, twilio_ice()).await;
    let extra = format!("{}[turn]\npublic_url = \"turns:localhost:5349?transport=tcp\"\n", resolve_all_to(gw.addr));
    let mut relay = Relay::start(&pki, "", "", &extra).await;
    let mut raw = RawWs::connect(&relay, &pki, "/signaling").await;
    raw.send_text(&hello(&token("au1_valid_until_2100"))).await;
    assert_eq!(next_json(&mut raw).await["type"], "welcome", "the welcome as it came");
    let iced = next_json(&mut raw).await;
    let servers = iced["body"]["ice_servers"].as_array().unwrap();
    assert_eq!(servers[0], json!({"urls": "turns:localhost:5349?transport=tcp", "username": "u", "credential": "c"}));
    assert_eq!(servers[1]["urls"], "turn:global.turn.twilio.com:3478?transport=udp", "UDP still goes direct");
    assert_eq!(servers[2]["urls"], "stun:global.stun.twilio.com:3478?transport=udp");
    let r = relay.record("handshake").await;
    assert_eq!((r["outcome"].as_str(), r["first_message"].as_str()), (Some("ok"), Some("ice")), "{r}");
    assert_eq!((r["ice_rewritten"].as_bool(), r["ice_servers_rewritten"].as_u64()), (Some(true), Some(1)), "{r}");
    // The pump takes over: the SDK's connect is answered.
    raw.send_text(r#"{"type":"msg","body":{"type":"connect","name":"room"}}"#).await;
    assert_eq!(next_json(&mut raw).await["body"]["type"], "connected");
    drop(raw);
    let close = relay.record("close").await;
    assert_eq!(close["msgs_down"], 3, "welcome, iced and connected: {close}");
    assert_eq!(close["msgs_up"], 2, "{close}");
}

#[tokio::test]
async fn the_rewrite_can_be_turned_off_per_route_and_a_sync_is_never_watched() {
    let pki = Pki::new();
    let gw = Gateway::start_with_ice(&pki, Mode::Twilio, twilio_ice()).await;
    let routes = "[[routes]]\nname = \"signaling\"\npath = \"/signaling\"\nupstream = \"wss://{region}.vss.twilio.com/signaling\"\nregion_from = [\"path\"]\ndefault_region = \"au1\"\nrewrite_ice = false\n";
    let extra = format!("{}[turn]\npublic_url = \"turns:localhost:5349?transport=tcp\"\n{routes}", resolve_all_to(gw.addr));
    let mut relay = Relay::start(&pki, "", "", &extra).await;
    let mut raw = RawWs::connect(&relay, &pki, "/signaling").await;
    raw.send_text(&hello(&token("au1_valid_until_2100"))).await;
    next_json(&mut raw).await;
    let iced = next_json(&mut raw).await;
    assert_eq!(iced["body"]["ice_servers"][0]["urls"], "turns:global.turn.twilio.com:443?transport=tcp");
    let r = relay.record("handshake").await;
    assert_eq!((r["first_message"].as_str(), r["ice_rewritten"].as_bool()), (Some("ice"), None), "{r}");

    let relay_on = Relay::start(&pki, "", "", &format!("{}[turn]\npublic_url = \"turns:localhost:5349?transport=tcp\"\n", resolve_all_to(gw.addr))).await;
    let mut relay_on = relay_on;
    let mut raw = RawWs::connect(&relay_on, &pki, "/au1/signaling").await;
    raw.send_text(&format!(r#"{{"id":"1","type":"hello","version":2,"body":{{"type":"sync","session":"SE1","token":"{}"}}}}"#, token("au1_valid_until_2100"))).await;
    assert_eq!(next_json(&mut raw).await["type"], "welcome");
    let r = relay_on.record("handshake").await;
    assert_eq!((r["first_message"].as_str(), r["ice_rewritten"].as_bool()), (Some("sync"), None), "{r}");
}

#[tokio::test]
async fn an_ice_hello_that_is_not_utf8_is_the_relays_to_refuse_not_sent_ahead() {
    // Valid JSON to a parser that skips the field, not valid UTF-8: the relay fails it with 1007
    // as the pump would, rather than sending it to the gateway before the pump starts.
    let mut text = br#"{"id":"a1","timeout":5000,"type":"hello","version":2,"x":""#.to_vec();
    text.extend_from_slice(b"\xff\xfe");
    let rest = format!(r#"","body":{{"edge":"roaming","token":"{}","type":"ice","version":1}}}}"#, token("au1_valid_until_2100"));
    text.extend_from_slice(rest.as_bytes());
    let mut frame = Vec::new();
    sigrelay::frame::encode_frame(&mut frame, sigrelay::frame::OpCode::Text, &text, Some([1, 2, 3, 4]));
    let pki = Pki::new();
    let gw = Gateway::start_with_ice(&pki, Mode::Twilio, twilio_ice()).await;
    let extra = format!("{}[turn]\npublic_url = \"turns:localhost:5349?transport=tcp\"\n", resolve_all_to(gw.addr));
    let mut relay = Relay::start(&pki, "", "", &extra).await;
    let mut raw = RawWs::connect(&relay, &pki, "/au1/signaling").await;
    raw.send_raw(&frame).await;
    assert_eq!(raw.read_close().await.map(|c| c.0), Some(1007));
    relay.record("handshake").await;
    let c = relay.record("close").await;
    assert_eq!((c["outcome"].as_str(), c["closed_by"].as_str(), c["msgs_up"].as_u64()), (Some("client_protocol_error"), Some("relay"), Some(0)), "{c}");
}

/// A stand-in for the TURN upstream: TLS with a certificate for `names`, answering each read
/// with the same bytes; with `reset_after`, it resets the connection after that many bytes.
async fn fake_turn(pki: &Pki, names: &[&str], reset_after: Option<usize>) -> SocketAddr {
    let tls = pki.server_tls(&names.iter().map(|n| n.to_string()).collect::<Vec<_>>());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                assert!(tls.get_ref().1.alpn_protocol().is_none(), "a TURN client offers no ALPN");
                let mut buf = [0u8; 4096];
                let mut seen = 0;
                loop {
                    let n = match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    seen += n;
                    if reset_after.is_some_and(|r| seen >= r) {
                        let _ = socket2::SockRef::from(tls.get_ref().0).set_linger(Some(Duration::ZERO));
                        return;
                    }
                    if tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

/// A TURN Allocate request's first 20 bytes (a STUN header) and some attribute bytes.
fn stun_message(tid: u8) -> Vec<u8> {
    let mut m = vec![0x00, 0x03, 0x00, 0x08, 0x21, 0x12, 0xA4, 0x42];
    m.extend_from_slice(&[tid; 12]);
    m.extend_from_slice(&[0x00, 0x19, 0x00, 0x04, 0x11, 0x00, 0x00, 0x00]);
    m
}

fn turn_config(to: SocketAddr) -> String {
    format!("[upstream.resolve]\n\"{TURN_HOST}\" = \"{to}\"\n")
}

#[tokio::test]
async fn a_turn_client_on_the_relays_port_reaches_the_turn_upstream() {
    let pki = Pki::new();
    let upstream = fake_turn(&pki, &[TURN_HOST], None).await;
    let mut relay = Relay::start(&pki, "", "", &turn_config(upstream)).await;
    let mut tls = relay.tls(&pki).await;
    let first = stun_message(1);
    let r = turn_echo(&mut tls, &mut relay, &first).await;
    assert_eq!(r["upstream_url"], "turns:global.turn.twilio.com:443");
    assert_eq!(r["upstream_addr"], upstream.to_string());
    assert!(r["upstream_tls_ms"].as_f64().is_some(), "{r}");
    // It is a live connection like any other.
    let (_, list) = http(relay.admin(), "GET", "/connections", &[]).await;
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list[0]["route"], "turn");
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let sent = big.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&sent).await.unwrap();
        wr
    });
    let mut echoed = vec![0u8; big.len()];
    rd.read_exact(&mut echoed).await.unwrap();
    assert!(echoed == big, "every byte, in order");
    let mut tls = rd.unsplit(writer.await.unwrap());
    tls.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut rest)).await;
    let c = relay.record("close").await;
    assert_eq!((c["outcome"].as_str(), c["closed_by"].as_str()), (Some("client_closed"), Some("client")), "{c}");
    assert_eq!(c["bytes_up"].as_u64(), Some((first.len() + big.len()) as u64));
    assert_eq!(c["bytes_down"].as_u64(), Some((first.len() + big.len()) as u64));
    let metrics = relay.app.metrics.encode();
    let up = format!("sigrelay_turn_bytes_total{{direction=\"up\"}} {}", first.len() + big.len());
    assert!(metrics.contains(&up), "{metrics}");
    assert!(metrics.contains("route=\"turn\",outcome=\"ok\""), "{metrics}");

    // A client that names TURN over TLS in its ALPN (RFC 7443's stun.turn) is served too.
    let mut tls = tls_with_alpn(&relay, &pki, b"stun.turn").await;
    turn_echo(&mut tls, &mut relay, &first).await;

    // What ALPN agreed is what must be spoken (RFC 7301 §3.2): HTTP on a stun.turn session is
    // refused, and STUN on an http/1.1 one is not taken for TURN.
    let mut tls = tls_with_alpn(&relay, &pki, b"stun.turn").await;
    tls.write_all(b"GET /au1/signaling HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut out)).await;
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    let r = relay.record("handshake").await;
    assert_eq!(r["outcome"], "bad_request", "{r}");
    assert!(r["error"].as_str().unwrap().contains("stun.turn"), "{r}");
    let mut tls = tls_with_alpn(&relay, &pki, b"http/1.1").await;
    tls.write_all(&first).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut out)).await;
    assert!(!out.windows(first.len()).any(|w| w == first), "not relayed to TURN");
    let r = relay.record("handshake").await;
    assert_eq!((r["outcome"].as_str(), r["route"].as_str()), (Some("bad_request"), None), "{r}");
}

/// A TLS session to the relay whose ALPN agreed on `protocol`.
async fn tls_with_alpn(relay: &Relay, pki: &Pki, protocol: &[u8]) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut alpn = (*pki.client_tls()).clone();
    alpn.alpn_protocols = vec![protocol.to_vec()];
    let tcp = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(alpn)).connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(protocol));
    tls
}

#[tokio::test]
async fn turn_from_a_trusted_proxy_is_not_limited_by_the_proxys_own_address() {
    let pki = Pki::new();
    let upstream = fake_turn(&pki, &[TURN_HOST], None).await;
    let extra = format!("{}[limits]\nmax_connections_per_ip = 1\nhandshakes_per_ip_per_s = 0.01\nhandshake_burst = 1\n", turn_config(upstream));
    // From a client's own address, a second connection is over the per-address limit.
    let mut relay = Relay::start(&pki, "", "", &extra).await;
    let mut held = relay.tls(&pki).await;
    turn_echo(&mut held, &mut relay, &stun_message(1)).await;
    assert!(turn_attempt(&relay, &pki).await.is_empty(), "closed");
    let r = relay.record("handshake").await;
    assert_eq!((r["route"].as_str(), r["outcome"].as_str()), (Some("turn"), Some("over_max_connections_per_ip")), "{r}");
    drop((held, relay));
    // From a trusted proxy, whose TURN streams name no client, neither the per-address limit
    // nor the rate applies to the proxy's own address: one bucket would refuse every client.
    let mut relay = Relay::start(&pki, "trusted_proxies = [\"127.0.0.1\"]", "", &extra).await;
    let mut all = Vec::new();
    for tid in 1..=3 {
        let mut tls = relay.tls(&pki).await;
        turn_echo(&mut tls, &mut relay, &stun_message(tid)).await;
        all.push(tls);
    }
}

/// Sends `first` on a TURN connection, reads it back through the fake upstream, and returns the
/// connection's handshake record, checked to be a TURN one that succeeded.
async fn turn_echo<S: AsyncRead + AsyncWrite + Unpin>(tls: &mut S, relay: &mut Relay, first: &[u8]) -> Value {
    tls.write_all(first).await.unwrap();
    let mut back = vec![0u8; first.len()];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(back, first, "through the relay and back");
    let r = relay.record("handshake").await;
    assert_eq!((r["route"].as_str(), r["outcome"].as_str()), (Some("turn"), Some("ok")), "{r}");
    r
}

/// Waits until the relay holds nothing: no counted connection, no registry entry.
async fn released(relay: &Relay) {
    for _ in 0..100 {
        if relay.app.limiter.total() == 0 && relay.app.registry.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("still held: {} counted, {} registered", relay.app.limiter.total(), relay.app.registry.len());
}

/// Opens a TURN connection through the relay and returns what the client then reads (the relay
/// closes it on a failed upstream).
async fn turn_attempt(relay: &Relay, pki: &Pki) -> Vec<u8> {
    let mut tls = relay.tls(pki).await;
    tls.write_all(&stun_message(2)).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut out)).await;
    out
}

#[tokio::test]
async fn turn_upstream_faults_give_the_right_record_and_leave_nothing_behind() {
    let pki = Pki::new();
    // Refused.
    let mut relay = Relay::start(&pki, "", "connect_timeout = \"1s\"", &turn_config(closed_port().await)).await;
    assert!(turn_attempt(&relay, &pki).await.is_empty());
    let r = relay.record("handshake").await;
    assert_eq!((r["route"].as_str(), r["outcome"].as_str()), (Some("turn"), Some("upstream_connect_error")), "{r}");
    released(&relay).await;

    // Silent after TCP: a timeout in the TLS phase.
    let mut relay = Relay::start(&pki, "", "connect_timeout = \"1s\"", &turn_config(fault_gateway(Fault::Silent).await)).await;
    assert!(turn_attempt(&relay, &pki).await.is_empty());
    let r = relay.record("handshake").await;
    assert_eq!(r["outcome"], "upstream_timeout", "{r}");
    assert!(r["error"].as_str().unwrap().contains("tls phase"), "{r}");
    released(&relay).await;

    // A certificate for another name.
    let wrong = fake_turn(&pki, &["someone-else.example.com"], None).await;
    let mut relay = Relay::start(&pki, "", "", &turn_config(wrong)).await;
    assert!(turn_attempt(&relay, &pki).await.is_empty());
    assert_eq!(relay.record("handshake").await["outcome"], "upstream_tls_error");
    released(&relay).await;

    // Reset mid-stream.
    let resetting = fake_turn(&pki, &[TURN_HOST], Some(40)).await;
    let mut relay = Relay::start(&pki, "", "", &turn_config(resetting)).await;
    let mut tls = relay.tls(&pki).await;
    tls.write_all(&stun_message(3)).await.unwrap();
    let mut echo = vec![0u8; 28];
    tls.read_exact(&mut echo).await.unwrap();
    tls.write_all(&stun_message(4)).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut rest)).await;
    assert_eq!(relay.record("handshake").await["outcome"], "ok");
    let c = relay.record("close").await;
    assert_eq!((c["outcome"].as_str(), c["closed_by"].as_str()), (Some("upstream_gone"), Some("upstream")), "{c}");
    released(&relay).await;
}

#[tokio::test]
async fn turn_connections_close_on_drain_and_can_be_turned_off() {
    let pki = Pki::new();
    let upstream = fake_turn(&pki, &[TURN_HOST], None).await;
    let mut relay = Relay::start(&pki, "drain_timeout = \"200ms\"\ndrain_jitter = \"0s\"", "", &turn_config(upstream)).await;
    let mut tls = relay.tls(&pki).await;
    tls.write_all(&stun_message(5)).await.unwrap();
    let mut echo = vec![0u8; 28];
    tls.read_exact(&mut echo).await.unwrap();
    relay.stop().await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut rest)).await;
    let c = relay.written_closes();
    assert_eq!(c.len(), 1);
    assert_eq!((c[0]["outcome"].as_str(), c[0]["closed_by"].as_str()), (Some("shutdown"), Some("relay")));

    // Off: the same first bytes are only a malformed HTTP request.
    let mut relay = Relay::start(&pki, "", "", &format!("{}[turn]\nenabled = false\n", turn_config(upstream))).await;
    assert!(turn_attempt(&relay, &pki).await.starts_with(b"HTTP/1.1 400"));
    assert_eq!(relay.record("handshake").await["outcome"], "bad_request");
}

#[tokio::test]
async fn diagnose_probes_the_turn_upstream_up_to_a_stun_answer() {
    let pki = Pki::new();
    // The mock gateway answers STUN Binding requests; the echo below only repeats them.
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let relay = Relay::start(&pki, "", "", &resolve_all_to(gw.addr)).await;
    let probes = sigrelay::probe::probe_all(&relay.app.current().config, &relay.app.connector, Some("turn"), None).await;
    assert_eq!(probes.len(), 1);
    let p = &probes[0];
    assert!(p.ok, "{p:?}");
    assert_eq!(p.url, "turns:global.turn.twilio.com:443");
    assert!(p.tls_ms.is_some() && p.stun_ms.is_some(), "{p:?}");

    let echo = fake_turn(&pki, &[TURN_HOST], None).await;
    let relay = Relay::start(&pki, "", "", &turn_config(echo)).await;
    let p = sigrelay::probe::probe_turn(&relay.app.current().config, &relay.app.connector).await;
    assert!(!p.ok);
    assert_eq!(p.outcome, "upstream_protocol_error");
    assert!(p.error.as_deref().unwrap().contains("not a Binding response"), "{p:?}");
}

#[tokio::test]
async fn a_tls_cut_is_an_orderly_end_a_silent_session_times_out_and_only_a_stun_header_is_turn() {
    let pki = Pki::new();
    let upstream = fake_turn(&pki, &[TURN_HOST], None).await;
    let mut relay = Relay::start(&pki, "", "", &format!("{}[turn]\nidle_timeout = \"300ms\"\n", turn_config(upstream))).await;

    // Browsers end a TURN socket without a TLS close_notify: that is not the client vanishing.
    let mut tls = relay.tls(&pki).await;
    tls.write_all(&stun_message(6)).await.unwrap();
    let mut echo = vec![0u8; 28];
    tls.read_exact(&mut echo).await.unwrap();
    let (tcp, _) = tls.into_inner();
    tcp.into_std().unwrap().shutdown(std::net::Shutdown::Both).unwrap();
    assert_eq!(relay.record("handshake").await["outcome"], "ok");
    let c = relay.record("close").await;
    assert_eq!((c["outcome"].as_str(), c["closed_by"].as_str(), c["error"].as_str()), (Some("client_closed"), Some("client"), None), "{c}");

    // One that goes quiet is closed once nothing has passed for [turn] idle_timeout.
    // Timed from before the last message: its echo, the last byte to pass, comes after.
    let mut tls = relay.tls(&pki).await;
    let quiet = std::time::Instant::now();
    tls.write_all(&stun_message(7)).await.unwrap();
    tls.read_exact(&mut echo).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut rest)).await;
    assert!(quiet.elapsed() >= Duration::from_millis(300));
    relay.record("handshake").await;
    let c = relay.record("close").await;
    assert_eq!((c["outcome"].as_str(), c["closed_by"].as_str()), (Some("idle_timeout"), Some("relay")), "{c}");

    // The cookie alone, or a STUN response, is not a TURN client: no upstream connection for it.
    for not_turn in [&stun_message(8)[..8], &[&[0x01, 0x01][..], &stun_message(8)[2..]].concat()[..]] {
        let mut tls = relay.tls(&pki).await;
        tls.write_all(not_turn).await.unwrap();
        tls.shutdown().await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut out)).await;
        let r = relay.record("handshake").await;
        assert_ne!(r["route"], "turn", "{r}");
    }
    released(&relay).await;
}

#[tokio::test]
async fn without_tls_turn_arrives_plain_and_browsers_are_told_nothing_unless_configured() {
    let pki = Pki::new();
    let upstream = fake_turn(&pki, &[TURN_HOST], None).await;
    let mut relay = Relay::start(&pki, "tls = false", "", &turn_config(upstream)).await;
    assert_eq!(relay.app.current().turn_public_url, None, "the certificate does not name what browsers use");
    let mut tcp = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let first = stun_message(9);
    tcp.write_all(&first).await.unwrap();
    let mut back = vec![0u8; first.len()];
    tcp.read_exact(&mut back).await.unwrap();
    assert_eq!(back, first);
    drop(tcp);
    let r = relay.record("handshake").await;
    assert_eq!((r["route"].as_str(), r["outcome"].as_str()), (Some("turn"), Some("ok")), "{r}");
    relay.record("close").await;

    let url = "turns:relay.example.com:443?transport=tcp";
    let relay = Relay::start(&pki, "tls = false", "", &format!("{}[turn]\npublic_url = \"{url}\"\n", turn_config(upstream))).await;
    assert_eq!(relay.app.current().turn_public_url.as_deref(), Some(url));
}

#[tokio::test]
async fn a_reload_changes_turn_both_halves_together() {
    let pki = Pki::new();
    let upstream = fake_turn(&pki, &[TURN_HOST], None).await;
    let relay = Relay::start(&pki, "", "", &turn_config(upstream)).await;
    assert_eq!(relay.app.current().turn_public_url.as_deref(), Some("turns:localhost:443?transport=tcp"));
    let off = Relay::config(&pki, "", "", "", &format!("{}[turn]\nenabled = false\n", turn_config(upstream)));
    relay.app.reload(off).unwrap();
    assert_eq!(relay.app.current().turn_public_url, None, "no iced points at a TURN the relay no longer serves");
    assert!(turn_attempt(&relay, &pki).await.starts_with(b"HTTP/1.1 400"));
    let moved = Relay::config(&pki, "", "", "", &format!("{}[turn]\npublic_url = \"turns:media.example.com:5349?transport=tcp\"\n", turn_config(upstream)));
    relay.app.reload(moved).unwrap();
    assert_eq!(relay.app.current().turn_public_url.as_deref(), Some("turns:media.example.com:5349?transport=tcp"));
}
