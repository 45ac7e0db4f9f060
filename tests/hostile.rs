//! Hostile input: a corpus of malformed and malicious requests, each answered with the right
//! 4xx or a closed socket, never a panic, and never a connection to anything but the
//! configured gateway (which must see none of them).

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sigrelay::tools::mock_gateway::Mode;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

static PANICS: AtomicUsize = AtomicUsize::new(0);

const KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
const UPGRADE: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n";

/// What a request must get: a status line starting so, or (None) a closed socket.
fn corpus() -> Vec<(&'static str, String, Option<&'static str>)> {
    let big = "x".repeat(70 * 1024);
    vec![
        ("no upgrade header", "GET /signaling HTTP/1.1\r\nHost: localhost\r\n\r\n".into(), Some("426")),
        ("upgrade to something else", format!("GET /signaling HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n{KEY}\r\n"), Some("426")),
        ("wrong version", format!("GET /signaling HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 12\r\n{KEY}\r\n"), Some("400")),
        ("missing key", format!("GET /signaling HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}\r\n"), Some("400")),
        ("key not base64", format!("GET /signaling HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}Sec-WebSocket-Key: !!!!\r\n\r\n"), Some("400")),
        ("POST upgrade", format!("POST /signaling HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n{UPGRADE}{KEY}\r\n"), Some("400")),
        ("HTTP/1.0 upgrade", format!("GET /signaling HTTP/1.0\r\nHost: localhost\r\n{UPGRADE}{KEY}\r\n"), Some("400")),
        ("huge header", format!("GET /signaling HTTP/1.1\r\nHost: localhost\r\nX-Big: {big}\r\n{UPGRADE}{KEY}\r\n"), None),
        ("many headers", format!("GET /signaling HTTP/1.1\r\nHost: localhost\r\n{}{UPGRADE}{KEY}\r\n", "X-A: 1\r\n".repeat(200)), None),
        ("absolute URI to another host", format!("GET https://evil.example.com/signaling HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}{KEY}\r\n"), Some("400")),
        ("absolute URI with userinfo", format!("GET https://localhost@evil.example.com/signaling HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}{KEY}\r\n"), Some("400")),
        ("CONNECT", "CONNECT evil.example.com:443 HTTP/1.1\r\nHost: evil.example.com:443\r\n\r\n".into(), Some("400")),
        ("CONNECT to a gateway", "CONNECT au1.vss.twilio.com:443 HTTP/1.1\r\nHost: au1.vss.twilio.com:443\r\n\r\n".into(), Some("400")),
        ("two Host headers", format!("GET /signaling HTTP/1.1\r\nHost: localhost\r\nHost: evil.example.com\r\n{UPGRADE}{KEY}\r\n"), Some("400")),
        ("no Host header", format!("GET /signaling HTTP/1.1\r\n{UPGRADE}{KEY}\r\n"), Some("400")),
        ("empty Host header", format!("GET /signaling HTTP/1.1\r\nHost:\r\n{UPGRADE}{KEY}\r\n"), Some("400")),
        ("two keys", format!("GET /signaling HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}{KEY}Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\n\r\n"), Some("400")),
        ("two versions", format!("GET /signaling HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}Sec-WebSocket-Version: 8\r\n{KEY}\r\n"), Some("400")),
        ("path traversal", format!("GET /../signaling HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}{KEY}\r\n"), Some("40")),
        ("encoded traversal as region", format!("GET /%2e%2e/signaling HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}{KEY}\r\n"), Some("400")),
        ("traversal after a region", format!("GET /au1/../signaling HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}{KEY}\r\n"), Some("404")),
        ("encoded region", format!("GET /%61u1/signaling HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}{KEY}\r\n"), Some("400")),
        ("region with a dot", format!("GET /signaling?region=au1.evil.example.com HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}{KEY}\r\n"), Some("400")),
        ("region with a port", format!("GET /signaling?region=au1:8080 HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}{KEY}\r\n"), Some("400")),
        ("empty region", format!("GET /signaling?region= HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}{KEY}\r\n"), Some("400")),
        ("NUL in the path", format!("GET /au1\0/signaling HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}{KEY}\r\n"), Some("400")),
        ("bare LF line endings", "GET /signaling HTTP/1.1\nHost: localhost\n\n".into(), Some("4")),
        ("header without colon", format!("GET /signaling HTTP/1.1\r\nHost: localhost\r\nnonsense\r\n{UPGRADE}{KEY}\r\n"), Some("400")),
        ("invalid method", "G@T /signaling HTTP/1.1\r\nHost: localhost\r\n\r\n".into(), Some("400")),
        ("HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".into(), None),
        ("binary garbage", "\u{1}\u{2}\u{3}\u{ff}\r\n\r\n".into(), None),
        ("unknown path", format!("GET /admin/connections HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}{KEY}\r\n"), Some("404")),
        ("chunked GET upgrade", format!("GET /signaling HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n{UPGRADE}{KEY}\r\n0\r\n\r\n"), Some("400")),
        ("GET upgrade with a body", format!("GET /signaling HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n{UPGRADE}{KEY}\r\nhello"), Some("400")),
    ]
}

#[tokio::test]
async fn malformed_requests_get_4xx_or_a_closed_socket() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Echo).await;
    let relay = Relay::to_gateway(&pki, &gw, "handshake_timeout = \"2s\"").await;
    let cases = corpus();
    for (what, request, want) in &cases {
        let resp = relay.raw(&pki, request).await;
        match want {
            Some(prefix) => assert!(
                resp.starts_with("HTTP/1.") && resp.get(9..).is_some_and(|s| s.starts_with(prefix)),
                "{what}: {}",
                &resp[..resp.len().min(200)]
            ),
            None => assert!(
                resp.is_empty() || (resp.starts_with("HTTP/1.") && resp.get(9..10) == Some("4")),
                "{what}: expected a closed socket or a 4xx, got {}",
                &resp[..resp.len().min(200)]
            ),
        }
    }

    // Not TLS at all, and TLS ClientHellos cut short.
    let hello_start = [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
    for bytes in [&b"GET / HTTP/1.1\r\n\r\n"[..], &hello_start[..], &hello_start[..3], &[0x16, 0x03, 0x01, 0xff, 0xff][..]] {
        let mut tcp = TcpStream::connect(relay.addr).await.unwrap();
        tcp.write_all(bytes).await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut sink)).await.expect("the relay closes the socket");
        assert!(!sink.starts_with(b"HTTP/"), "no HTTP over a non-TLS connection");
    }

    gw.assert_quiet().await;
    // Still healthy, and relaying.
    let resp = relay.raw(&pki, "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"));
    let mut ws = relay.ws(&pki, "/au1/signaling").await;
    send_text(&mut ws, "after the corpus").await;
    assert_eq!(next_data(&mut ws).await.to_text().unwrap(), "after the corpus");
    assert_eq!(gw.event("connection").await["host"], "au1.vss.twilio.com");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "no panic anywhere");
    eprintln!("hostile corpus: {} requests and 4 non-TLS/fragment inputs", cases.len());
}
