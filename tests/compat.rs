//! The SDK versions and browser engines users run, through the relay: each pinned twilio-video
//! release (npm aliases in tests/browser/package.json) in Debian's Chromium and Firefox ESR, and
//! a rolling restart (relay A drains while relay B takes over its port) that a connected room
//! survives. tests/run.sh installs both browsers and the npm packages; under CI=true a missing
//! piece fails the test instead of skipping it.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sigrelay::tools::mock_gateway::{token_sha256, Mode};
use support::*;

/// The SDK releases tested: the npm package (an alias in tests/browser/package.json), the
/// version it reports, and the RSP version its connect carries.
const SDKS: &[(&str, &str, u64)] = &[
    // The first release that gets its ICE servers over the signalling socket.
    ("twilio-video-2.5", "2.5.1", 2),
    ("twilio-video-2.20", "2.20.1", 2),
    ("twilio-video-2.28", "2.28.2", 2),
    ("twilio-video", "2.36.0", 2),
    ("twilio-video-3.0", "3.0.0-preview.3", 3),
];

const ROOM_SID: &str = "RM00000000000000000000000000000001";
const SESSION: &str = "SE00000000000000000000000000000001";

fn firefox() -> String {
    std::env::var("FIREFOX").unwrap_or_else(|_| "/usr/bin/firefox-esr".into())
}

/// Whether the engine, node and the npm packages are here; in CI their absence is a failure.
fn engine_ready(engine: &str) -> bool {
    let needs = match engine {
        "firefox" => vec![firefox()],
        // The paths tests/browser/launch.mjs uses (it takes $MINIBROWSER too).
        "webkit" => vec![
            "/usr/bin/Xvfb".into(),
            "/usr/bin/WebKitWebDriver".into(),
            std::env::var("MINIBROWSER").unwrap_or_else(|_| "/usr/lib/x86_64-linux-gnu/webkit2gtk-4.1/MiniBrowser".into()),
        ],
        _ => vec![chromium()],
    };
    let missing: Vec<&String> = needs.iter().filter(|p| !std::path::Path::new(p).exists()).collect();
    browser_ready() && tool_ready(missing.is_empty(), &format!("{missing:?} missing: run tests/run.sh"))
}

fn spec(engine: &str, relay: &Relay, token: &str, packages: &[&str]) -> Value {
    json!({
        "engine": engine,
        "relay": format!("wss://localhost:{}", relay.addr.port()),
        "token": token,
        "signaling": "/signaling",
        "insights": "/v1/VideoEvents",
        "packages": packages,
    })
}

/// Gateway events, read until one of each wanted `(event, path)` has arrived (later ones of a
/// kind already seen are dropped); returned in the order wanted.
async fn gateway_events(gw: &mut Gateway, wanted: &[(&str, &str)]) -> Vec<Value> {
    let mut found: Vec<Option<Value>> = vec![None; wanted.len()];
    let fut = async {
        while found.iter().any(Option::is_none) {
            let e = gw.events.recv().await.expect("gateway events channel closed");
            if let Some(i) = wanted.iter().position(|(kind, path)| e["event"] == *kind && e["path"] == *path) {
                found[i].get_or_insert(e);
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(20), fut).await.is_err() {
        panic!("gateway events missing; wanted {wanted:?}, have {found:?}");
    }
    found.into_iter().map(Option::unwrap).collect()
}

/// Relay records of `event`, read until one for each of `routes` (in that order).
async fn records_by_route(relay: &mut Relay, event: &str, routes: &[&str]) -> Vec<Value> {
    let mut found: Vec<Option<Value>> = vec![None; routes.len()];
    while found.iter().any(Option::is_none) {
        let r = relay.record(event).await;
        if let Some(i) = routes.iter().position(|route| r["route"] == *route) {
            found[i].get_or_insert(r);
        }
    }
    found.into_iter().map(Option::unwrap).collect()
}

/// The close record of connection `conn_id`.
async fn close_of(relay: &mut Relay, conn_id: &Value) -> Value {
    loop {
        let r = relay.record("close").await;
        if r["conn_id"] == *conn_id {
            return r;
        }
    }
}

/// Every SDK release in one browser of `engine`, one after another: each connects through the
/// relay, the gateway gets the token intact at the region the token names, and `disconnect()`
/// closes with 1000 and a `client_closed` record.
async fn matrix(engine: &str) {
    if !engine_ready(engine) {
        return;
    }
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Twilio).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;
    let token = token("au1_valid_until_2100");
    let packages: Vec<&str> = SDKS.iter().map(|s| s.0).collect();
    let mut script = Script::start("sdk.mjs", &spec(engine, &relay, &token, &packages));
    for &(package, version, rsp) in SDKS {
        let what = format!("{package} in {engine}");
        if engine == "webkit" {
            webkit_signalling(&mut script, &mut gw, &mut relay, &token, &what, version).await;
            continue;
        }
        let connected = script.event().await;
        assert_eq!(connected["event"], "connected", "{what}: {connected}");
        assert_eq!(connected["sdk"], version, "{what}: the page loaded another release");
        assert_eq!(connected["roomSid"], ROOM_SID, "{what}");
        assert_eq!(connected["identity"], "alice", "{what}");

        let seen = gateway_events(&mut gw, &[("connection", "/signaling"), ("room", "/signaling"), ("connection", "/v1/VideoEvents")]).await;
        let (sig, room, ins) = (&seen[0], &seen[1], &seen[2]);
        assert_eq!(sig["host"], "au1.vss.twilio.com", "{what}: the token's twr picks the region");
        assert_eq!(sig["token_sha256"], token_sha256(&token), "{what}: the token arrives intact");
        assert_eq!((sig["first_type"].as_str(), sig["body_type"].as_str()), (Some("hello"), Some("ice")), "{what}");
        assert_eq!((room["state"].as_str(), room["rsp_version"].as_u64()), (Some("connected"), Some(rsp)), "{what}");
        assert_eq!(ins["host"], "sdkgw.us1.twilio.com", "{what}");
        assert_eq!(ins["token_sha256"], token_sha256(&token), "{what}");

        let handshakes = records_by_route(&mut relay, "handshake", &["signaling", "insights"]).await;
        let (sig_rec, ins_rec) = (&handshakes[0], &handshakes[1]);
        assert_eq!((sig_rec["outcome"].as_str(), sig_rec["region"].as_str()), (Some("ok"), Some("au1")), "{what}: {sig_rec}");
        assert_eq!((sig_rec["region_source"].as_str(), sig_rec["first_message"].as_str()), (Some("token"), Some("ice")), "{what}");
        assert_eq!((ins_rec["outcome"].as_str(), ins_rec["first_message"].as_str()), (Some("ok"), Some("connect")), "{what}");

        script.send("next").await;
        let disconnected = script.event().await;
        assert_eq!(disconnected["event"], "disconnected", "{what}: {disconnected}");
        let closed = gateway_events(&mut gw, &[("close", "/signaling")]).await;
        assert_eq!(closed[0]["code"], 1000, "{what}: room.disconnect() closes signalling with 1000");
        let close = close_of(&mut relay, &sig_rec["conn_id"]).await;
        assert_eq!(
            (close["outcome"].as_str(), close["closed_by"].as_str(), close["close_code"].as_u64()),
            (Some("client_closed"), Some("client"), Some(1000)),
            "{what}: {close}"
        );
        eprintln!("compat: {what}: connected through the relay, token intact, region au1, closed 1000");
    }
    let done = script.event().await;
    assert_eq!(done["event"], "done", "{done}");
    eprintln!("compat: {engine} is {}", done["browser"]);
    script.finish().await;
}

/// Debian's WebKitGTK is built without WebRTC, so no release can finish `Video.connect` in it
/// (53405, "Media connection failed": the SDK gives up when it cannot make the offer, before it
/// sends its connect). What the relay carries still works in WebKit's network stack, and is
/// checked: the hello arrives with the token intact at the token's region,
/// and the SDK's clean close reaches the gateway and the records.
async fn webkit_signalling(script: &mut Script, gw: &mut Gateway, relay: &mut Relay, token: &str, what: &str, version: &str) {
    let failed = script.event().await;
    assert_eq!(failed["sdk"], version, "{what}: the page loaded another release");
    // If this fails because WebKitGTK gained RTCPeerConnection, run the full matrix in it.
    assert_eq!(
        (failed["event"].as_str(), failed["code"].as_u64(), failed["webrtc"].as_bool()),
        (Some("failed"), Some(53405), Some(false)),
        "{what}: {failed}"
    );
    let seen = gateway_events(gw, &[("connection", "/signaling"), ("close", "/signaling")]).await;
    assert_eq!(seen[0]["host"], "au1.vss.twilio.com", "{what}");
    assert_eq!(seen[0]["token_sha256"], token_sha256(token), "{what}");
    assert_eq!(seen[0]["body_type"], "ice", "{what}");
    assert_eq!(seen[1]["code"], 1000, "{what}: the SDK gives up with a clean close");
    let sig = records_by_route(relay, "handshake", &["signaling"]).await.remove(0);
    assert_eq!((sig["outcome"].as_str(), sig["region"].as_str(), sig["first_message"].as_str()), (Some("ok"), Some("au1"), Some("ice")), "{what}: {sig}");
    let close = close_of(relay, &sig["conn_id"]).await;
    assert_eq!(
        (close["outcome"].as_str(), close["closed_by"].as_str(), close["close_code"].as_u64()),
        (Some("client_closed"), Some("client"), Some(1000)),
        "{what}: {close}"
    );
    script.send("next").await;
    eprintln!("compat: {what}: signalling through the relay, token intact, region au1; no WebRTC, so {}", failed["code"]);
}

#[tokio::test]
async fn every_sdk_release_connects_through_the_relay_in_chromium() {
    matrix("chromium").await;
}

#[tokio::test]
async fn every_sdk_release_connects_through_the_relay_in_firefox() {
    matrix("firefox").await;
}

#[tokio::test]
async fn every_sdk_release_connects_through_the_relay_in_webkit() {
    matrix("webkit").await;
}

/// Binds `addr` as soon as nobody holds it: what a second pod does when it takes over a port.
async fn take_over(addr: std::net::SocketAddr) -> tokio::net::TcpListener {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match sigrelay::listener::bind(addr) {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline && e.kind() == std::io::ErrorKind::AddrInUse => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e) => panic!("cannot take over {addr}: {e}"),
        }
    }
}

/// A room connected through relay A; A drains (closing with 1012 after `drain_timeout`) while
/// relay B takes over the port as soon as A lets go of it. The SDK reconnects through B with a
/// `sync` for the same session, the room keeps its sid, and both relays' records say so.
async fn rolling_restart(engine: &str) {
    if !engine_ready(engine) {
        return;
    }
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Twilio).await;
    let config = Relay::config(&pki, "drain_timeout = \"1s\"\ndrain_jitter = \"0s\"", "", "", &resolve_all_to(gw.addr));
    let listener = sigrelay::listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut a = Relay::start_config_on(config.clone(), listener).await;
    let token = token("au1_valid_until_2100");
    let mut script = Script::start("sdk.mjs", &spec(engine, &a, &token, &["twilio-video"]));
    let connected = script.event().await;
    assert_eq!(connected["event"], "connected", "{connected}");
    assert_eq!(connected["roomSid"], ROOM_SID);
    let a_sig = records_by_route(&mut a, "handshake", &["signaling"]).await.remove(0);
    gateway_events(&mut gw, &[("connection", "/signaling"), ("room", "/signaling"), ("connection", "/v1/VideoEvents")]).await;

    a.begin_stop();
    let drain_started = Instant::now();
    let mut b = Relay::start_config_on(config, take_over(addr).await).await;
    let taken_over_ms = drain_started.elapsed().as_millis();

    script.send("reconnected?").await;
    let reconnected = script.event().await;
    assert_eq!(reconnected["event"], "reconnected", "{reconnected}");
    assert_eq!(reconnected["roomSid"], ROOM_SID, "the room keeps its sid");
    assert_eq!(reconnected["state"], "connected");
    let reconnect_ms = reconnected["reconnecting_ms"].as_u64().unwrap_or_else(|| panic!("no `reconnecting` before `reconnected`: {reconnected}"));
    assert!(reconnect_ms < 30_000, "{reconnected}");

    let a_close = close_of(&mut a, &a_sig["conn_id"]).await;
    assert_eq!(
        (a_close["outcome"].as_str(), a_close["closed_by"].as_str(), a_close["close_code"].as_u64()),
        (Some("shutdown"), Some("relay"), Some(1012)),
        "{a_close}"
    );
    a.stop().await;
    let b_sig = records_by_route(&mut b, "handshake", &["signaling"]).await.remove(0);
    assert_eq!((b_sig["outcome"].as_str(), b_sig["first_message"].as_str()), (Some("ok"), Some("sync")), "{b_sig}");
    let seen = gateway_events(&mut gw, &[("connection", "/signaling"), ("room", "/signaling")]).await;
    assert_eq!((seen[0]["body_type"].as_str(), seen[0]["session"].as_str()), (Some("sync"), Some(SESSION)), "{}", seen[0]);
    assert_eq!(seen[0]["token_sha256"], token_sha256(&token), "the sync carries the token");
    assert_eq!(seen[1]["state"], "synced");

    script.send("next").await;
    assert_eq!(script.event().await["event"], "disconnected");
    let b_close = close_of(&mut b, &b_sig["conn_id"]).await;
    assert_eq!((b_close["outcome"].as_str(), b_close["close_code"].as_u64()), (Some("client_closed"), Some(1000)), "{b_close}");
    assert_eq!(script.event().await["event"], "done");
    script.finish().await;
    eprintln!(
        "compat: rolling restart in {engine}: port taken over {taken_over_ms} ms after the drain began; \
         {reconnect_ms} ms from the 1012 to `reconnected`"
    );
}

#[tokio::test]
async fn a_connected_room_survives_a_rolling_restart_in_chromium() {
    rolling_restart("chromium").await;
}

#[tokio::test]
async fn a_connected_room_survives_a_rolling_restart_in_firefox() {
    rolling_restart("firefox").await;
}
