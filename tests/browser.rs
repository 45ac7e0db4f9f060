//! The real twilio-video SDK (npm, pinned) in Debian's Chromium, through sigrelay, to the mock
//! gateway. tests/run.sh installs Chromium and the npm packages; under CI=true a missing piece
//! fails the test instead of skipping it.

mod support;

use std::path::Path;

use serde_json::{json, Value};
use sigrelay::tools::mock_gateway::{token_sha256, Mode};
use support::*;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// One page running `Video.connect` through the relay (tests/browser/connect.mjs).
struct Page(Script);

impl Page {
    async fn open(relay: &Relay, token: &str, signaling: &str, screenshot: Option<&Path>) -> Page {
        Page::open_with(relay, token, signaling, screenshot, false).await
    }

    async fn open_with(relay: &Relay, token: &str, signaling: &str, screenshot: Option<&Path>, probe: bool) -> Page {
        let spec = json!({
            "probe": probe,
            "relay": format!("wss://localhost:{}", relay.addr.port()),
            "token": token,
            "signaling": signaling,
            "insights": "/v1/VideoEvents",
            "screenshot": screenshot,
        });
        Page(Script::start("connect.mjs", &spec))
    }

    /// The next JSON event the page script prints.
    async fn event(&mut self) -> Value {
        self.0.event().await
    }

    async fn disconnect(self) {
        let mut script = self.0;
        script.send("disconnect").await;
        assert_eq!(script.event().await["event"], "disconnected");
        script.finish().await;
    }
}

/// Reads relay records until `n` of the given event have arrived.
async fn records(relay: &mut Relay, event: &str, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(relay.record(event).await);
    }
    out
}

#[tokio::test]
async fn sdk_connects_through_the_relay_and_disconnects_cleanly() {
    if !browser_ready() {
        return;
    }
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Twilio).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;
    let token = token("au1_valid_until_2100");
    let shot = Path::new(REPO).join("target/browser-connected.png");
    let mut page = Page::open(&relay, &token, "/signaling", Some(&shot)).await;
    let connected = page.event().await;
    assert_eq!(connected["event"], "connected", "{connected}");
    assert_eq!(connected["roomSid"], "RM00000000000000000000000000000001");
    assert_eq!(connected["identity"], "alice");

    // Both sockets were relayed, each to its own gateway, with the token intact.
    let signalling = gw.event("connection").await;
    assert_eq!(signalling["path"], "/signaling");
    assert_eq!(signalling["host"], "au1.vss.twilio.com", "the token's twr picks the host");
    assert_eq!(signalling["first_type"], "hello");
    assert_eq!(signalling["token_sha256"], token_sha256(&token));
    assert!(signalling["user_agent"].as_str().unwrap().contains("Chrome"));
    let insights = gw.event("connection").await;
    assert_eq!(insights["path"], "/v1/VideoEvents");
    assert_eq!(insights["host"], "sdkgw.us1.twilio.com");
    assert_eq!(insights["first_type"], "connect");
    assert_eq!(insights["token_sha256"], token_sha256(&token));

    let handshakes = records(&mut relay, "handshake", 2).await;
    let sig = handshakes.iter().find(|r| r["route"] == "signaling").expect("signalling record");
    assert_eq!((sig["outcome"].as_str(), sig["region"].as_str()), (Some("ok"), Some("au1")));
    assert_eq!(sig["region_source"], "token");
    assert!(sig["origin"].as_str().unwrap().starts_with("http://127.0.0.1:"));
    let ins = handshakes.iter().find(|r| r["route"] == "insights").expect("insights record");
    assert_eq!((ins["outcome"].as_str(), ins["region"].as_str()), (Some("ok"), Some("us1")));

    page.disconnect().await;
    let closed = loop {
        let e = gw.event("close").await;
        if e["path"] == "/signaling" {
            break e;
        }
    };
    assert_eq!(closed["code"], 1000, "room.disconnect() closes signalling with 1000: {closed}");
    let closes = records(&mut relay, "close", 2).await;
    let sig_close = closes.iter().find(|r| r["conn_id"] == sig["conn_id"]).expect("signalling close record");
    assert_eq!(sig_close["closed_by"], "client");
    assert_eq!(sig_close["close_code"], 1000);
    assert_eq!(sig_close["outcome"], "client_closed");
    assert!(sig_close["msgs_up"].as_u64().unwrap() >= 3, "hello, connect, disconnect, bye: {sig_close}");
}

#[tokio::test]
async fn region_in_the_path_wins_over_the_token() {
    if !browser_ready() {
        return;
    }
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Twilio).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;
    let mut page = Page::open(&relay, &token("au1_valid_until_2100"), "/de1/signaling", None).await;
    assert_eq!(page.event().await["event"], "connected");
    assert_eq!(gw.event("connection").await["host"], "de1.vss.twilio.com");
    let r = relay.record("handshake").await;
    assert_eq!((r["region"].as_str(), r["region_source"].as_str()), (Some("de1"), Some("path")));
    assert_eq!(r["region_mismatch"], true);
    page.disconnect().await;
}

#[tokio::test]
async fn unreachable_gateway_rejects_connect_with_53000_and_the_record_says_why() {
    if !browser_ready() {
        return;
    }
    let pki = Pki::new();
    let closed = closed_port().await;
    let mut relay = Relay::start(&pki, "", "", &resolve_all_to(closed)).await;
    let mut page = Page::open_with(&relay, &token("au1_valid_until_2100"), "/signaling", None, true).await;
    // What a page sees: close code 1014 and the reason naming the outcome and the conn_id.
    let probe = page.event().await;
    assert_eq!(probe["event"], "probe_closed");
    assert_eq!(probe["code"], 1014, "{probe}");
    let r = relay.record("handshake").await;
    assert_eq!(probe["reason"], format!("upstream_connect_error conn={}", r["conn_id"].as_str().unwrap()));

    let failed = page.event().await;
    assert_eq!(failed["event"], "failed", "{failed}");
    assert_eq!(failed["code"], 53000, "{failed}");
    let r = relay.record("handshake").await;
    assert_eq!(r["outcome"], "upstream_connect_error");
    assert_eq!(r["region"], "au1");
    assert!(r["error"].as_str().unwrap().contains("refused"), "{r}");
}

#[tokio::test]
async fn expired_token_is_flagged_in_the_record() {
    if !browser_ready() {
        return;
    }
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Twilio).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;
    let mut page = Page::open(&relay, &token("au1_expired_2020"), "/signaling", None).await;
    let r = relay.record("handshake").await;
    assert_eq!(r["route"], "signaling");
    assert_eq!(r["token_expired"], true);
    assert_eq!(r["token_exp"], 1577836800i64);
    if page.event().await["event"] == "connected" {
        page.disconnect().await;
    }
}
