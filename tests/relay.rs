//! The relay end to end: routing, relaying, records, and every handshake outcome, against real
//! servers on 127.0.0.1:0.

mod support;

use futures_util::SinkExt;
use serde_json::Value;
use sigrelay::tools::mock_gateway::{token_sha256, Mode};
use support::*;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Asserts the browser got close code `code` with the reason `<outcome> conn=<conn_id>`.
fn assert_close(frame: &Option<(u16, String)>, code: u16, record: &Value) {
    let (got, reason) = frame.as_ref().expect("a close frame");
    assert_eq!(*got, code, "close code");
    let want = format!("{} conn={}", record["outcome"].as_str().unwrap(), record["conn_id"].as_str().unwrap());
    assert_eq!(reason, &want);
}

#[tokio::test]
async fn token_region_routes_signalling_and_arrives_intact() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Twilio).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;
    let token = token("au1_valid_until_2100");
    let mut ws = relay.ws(&pki, "/signaling").await;
    send_text(&mut ws, &hello(&token)).await;
    let welcome: Value = serde_json::from_str(next_data(&mut ws).await.to_text().unwrap()).unwrap();
    assert_eq!(welcome["type"], "welcome");

    let seen = gw.event("connection").await;
    assert_eq!(seen["host"], "au1.vss.twilio.com");
    assert_eq!(seen["path"], "/signaling");
    assert_eq!(seen["first_type"], "hello");
    assert_eq!(seen["token_sha256"], token_sha256(&token));

    let r = relay.record("handshake").await;
    assert_eq!(r["outcome"], "ok");
    assert_eq!(r["route"], "signaling");
    assert_eq!(r["region"], "au1");
    assert_eq!(r["region_source"], "token");
    assert_eq!(r["token_region"], "au1");
    assert_eq!(r["token_exp"], 4102444800i64);
    assert_eq!(r["token_expired"], false);
    assert_eq!(r["region_mismatch"], false);
    assert_eq!(r["upstream_url"], "wss://au1.vss.twilio.com/signaling");
    assert_eq!(r["upstream_addr"], gw.addr.to_string());
    assert_eq!(r["upstream_status"], 101);
    assert_eq!(r["sni"], "localhost");
    assert_eq!(r["path"], "/signaling");
    for t in ["tls_ms", "upstream_dns_ms", "upstream_connect_ms", "upstream_tls_ms", "upstream_ws_ms", "total_ms"] {
        assert!(r[t].as_f64().is_some(), "{t} in {r}");
    }
    assert!(r["ts"].as_str().unwrap().ends_with('Z'));
    assert_eq!(r["conn_id"].as_str().unwrap().len(), 26);
    let line = serde_json::to_string(&r).unwrap();
    assert!(!line.contains(&token), "the token never appears in a record");

    ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() })).await.unwrap();
    let closed = gw.event("close").await;
    assert_eq!(closed["code"], 1000);
    let c = relay.record("close").await;
    assert_eq!(c["conn_id"], r["conn_id"]);
    assert_eq!(c["outcome"], "client_closed");
    assert_eq!(c["closed_by"], "client");
    assert_eq!(c["close_code"], 1000);
    assert_eq!(c["close_reason"], "bye");
    assert_eq!(c["msgs_up"], 1);
    assert!(c["msgs_down"].as_u64().unwrap() >= 2, "welcome and iced: {c}");
    assert!(c["bytes_up"].as_u64().unwrap() > token.len() as u64);
}

#[tokio::test]
async fn path_region_wins_over_the_token_and_is_flagged() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Twilio).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;
    let mut ws = relay.ws(&pki, "/de1/signaling").await;
    send_text(&mut ws, &hello(&token("au1_valid_until_2100"))).await;
    next_data(&mut ws).await;
    assert_eq!(gw.event("connection").await["host"], "de1.vss.twilio.com");
    let r = relay.record("handshake").await;
    assert_eq!(r["region"], "de1");
    assert_eq!(r["region_source"], "path");
    assert_eq!(r["token_region"], "au1");
    assert_eq!(r["region_mismatch"], true);
    assert_eq!(r["path"], "/de1/signaling");
}

#[tokio::test]
async fn query_region_and_default_region() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Twilio).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;

    let mut ws = relay.ws(&pki, "/signaling?region=jp1&x=1").await;
    send_text(&mut ws, &hello(&token("no_region_valid_until_2100"))).await;
    next_data(&mut ws).await;
    assert_eq!(gw.event("connection").await["host"], "jp1.vss.twilio.com");
    let r = relay.record("handshake").await;
    assert_eq!((r["region"].as_str(), r["region_source"].as_str()), (Some("jp1"), Some("query")));
    assert_eq!(r["path"], "/signaling", "path excludes the query");
    assert_eq!(r["region_mismatch"], Value::Null, "the token names no region");

    // No region anywhere: gll, written as global in the host but as gll in the record.
    let mut ws = relay.ws(&pki, "/signaling").await;
    send_text(&mut ws, &hello(&token("no_region_valid_until_2100"))).await;
    next_data(&mut ws).await;
    assert_eq!(gw.event("connection").await["host"], "global.vss.twilio.com");
    let r = relay.record("handshake").await;
    assert_eq!((r["region"].as_str(), r["region_source"].as_str()), (Some("gll"), Some("default")));
    assert_eq!(r["upstream_url"], "wss://global.vss.twilio.com/signaling");
}

#[tokio::test]
async fn insights_route_ignores_the_token_region() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Twilio).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;
    let token = token("au1_valid_until_2100");
    let mut ws = relay.ws(&pki, "/v1/VideoEvents").await;
    send_text(&mut ws, &format!(r#"{{"type":"connect","token":"{token}","version":1}}"#)).await;
    let reply: Value = serde_json::from_str(next_data(&mut ws).await.to_text().unwrap()).unwrap();
    assert_eq!(reply["type"], "connected");
    let seen = gw.event("connection").await;
    assert_eq!(seen["host"], "sdkgw.us1.twilio.com");
    assert_eq!(seen["token_sha256"], token_sha256(&token));
    let r = relay.record("handshake").await;
    assert_eq!(r["route"], "insights");
    assert_eq!((r["region"].as_str(), r["region_source"].as_str()), (Some("us1"), Some("default")));
    assert_eq!(r["token_region"], "au1", "recorded even though it does not route");
    assert_eq!(r["region_mismatch"], Value::Null);

    let mut ws = relay.ws(&pki, "/au1/v1/VideoEvents").await;
    send_text(&mut ws, &format!(r#"{{"type":"connect","token":"{token}","version":1}}"#)).await;
    next_data(&mut ws).await;
    assert_eq!(gw.event("connection").await["host"], "sdkgw.au1.twilio.com");
}

#[tokio::test]
async fn token_region_outside_the_allow_list_is_ignored() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Twilio).await;
    let mut relay = Relay::start(&pki, "", "", &format!("[routing]\nregions = [\"gll\", \"de1\", \"us1\"]\n{}", resolve_all_to(gw.addr))).await;
    let mut ws = relay.ws(&pki, "/signaling").await;
    send_text(&mut ws, &hello(&token("au1_valid_until_2100"))).await;
    next_data(&mut ws).await;
    assert_eq!(gw.event("connection").await["host"], "global.vss.twilio.com");
    let r = relay.record("handshake").await;
    assert_eq!((r["region"].as_str(), r["region_source"].as_str()), (Some("gll"), Some("default")));
    assert_eq!(r["token_region"], "au1");
    assert_eq!(r["region_mismatch"], true);
}

#[tokio::test]
async fn silent_client_falls_back_to_the_default_after_first_message_timeout() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "first_message_timeout = \"300ms\"").await;
    let mut ws = relay.ws(&pki, "/signaling").await;
    let r = relay.record("handshake").await;
    assert_eq!((r["region"].as_str(), r["region_source"].as_str()), (Some("gll"), Some("default")));
    assert_eq!(r["token_present"], false);
    assert_eq!(r["outcome"], "ok", "{r}");
    send_text(&mut ws, "late hello").await;
    assert_eq!(next_data(&mut ws).await.to_text().unwrap(), "late hello");
    assert_eq!(gw.event("connection").await["first_type"], Value::Null);
}

#[tokio::test]
async fn relays_text_binary_and_large_messages_in_order() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;
    let mut ws = relay.ws(&pki, "/au1/signaling").await;
    let big: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    for i in 0..50 {
        send_text(&mut ws, &format!("msg {i}")).await;
    }
    ws.send(Message::binary(big.clone())).await.unwrap();
    ws.send(Message::binary(vec![])).await.unwrap();
    for i in 0..50 {
        assert_eq!(next_data(&mut ws).await.to_text().unwrap(), format!("msg {i}"));
    }
    assert_eq!(next_data(&mut ws).await.into_data().as_ref(), &big[..]);
    assert_eq!(next_data(&mut ws).await.into_data().len(), 0);
    ws.close(None).await.unwrap();
    read_close(&mut ws).await;
    relay.record("handshake").await;
    let c = relay.record("close").await;
    assert_eq!((c["msgs_up"].as_u64(), c["msgs_down"].as_u64()), (Some(52), Some(52)));
    assert_eq!(c["close_code"], Value::Null, "a close frame without a code");
    assert_eq!(c["close_reason"], Value::Null);
}

#[tokio::test]
async fn gateway_close_code_and_reason_reach_the_browser() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;
    let mut ws = relay.ws(&pki, "/au1/signaling").await;
    send_text(&mut ws, "close 4002 room ended").await;
    let frame = read_close(&mut ws).await.expect("close frame");
    assert_eq!(u16::from(frame.code), 4002);
    assert_eq!(frame.reason.as_str(), "room ended");
    relay.record("handshake").await;
    let c = relay.record("close").await;
    assert_eq!(c["outcome"], "upstream_closed");
    assert_eq!(c["closed_by"], "upstream");
    assert_eq!(c["close_code"], 4002);
    assert_eq!(c["close_reason"], "room ended");
}

#[tokio::test]
async fn browser_close_code_reaches_the_gateway() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;
    let mut ws = relay.ws(&pki, "/au1/signaling").await;
    send_text(&mut ws, "hi").await;
    next_data(&mut ws).await;
    ws.close(Some(CloseFrame { code: CloseCode::from(3001), reason: "heartbeats missed".into() })).await.unwrap();
    let closed = gw.event("close").await;
    assert_eq!(closed["code"], 3001);
    assert_eq!(closed["reason"], "heartbeats missed");
    relay.record("handshake").await;
    let c = relay.record("close").await;
    assert_eq!((c["closed_by"].as_str(), c["close_code"].as_u64()), (Some("client"), Some(3001)));
}

#[tokio::test]
async fn oversized_message_closes_1009_to_sender_and_1001_to_gateway() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "max_message_size = 2048").await;
    let mut ws = relay.ws(&pki, "/au1/signaling").await;
    send_text(&mut ws, "small").await;
    next_data(&mut ws).await;
    ws.send(Message::binary(vec![7u8; 4096])).await.unwrap();
    let frame = read_close(&mut ws).await;
    let r = relay.record("handshake").await;
    let c = relay.record("close").await;
    assert_eq!(c["outcome"], "message_too_big");
    assert_eq!(c["closed_by"], "relay");
    assert_eq!(c["close_code"], 1009);
    let frame = frame.expect("close frame");
    assert_eq!(u16::from(frame.code), 1009);
    assert_eq!(frame.reason.as_str(), format!("message_too_big conn={}", r["conn_id"].as_str().unwrap()));
    assert_eq!(gw.event("close").await["code"], 1001);
}

#[tokio::test]
async fn vanished_browser_gets_the_gateway_a_1001() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;
    let mut ws = relay.ws(&pki, "/au1/signaling").await;
    send_text(&mut ws, "hi").await;
    next_data(&mut ws).await;
    drop(ws);
    assert_eq!(gw.event("close").await["code"], 1001);
    relay.record("handshake").await;
    let c = relay.record("close").await;
    assert_eq!((c["outcome"].as_str(), c["closed_by"].as_str()), (Some("client_gone"), Some("client")));
    assert_eq!(relay.app.registry.len(), 0, "registry entry released");
}

#[tokio::test]
async fn cookie_and_authorization_never_reach_the_gateway() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;
    let headers = [
        ("cookie", "session=SECRETCOOKIE"),
        ("authorization", "Bearer SECRETBEARER"),
        ("origin", "https://app.example.com"),
        ("user-agent", "TestBrowser/1.0"),
        ("x-forwarded-for", "6.6.6.6"),
    ];
    let mut ws = relay.ws_with(&pki, "/au1/signaling", &headers).await.unwrap();
    send_text(&mut ws, "hi").await;
    next_data(&mut ws).await;
    let seen = gw.event("connection").await;
    assert_eq!(seen["cookie"], false);
    assert_eq!(seen["authorization"], false);
    assert_eq!(seen["origin"], "https://app.example.com");
    assert_eq!(seen["user_agent"], "TestBrowser/1.0");
    assert_eq!(seen["x_forwarded_for"], "127.0.0.1", "an untrusted X-Forwarded-For is replaced");
    let r = relay.record("handshake").await;
    assert_eq!(r["origin"], "https://app.example.com");
    assert_eq!(r["user_agent"], "TestBrowser/1.0");
    let line = r.to_string();
    assert!(!line.contains("SECRET"), "{line}");
}

#[tokio::test]
async fn the_request_cannot_steer_the_upstream_host() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;

    // The Host header is ignored for routing.
    let mut ws = relay.ws_with(&pki, "/au1/signaling", &[("host", "evil.example.com")]).await.unwrap();
    send_text(&mut ws, "hi").await;
    next_data(&mut ws).await;
    assert_eq!(gw.event("connection").await["host"], "au1.vss.twilio.com");
    relay.record("handshake").await;

    let upgrade = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    // An absolute URI naming another host.
    let resp = relay.raw(&pki, &format!("GET https://evil.example.com/signaling HTTP/1.1\r\nHost: localhost\r\n{upgrade}")).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_eq!(relay.record("handshake").await["outcome"], "bad_request");
    // Odd region strings in the path and the query.
    for target in [
        "/evil.example.com/signaling",
        "/..%2F..%2Fevil/signaling",
        "/AU1/signaling",
        "/au1%00/signaling",
        "/signaling?region=evil.example.com",
        "/signaling?region=au1.evil.example.com",
        "/signaling?region=au%31",
    ] {
        let resp = relay.raw(&pki, &format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n{upgrade}")).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{target}: {resp}");
        let r = relay.record("handshake").await;
        assert_eq!(r["outcome"], "bad_region", "{target}");
    }
    // CONNECT never tunnels anywhere.
    let resp = relay.raw(&pki, "CONNECT evil.example.com:443 HTTP/1.1\r\nHost: evil.example.com:443\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_eq!(relay.record("handshake").await["outcome"], "bad_request");
    gw.assert_quiet().await;
}

#[tokio::test]
async fn http_answers_before_the_upgrade() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;

    let resp = relay.raw(&pki, "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    relay.assert_no_record().await;

    let resp = relay.raw(&pki, "GET /signaling HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 426"), "{resp}");
    let r = relay.record("handshake").await;
    assert_eq!((r["outcome"].as_str(), r["route"].as_str()), (Some("not_websocket"), Some("signaling")));
    assert!(resp.contains(r["conn_id"].as_str().unwrap()), "the body names the conn_id");

    let resp = relay.raw(&pki, "GET /nowhere HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    assert_eq!(relay.record("handshake").await["outcome"], "not_found");

    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    for (what, req) in [
        ("missing key", "GET /signaling HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n".to_string()),
        ("wrong version", format!("GET /signaling HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 8\r\n{key}\r\n")),
        ("wrong method", format!("POST /signaling HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n{key}\r\n")),
        ("short key", "GET /signaling HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\n\r\n".to_string()),
        ("no connection upgrade", format!("GET /signaling HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n{key}\r\n")),
    ] {
        let resp = relay.raw(&pki, &req).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{what}: {resp}");
        assert_eq!(relay.record("handshake").await["outcome"], "bad_request", "{what}");
        if what == "wrong version" {
            assert!(resp.to_ascii_lowercase().contains("sec-websocket-version: 13"), "{resp}");
        }
    }
}

/// Starts a relay whose signalling route points at `target` for au1, and opens a socket to it.
async fn failing_upstream(pki: &Pki, resolve: &str, upstream_extra: &str) -> (Relay, Value, Option<(u16, String)>) {
    let mut relay = Relay::start(pki, "", upstream_extra, resolve).await;
    let mut ws = RawWs::connect(&relay, pki, "/au1/signaling").await;
    ws.send_text(&hello(&token("au1_valid_until_2100"))).await;
    let frame = ws.read_close().await;
    let r = relay.record("handshake").await;
    assert_eq!(r["region"], "au1");
    assert_eq!(r["token_region"], "au1", "token read even though the gateway failed");
    (relay, r, frame)
}

#[tokio::test]
async fn upstream_dns_error() {
    let pki = Pki::new();
    let (mut relay, r, frame) = failing_upstream(&pki, "", "").await;
    assert_eq!(r["outcome"], "upstream_dns_error");
    assert!(r["error"].as_str().unwrap().contains("au1.vss.twilio.com"), "{r}");
    assert_close(&frame, 1014, &r);
    relay.assert_no_record().await;
}

#[tokio::test]
async fn upstream_connect_error() {
    let pki = Pki::new();
    let port = closed_port().await;
    let (_relay, r, frame) = failing_upstream(&pki, &format!("[upstream.resolve]\n\"au1.vss.twilio.com\" = \"{port}\""), "").await;
    assert_eq!(r["outcome"], "upstream_connect_error");
    assert!(r["upstream_dns_ms"].as_f64().is_some());
    assert_close(&frame, 1014, &r);
}

#[tokio::test]
async fn upstream_timeout_names_the_phase() {
    let pki = Pki::new();
    let silent = fault_gateway(Fault::Silent).await;
    let (_relay, r, frame) = failing_upstream(
        &pki,
        &format!("[upstream.resolve]\n\"au1.vss.twilio.com\" = \"{silent}\""),
        "connect_timeout = \"400ms\"",
    )
    .await;
    assert_eq!(r["outcome"], "upstream_timeout");
    assert!(r["error"].as_str().unwrap().contains("tls phase"), "{r}");
    assert_close(&frame, 1014, &r);

    let tls = pki.server_tls(&sigrelay::tools::pki::twilio_names());
    let stalls = fault_gateway(Fault::TlsThenSilent(tls)).await;
    let (_relay, r, _) = failing_upstream(
        &pki,
        &format!("[upstream.resolve]\n\"au1.vss.twilio.com\" = \"{stalls}\""),
        "connect_timeout = \"400ms\"",
    )
    .await;
    assert_eq!(r["outcome"], "upstream_timeout");
    assert!(r["error"].as_str().unwrap().contains("websocket phase"), "{r}");
    assert!(r["upstream_tls_ms"].as_f64().is_some());
}

#[tokio::test]
async fn upstream_tls_error_for_wrong_name_and_untrusted_certificate() {
    let pki = Pki::new();
    let wrong_name = fault_gateway(Fault::TlsRespond(pki.server_tls(&["other.example.com".into()]), "")).await;
    let (_relay, r, frame) = failing_upstream(&pki, &format!("[upstream.resolve]\n\"au1.vss.twilio.com\" = \"{wrong_name}\""), "").await;
    assert_eq!(r["outcome"], "upstream_tls_error");
    assert_close(&frame, 1014, &r);

    let other_ca = Pki::named("some other CA");
    let untrusted = fault_gateway(Fault::TlsRespond(other_ca.server_tls(&sigrelay::tools::pki::twilio_names()), "")).await;
    let (_relay, r, _) = failing_upstream(&pki, &format!("[upstream.resolve]\n\"au1.vss.twilio.com\" = \"{untrusted}\""), "").await;
    assert_eq!(r["outcome"], "upstream_tls_error");
    assert!(r["error"].as_str().unwrap().to_lowercase().contains("issuer"), "{r}");
}

#[tokio::test]
async fn upstream_rejected_with_its_status() {
    let pki = Pki::new();
    for (status, reply) in [
        (401, "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"),
        (403, "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"),
        (500, "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"),
        (503, "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"),
    ] {
        let tls = pki.server_tls(&sigrelay::tools::pki::twilio_names());
        let gw = fault_gateway(Fault::TlsRespond(tls, reply)).await;
        let (_relay, r, frame) = failing_upstream(&pki, &format!("[upstream.resolve]\n\"au1.vss.twilio.com\" = \"{gw}\""), "").await;
        assert_eq!(r["outcome"], "upstream_rejected");
        assert_eq!(r["upstream_status"], status);
        assert_close(&frame, 1014, &r);
    }
}

#[tokio::test]
async fn upstream_protocol_error_for_a_bad_101() {
    let pki = Pki::new();
    let tls = pki.server_tls(&sigrelay::tools::pki::twilio_names());
    let reply = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: wrong\r\n\r\n";
    let gw = fault_gateway(Fault::TlsRespond(tls, reply)).await;
    let (_relay, r, frame) = failing_upstream(&pki, &format!("[upstream.resolve]\n\"au1.vss.twilio.com\" = \"{gw}\""), "").await;
    assert_eq!(r["outcome"], "upstream_protocol_error");
    assert!(r["error"].as_str().unwrap().contains("Sec-WebSocket-Accept"), "{r}");
    assert_close(&frame, 1014, &r);
}

#[tokio::test]
async fn a_frame_sent_in_the_same_write_as_the_gateways_101_is_relayed() {
    let pki = Pki::new();
    let gw = fault_gateway(Fault::TlsUpgradeThenGreet(pki.server_tls(&sigrelay::tools::pki::twilio_names()))).await;
    let mut relay = Relay::start(&pki, "", "", &resolve_all_to(gw)).await;
    let mut ws = RawWs::connect(&relay, &pki, "/au1/signaling").await;
    ws.send_text(&hello(&token("au1_valid_until_2100"))).await;
    let frame = tokio::time::timeout(WAIT, ws.next_frame()).await.expect("a frame in time");
    assert_eq!(frame, Some((sigrelay::frame::OpCode::Text, b"greeting".to_vec())));
    assert_eq!(relay.record("handshake").await["outcome"], "ok");
}

#[tokio::test]
async fn expired_token_is_recorded_and_optionally_refused() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Twilio).await;
    let expired = token("au1_expired_2020");

    let mut relay = Relay::to_gateway(&pki, &gw, "").await;
    let mut ws = relay.ws(&pki, "/signaling").await;
    send_text(&mut ws, &hello(&expired)).await;
    next_data(&mut ws).await;
    let r = relay.record("handshake").await;
    assert_eq!((r["outcome"].as_str(), r["token_expired"].as_bool()), (Some("ok"), Some(true)));
    assert_eq!(r["token_exp"], 1577836800i64);
    gw.event("connection").await;

    let mut relay = Relay::to_gateway(&pki, &gw, "reject_expired_tokens = true").await;
    let mut ws = RawWs::connect(&relay, &pki, "/au1/signaling").await;
    ws.send_text(&hello(&expired)).await;
    let frame = ws.read_close().await;
    let r = relay.record("handshake").await;
    assert_eq!(r["outcome"], "token_expired");
    assert_eq!(r["token_expired"], true);
    assert_eq!(r["upstream_addr"], Value::Null, "no upstream connection was made");
    assert_close(&frame, 1008, &r);
    gw.assert_quiet().await;
}

#[tokio::test]
async fn client_tls_error_timeout_and_no_request_are_recorded() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "handshake_timeout = \"300ms\"").await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut tcp = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    tcp.write_all(b"GET /signaling HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = tcp.read_to_end(&mut sink).await;
    let r = relay.record("handshake").await;
    assert_eq!(r["outcome"], "client_tls_error");
    assert_eq!(r["client_addr"], tcp.local_addr().unwrap().to_string());

    let _idle = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let r = relay.record("handshake").await;
    assert_eq!(r["outcome"], "client_timeout");
    assert!(r["error"].as_str().unwrap().contains("TLS handshake"), "{r}");

    let _tls_idle = relay.tls(&pki).await;
    let r = relay.record("handshake").await;
    assert_eq!(r["outcome"], "client_timeout");
    assert_eq!(r["sni"], "localhost");

    drop(relay.tls(&pki).await);
    let r = relay.record("handshake").await;
    assert_eq!(r["outcome"], "no_request");
}

#[tokio::test]
async fn shutdown_closes_live_connections_with_1012_and_records_them() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "drain_timeout = \"200ms\"").await;
    let mut sockets = Vec::new();
    for _ in 0..3 {
        let mut ws = relay.ws(&pki, "/au1/signaling").await;
        send_text(&mut ws, "hi").await;
        next_data(&mut ws).await;
        sockets.push(ws);
    }
    relay.stop().await;
    for ws in &mut sockets {
        let frame = read_close(ws).await.expect("close frame");
        assert_eq!(u16::from(frame.code), 1012);
        assert!(frame.reason.starts_with("shutdown conn="));
    }
    for _ in 0..3 {
        assert_eq!(gw.event("close").await["code"], 1012);
    }
    let closes = relay.written_closes();
    for v in &closes {
        assert_eq!((v["outcome"].as_str(), v["closed_by"].as_str()), (Some("shutdown"), Some("relay")));
    }
    assert_eq!(closes.len(), 3);
    assert_eq!(relay.app.registry.len(), 0);
}

/// A burst of connections to one gateway resumes TLS sessions instead of paying full
/// handshakes: the relay keeps more tickets per gateway than rustls's 8.
#[tokio::test]
async fn a_burst_to_one_gateway_resumes_tls() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Echo).await;
    let relay = Relay::to_gateway(&pki, &gw, "").await;
    let open = |i: usize| {
        let (relay, pki) = (&relay, &pki);
        async move {
            let mut ws = relay.ws(pki, "/au1/signaling").await;
            send_text(&mut ws, &format!("hello {i}")).await;
            assert_eq!(next_data(&mut ws).await.to_text().unwrap(), format!("hello {i}"));
            ws
        }
    };
    // One after another: each leaves the relay two tickets and takes at most one.
    for i in 0..16 {
        let mut ws = open(i).await;
        ws.close(None).await.unwrap();
        gw.event("connection").await;
    }
    let burst = futures_util::future::join_all((0..16).map(open)).await;
    let mut resumed = 0;
    for _ in 0..16 {
        if gw.event("connection").await["resumed"] == true {
            resumed += 1;
        }
    }
    assert_eq!(resumed, 16, "every connection of the burst resumed");
    drop(burst);
}
