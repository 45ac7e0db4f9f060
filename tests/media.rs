//! A call's media through the relay: Debian's coturn stands in for Twilio's TURN servers (TLS,
//! a certificate for global.turn.twilio.com from the test CA, long-term credentials, relaying
//! to loopback peers); the real twilio-video SDK in Debian's Chromium connects through sigrelay
//! to the mock gateway, whose `iced` lists coturn's `turns:` URL; then two relay-only peer
//! connections with the ICE servers the SDK was handed move a fake camera and a data channel,
//! every byte checked. Every host but localhost resolves to nothing in the browser, so the media
//! can only have come through the relay. tests/run.sh installs coturn with Chromium.

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use sigrelay::tools::mock_gateway::Mode;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

const TURN_USER: &str = "sigrelay";
const TURN_PASSWORD: &str = "media-test-secret";

/// Whether coturn's turnserver is installed; in CI its absence is a failure.
fn coturn_ready() -> bool {
    let ready = std::process::Command::new("turnserver").arg("--help").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    tool_ready(ready, "the media test needs coturn (Debian's coturn package): run tests/run.sh")
}

/// coturn on loopback with a TLS listener; its log lines are collected.
struct Coturn {
    child: Child,
    tls: SocketAddr,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Coturn {
    async fn start(pki: &Pki) -> Coturn {
        let leaf = pki.ca.leaf(&["global.turn.twilio.com".to_string()]).unwrap();
        let (cert, key) = (pki.dir.path().join("turn.pem"), pki.dir.path().join("turn-key.pem"));
        std::fs::write(&cert, &leaf.cert_pem).unwrap();
        std::fs::write(&key, &leaf.key_pem).unwrap();
        let tls = closed_port().await;
        let plain = closed_port().await;
        let mut child = Command::new("turnserver")
            .args(["-n", "--log-file=stdout", "--simple-log", "--verbose", "--no-cli", "--no-dtls", "--fingerprint"])
            .args(["--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", "--allow-loopback-peers", "--no-multicast-peers"])
            .arg(format!("--listening-port={}", plain.port()))
            .arg(format!("--tls-listening-port={}", tls.port()))
            .arg(format!("--cert={}", cert.display()))
            .arg(format!("--pkey={}", key.display()))
            .args(["--lt-cred-mech", "--realm=sigrelay.test"])
            .arg(format!("--user={TURN_USER}:{TURN_PASSWORD}"))
            .arg(format!("--pidfile={}", pki.dir.path().join("turnserver.pid").display()))
            .args(["--min-port=40000", "--max-port=40999"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("turnserver runs");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let kept = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                kept.lock().unwrap().push(l);
            }
        });
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(tls).await.is_ok() {
                return Coturn { child, tls, log };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("coturn did not listen on {tls}: {:?}", log.lock().unwrap());
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A relay whose `[turn]` upstream is coturn and whose public URL is its own port.
async fn relay_to(pki: &Pki, gw: &Gateway, coturn: &Coturn, turn_enabled: bool) -> Relay {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let extra = format!(
        "{}\"global.turn.twilio.com\" = \"{}\"\n[turn]\nenabled = {turn_enabled}\npublic_url = \"turns:localhost:{port}?transport=tcp\"\n",
        resolve_gateways_to(gw.addr),
        coturn.tls
    );
    Relay::start_config_on(Relay::config(pki, "", "", "", &extra), listener).await
}

/// What Twilio's gateway lists in its `iced`: TURN over TLS and UDP, and STUN.
fn twilio_ice() -> Vec<Value> {
    vec![
        json!({"urls": "turns:global.turn.twilio.com:443?transport=tcp", "username": TURN_USER, "credential": TURN_PASSWORD}),
        json!({"urls": "turn:global.turn.twilio.com:3478?transport=udp", "username": TURN_USER, "credential": TURN_PASSWORD}),
        json!({"urls": "stun:global.stun.twilio.com:3478"}),
    ]
}

/// Runs tests/browser/media.mjs with `spec`; its one line of results.
async fn run_page(spec: Value) -> Value {
    browser_script("media.mjs", &spec, Duration::from_secs(120)).await.pop().expect("a result line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_behind_a_firewall_gets_its_media_through_the_relay() {
    if !browser_ready() || !coturn_ready() {
        return;
    }
    let pki = Pki::new();
    let coturn = Coturn::start(&pki).await;
    let gw = Gateway::start_with_ice(&pki, Mode::Twilio, twilio_ice()).await;
    let mut relay = relay_to(&pki, &gw, &coturn, true).await;
    let public_url = format!("turns:localhost:{}?transport=tcp", relay.addr.port());
    let spec = json!({
        "relay": format!("wss://localhost:{}", relay.addr.port()),
        "token": token("au1_valid_until_2100"),
        "signaling": "/signaling",
        "insights": "/v1/VideoEvents",
        "bytes": 1 << 20,
    });
    let run = run_page(spec).await;
    println!("page: {run}");

    // What the SDK was handed: the relay's TURN, credentials kept, the UDP entries kept.
    let servers = run["sdkIceServers"].as_array().unwrap_or_else(|| panic!("{run}"));
    let urls: Vec<String> = servers.iter().flat_map(|s| match &s["urls"] {
        Value::Array(a) => a.iter().map(|u| u.as_str().unwrap().to_string()).collect(),
        u => vec![u.as_str().unwrap().to_string()],
    }).collect();
    assert!(urls.contains(&public_url), "{run}");
    assert!(urls.contains(&"turn:global.turn.twilio.com:3478?transport=udp".to_string()), "{run}");
    assert!(urls.contains(&"stun:global.stun.twilio.com:3478".to_string()), "{run}");
    assert!(!urls.contains(&"turns:global.turn.twilio.com:443?transport=tcp".to_string()), "{run}");
    let ours = servers.iter().find(|s| s["urls"] == public_url.as_str()).unwrap();
    assert_eq!((ours["username"].as_str(), ours["credential"].as_str()), (Some(TURN_USER), Some(TURN_PASSWORD)));

    // The media: relay candidates over TLS on both ends, every byte, and video frames.
    assert_eq!(run["connected"], true, "{run}");
    assert_eq!(run["localTypes"], json!(["relay", "relay"]), "{run}");
    assert_eq!(run["relayProtocols"], json!(["tls", "tls"]), "{run}");
    assert_eq!(run["received"], json!({"a": 1 << 20, "b": 1 << 20}), "{run}");
    assert_eq!(run["intact"], true, "{run}");
    assert!(run["videoBytes"].as_u64().unwrap() > 10_000, "{run}");

    // The records tell it: the signalling hello rewritten, TURN connections with the bytes.
    let mut turn_open = 0;
    let mut turn_bytes_down = 0;
    let mut ice_rewritten = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while (turn_open == 0 || turn_bytes_down < (1 << 20)) && tokio::time::Instant::now() < deadline {
        let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(5), relay.records.recv()).await else { break };
        let r: Value = serde_json::from_str(&line).unwrap();
        match (r["event"].as_str(), r["route"].as_str()) {
            (Some("handshake"), Some("signaling")) if r["first_message"] == "ice" => {
                ice_rewritten = r["ice_rewritten"] == true && r["ice_servers_rewritten"] == 1;
            }
            (Some("handshake"), Some("turn")) => {
                assert_eq!(r["outcome"], "ok", "{r}");
                turn_open += 1;
            }
            (Some("close"), Some("turn")) => {
                // The browser ends its TURN sockets without a TLS close_notify (or with a reset,
                // when data was still unread): the first is an orderly end, not a failure.
                assert!(!r["error"].as_str().is_some_and(|e| e.contains("close_notify")), "{r}");
                turn_bytes_down += r["bytes_down"].as_u64().unwrap();
            }
            _ => {}
        }
    }
    assert!(ice_rewritten, "the signalling record says the ICE servers were rewritten");
    assert!(turn_open >= 2, "both peers' TURN clients came through the relay: {turn_open}");
    assert!(turn_bytes_down >= 1 << 20, "the data came back down through the relay: {turn_bytes_down}");
    // coturn's TLS listener is known to sigrelay alone: its allocations came through the relay.
    let log = coturn.log();
    let allocations = log.iter().filter(|l| l.contains("ALLOCATE") && l.contains("success")).count();
    println!("coturn: {allocations} allocations; relay: {turn_open} TURN connections, {turn_bytes_down} bytes down");
    assert!(allocations >= 2, "coturn allocations: {allocations}\n{}", log.join("\n"));
    let tls_sessions = log.iter().filter(|l| l.contains("TLS") || l.contains("tls")).count();
    assert!(tls_sessions > 0, "{}", log.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_diag_page_finds_which_media_paths_work() {
    if !browser_ready() || !coturn_ready() {
        return;
    }
    let pki = Pki::new();
    let coturn = Coturn::start(&pki).await;
    let gw = Gateway::start_with_ice(&pki, Mode::Twilio, twilio_ice()).await;
    let relay = relay_to(&pki, &gw, &coturn, true).await;
    let closed = closed_port().await;
    let lines = browser_script(
        "diag.mjs",
        &json!({
            "url": format!("https://localhost:{}/diag", relay.addr.port()),
            "closed": closed.port(),
            "runs": [{"token": token("au1_valid_until_2100"), "media": true}],
        }),
        Duration::from_secs(240),
    )
    .await;
    let run = lines.iter().find(|l| l["event"] == "run").expect("a run");
    let status = |id: &str| run["checks"].as_array().unwrap().iter().find(|c| c["id"] == id).map(|c| c["status"].as_str().unwrap().to_string());
    assert_eq!(status("media").as_deref(), Some("pass"), "{run}");
    // Twilio's hosts lead nowhere from this browser; the relay's TURN gets a relay candidate.
    assert_eq!(status("media-udp").as_deref(), Some("fail"), "{run}");
    assert_eq!(status("media-turn-direct").as_deref(), Some("fail"), "{run}");
    assert_eq!(status("media-turn-relay").as_deref(), Some("pass"), "{run}");
    let findings = run["findings"].to_string();
    assert!(findings.contains("only through the relay's TURN"), "{findings}");
    assert!(!run["report"].as_str().unwrap().contains("eyJ"), "the report carries no token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_relays_turn_the_same_call_gets_no_media() {
    if !browser_ready() || !coturn_ready() {
        return;
    }
    let pki = Pki::new();
    let coturn = Coturn::start(&pki).await;
    let gw = Gateway::start(&pki, Mode::Twilio).await;
    let relay = relay_to(&pki, &gw, &coturn, false).await;
    // The same servers the relay would hand out, but its TURN is off.
    let ice = json!([{"urls": format!("turns:localhost:{}?transport=tcp", relay.addr.port()), "username": TURN_USER, "credential": TURN_PASSWORD}]);
    let run = run_page(json!({"iceServers": ice, "bytes": 1024, "connectTimeoutMs": 8000})).await;
    assert_eq!(run["connected"], false, "{run}");
    assert_eq!(run["gathered"], json!({"a": [], "b": []}), "no relay candidate without the relay's TURN: {run}");
}
