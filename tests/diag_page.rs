//! The `/diag` page: its endpoints over real TLS, and the page itself in Debian's Chromium
//! (tests/browser/diag.mjs) against sigrelay and the mock gateway, with Twilio's hosts mapped to
//! a closed loopback port. The page's screenshot is kept in target/test-artifacts/.

mod support;

use std::path::Path;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sigrelay::tools::mock_gateway::Mode;
use support::*;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

fn body_json(response: &str) -> Value {
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {response}"))
}

#[tokio::test]
async fn page_and_assets_are_served_under_a_strict_policy() {
    let pki = Pki::new();
    let relay = Relay::start(&pki, "", "", "").await;
    let page = relay.raw(&pki, &get("/diag")).await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert_eq!(header(&page, "content-type"), Some("text/html; charset=utf-8"));
    let csp = header(&page, "content-security-policy").expect("CSP header");
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe"), "no unsafe-inline or unsafe-eval: {csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(header(&page, "x-content-type-options"), Some("nosniff"));
    // No inline script or style, and nothing from another host.
    assert!(!page.contains("<script>") && !page.contains("style="), "{page}");
    assert!(!page.contains("http://") && !page.contains("https://"), "no external references: {page}");
    for (path, kind) in [("/diag/diag.js", "text/javascript"), ("/diag/diag.css", "text/css")] {
        let r = relay.raw(&pki, &get(path)).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{path}: {r}");
        assert!(header(&r, "content-type").unwrap().starts_with(kind), "{path}: {r}");
    }
    assert!(relay.raw(&pki, &get("/diag/nothing")).await.starts_with("HTTP/1.1 404"));
}

#[tokio::test]
async fn info_and_route_answer_from_the_running_config() {
    let pki = Pki::new();
    let relay = Relay::start(&pki, "", "", "").await;
    let info = body_json(&relay.raw(&pki, &get("/diag/api/info")).await);
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    assert!((info["now_ms"].as_i64().unwrap() - now_ms).abs() < 5_000, "{info}");
    assert_eq!(info["routes"][0]["path"], "/signaling");
    assert!(info["regions"].as_array().unwrap().contains(&json!("au1")));

    let route = body_json(&relay.raw(&pki, &get("/diag/api/route?path=%2Fus1%2Fsignaling&region=au1")).await);
    assert_eq!(route["gateway"], "wss://us1.vss.twilio.com/signaling", "{route}");
    assert_eq!(route["source"], "path");
    assert_eq!(route["mismatch"], true);
    let route = body_json(&relay.raw(&pki, &get("/diag/api/route?path=/signaling&region=au1")).await);
    assert_eq!(route["gateway"], "wss://au1.vss.twilio.com/signaling", "{route}");
    assert_eq!(route["mismatch"], false);
    let missing = relay.raw(&pki, &get("/diag/api/route")).await;
    assert!(missing.starts_with("HTTP/1.1 400"), "{missing}");
}

#[tokio::test]
async fn probes_cover_every_gateway_and_run_at_most_once_per_interval() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Echo).await;
    let relay = Relay::to_gateway(&pki, &gw, "").await;
    let post = "POST /diag/api/probes HTTP/1.1\r\nHost: localhost\r\nX-Sigrelay-Diag: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    // Pages that leave mid-run cannot cancel and restart the probes: these requests are dropped
    // as soon as they are sent, and the gateways still see exactly one whole run.
    for _ in 0..5 {
        let mut tls = relay.tls(&pki).await;
        tokio::io::AsyncWriteExt::write_all(&mut tls, post.as_bytes()).await.unwrap();
        tokio::io::AsyncWriteExt::flush(&mut tls).await.unwrap();
        // Long enough for the request to arrive, far shorter than a run.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        drop(tls);
    }
    // Every route in every region, and the TURN upstream (which the mock gateway answers too).
    let n = relay.app.current().config.routes.len() * relay.app.current().config.regions.len();
    let (mut closes, mut stuns) = (0, 0);
    while closes + stuns < n + 1 {
        let e = tokio::time::timeout(WAIT, gw.events.recv()).await.expect("a gateway event").unwrap();
        match e["event"].as_str() {
            Some("close") => {
                assert_eq!(e["reason"], "sigrelay diagnose", "{e}");
                closes += 1;
            }
            Some("stun") => {
                assert_eq!((e["host"].as_str(), e["answered"].as_u64()), (Some("global.turn.twilio.com"), Some(1)), "{e}");
                stuns += 1;
            }
            _ => {}
        }
    }
    assert_eq!((closes, stuns), (n, 1));
    gw.assert_quiet().await;
    let first = body_json(&relay.raw(&pki, post).await);
    let probes = first["probes"].as_array().unwrap();
    assert_eq!(probes.len(), n + 1, "{first}");
    assert!(probes.iter().all(|p| p["ok"] == true && p["tls_ms"].is_f64()), "{first}");
    assert_eq!(probes[n]["url"], "turns:global.turn.twilio.com:443");
    gw.assert_quiet().await;
    // A second page within the interval gets the same run; the gateways see nothing new.
    let second = body_json(&relay.raw(&pki, post).await);
    assert!(second["ran_s_ago"].as_f64().unwrap() > 0.0, "{second}");
    assert_eq!(second["probes"], first["probes"]);
    gw.assert_quiet().await;

    // Without the header (a cross-site form could not add it) nothing runs.
    let bare = "POST /diag/api/probes HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    assert!(relay.raw(&pki, bare).await.starts_with("HTTP/1.1 403"));
}

/// A run that takes longer than the interval is joined, not overlapped: every asker while it
/// goes gets its results, and the gateways see one run's connections.
#[tokio::test]
async fn a_probe_run_still_going_is_joined_however_long_ago_it_started() {
    let pki = Pki::new();
    // A gateway that accepts and never answers: each probe waits out connect_timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(tcp);
        }
    });
    let relay = Relay::start(&pki, "", "connect_timeout = \"1s\"", &resolve_all_to(addr)).await;
    let app = relay.app.clone();
    let config = app.current().config.clone();
    // An interval of zero: without the join, the second asker would start a run of its own.
    let first = app.probes.probes(&config, &app.connector, Duration::ZERO);
    let second = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        app.probes.probes(&config, &app.connector, Duration::ZERO).await
    };
    let ((_, a), (_, b)) = tokio::join!(first, second);
    assert!(std::sync::Arc::ptr_eq(&a, &b), "the second asker joined the first run");
    assert!(a.iter().all(|p| !p.ok), "every probe timed out");
    let one_run = config.routes.len() * config.regions.len() + 1;
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), one_run, "one run's connections");
}

#[tokio::test]
async fn probes_report_an_unreachable_gateway() {
    let pki = Pki::new();
    let closed = closed_port().await;
    let relay = Relay::start(&pki, "", "", &resolve_all_to(closed)).await;
    let post = "POST /diag/api/probes HTTP/1.1\r\nHost: localhost\r\nX-Sigrelay-Diag: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let run = body_json(&relay.raw(&pki, post).await);
    let probes = run["probes"].as_array().unwrap();
    assert!(!probes.is_empty());
    for p in probes {
        assert_eq!(p["ok"], false, "{p}");
        assert_eq!(p["outcome"], "upstream_connect_error", "{p}");
        // The page is for anyone: the address the name resolved to stays inside.
        let error = p["error"].as_str().unwrap();
        assert!(error.starts_with("connect: ") && !error.contains("127.0.0.1") && !error.contains(&closed.port().to_string()), "{p}");
    }
}

#[tokio::test]
async fn probes_do_not_reveal_the_egress_proxy_or_the_resolve_overrides() {
    let pki = Pki::new();
    let closed = closed_port().await;
    let proxy = closed_port().await;
    let relay = Relay::start(&pki, "", &format!("proxy = \"http://127.0.0.1:{}\"", proxy.port()), &resolve_all_to(closed)).await;
    let post = "POST /diag/api/probes HTTP/1.1\r\nHost: localhost\r\nX-Sigrelay-Diag: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let body = relay.raw(&pki, post).await;
    let run = body_json(&body);
    assert!(!run["probes"].as_array().unwrap().is_empty());
    for needle in ["127.0.0.1", &proxy.port().to_string(), &closed.port().to_string()] {
        assert!(!body.contains(needle), "{needle} in {body}");
    }
    // The admin side (and diagnose) keep the whole error.
    let probes = sigrelay::probe::probe_all(&relay.app.current().config, &relay.app.connector, Some("signaling"), Some("au1")).await;
    assert!(probes[0].error.as_deref().unwrap().contains(&proxy.port().to_string()), "{:?}", probes[0]);
}

#[tokio::test]
async fn echo_endpoint_tells_its_conn_id_and_writes_records() {
    let pki = Pki::new();
    let mut relay = Relay::start(&pki, "", "", "").await;
    let mut ws = relay.ws(&pki, "/diag/echo").await;
    let hello: Value = match next_data(&mut ws).await {
        Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(hello["type"], "hello");
    let conn_id = hello["conn_id"].as_str().unwrap().to_string();
    for i in 0..3 {
        ws.send(Message::text(format!("ping {i}"))).await.unwrap();
        assert_eq!(next_data(&mut ws).await, Message::text(format!("ping {i}")));
    }
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::binary(vec![1u8, 2, 3]));
    ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "done".into() })).await.unwrap();
    while ws.next().await.is_some() {}

    let hs = relay.record("handshake").await;
    assert_eq!(hs["conn_id"], conn_id.as_str());
    assert_eq!(hs["route"], "diag");
    assert_eq!(hs["outcome"], "ok");
    let close = relay.record("close").await;
    assert_eq!(close["conn_id"], conn_id.as_str());
    assert_eq!(close["closed_by"], "client");
    assert_eq!(close["close_code"], 1000);
    assert_eq!(close["msgs_up"], 4);
    assert_eq!(close["msgs_down"], 4);
}

#[tokio::test]
async fn echo_endpoint_is_reachable_whatever_the_origin_allow_list() {
    let pki = Pki::new();
    let relay = Relay::start(&pki, "allowed_origins = [\"https://app.example.com\"]", "", "").await;
    let own = format!("https://localhost:{}", relay.addr.port());
    let mut ws = relay.ws_with(&pki, "/diag/echo", &[("origin", &own)]).await.expect("the page's own echo");
    let hello = next_data(&mut ws).await;
    assert!(hello.to_text().unwrap().contains("conn_id"));
    // The relayed routes still hold to the list.
    assert!(relay.ws_with(&pki, "/au1/signaling", &[("origin", &own)]).await.is_err());
}

#[tokio::test]
async fn echo_endpoint_is_bounded() {
    let pki = Pki::new();
    let mut relay = Relay::start(&pki, "", "", "").await;
    let mut ws = relay.ws(&pki, "/diag/echo").await;
    let _hello = next_data(&mut ws).await;
    // Bigger than the echo's 4 KiB bound: refused with 1009, not echoed.
    ws.send(Message::text("x".repeat(10_000))).await.unwrap();
    let close = read_close(&mut ws).await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1009);
    let rec = relay.record("close").await;
    assert_eq!(rec["outcome"], "message_too_big");
    assert_eq!(rec["closed_by"], "relay");

    let mut ws = relay.ws(&pki, "/diag/echo").await;
    let _hello = next_data(&mut ws).await;
    let mut echoed = 0;
    let code = loop {
        ws.send(Message::text("m")).await.unwrap();
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(_))) => echoed += 1,
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(echoed, 64);
    assert_eq!(code, Some(1008));
    let rec = relay.record("close").await;
    assert_eq!(rec["outcome"], "diag_limit");

    // Pings are answered, and bounded too: each costs the relay a pong.
    let mut ws = relay.ws(&pki, "/diag/echo").await;
    let _hello = next_data(&mut ws).await;
    let mut pongs = 0;
    let close = loop {
        ws.send(Message::Ping(vec![1].into())).await.unwrap();
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Pong(_))) => pongs += 1,
            Some(Ok(Message::Close(f))) => break f.expect("a close frame with a code"),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(pongs, 64);
    assert_eq!((u16::from(close.code), close.reason.as_str()), (1008, "diag echo: control frame limit"));
    let rec = relay.record("close").await;
    assert_eq!(rec["outcome"], "diag_limit");
}

#[tokio::test]
async fn diag_can_be_turned_off() {
    let pki = Pki::new();
    let mut relay = Relay::start(&pki, "", "", "[diag]\nenabled = false\n").await;
    let r = relay.raw(&pki, &get("/diag")).await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    assert_eq!(relay.record("handshake").await["outcome"], "not_found");
    assert!(relay.ws_with(&pki, "/diag/echo", &[]).await.is_err());
}

#[test]
fn a_route_may_not_take_the_diag_paths_while_diag_is_on() {
    let route = "[[routes]]\npath = \"/diag/x\"\nupstream = \"wss://{region}.vss.twilio.com/signaling\"\n";
    let err = sigrelay::Config::parse(route, "t.toml").unwrap_err().to_string();
    assert!(err.contains("routes[0].path") && err.contains("diagnostics page"), "{err}");
    assert!(sigrelay::Config::parse(&format!("[diag]\nenabled = false\n{route}"), "t.toml").is_ok());
}

/// Runs tests/browser/diag.mjs and returns its JSON lines.
async fn run_page(spec: Value) -> Vec<Value> {
    browser_script("diag.mjs", &spec, Duration::from_secs(240)).await
}

/// A token broken into 40-character lines.
fn wrapped(token: &str) -> String {
    token.as_bytes().chunks(40).map(|c| std::str::from_utf8(c).unwrap()).collect::<Vec<_>>().join("\n")
}

fn statuses(run: &Value, id: &str) -> Vec<String> {
    run["checks"].as_array().unwrap().iter().filter(|c| c["id"] == id).map(|c| c["status"].as_str().unwrap().to_string()).collect()
}

fn findings(run: &Value) -> String {
    run["findings"].as_array().unwrap().iter().map(|f| f[1].as_str().unwrap()).collect::<Vec<_>>().join("\n")
}

#[tokio::test]
async fn the_page_in_chromium_finds_each_cause_and_reports_conn_ids() {
    if !browser_ready() {
        return;
    }
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Twilio).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;
    let closed = closed_port().await;
    let artifacts = Path::new(REPO).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("diag-page.png");
    let _ = std::fs::remove_file(&screenshot);
    let base = format!("wss://localhost:{}", relay.addr.port());
    let lines = run_page(json!({
        "url": format!("https://localhost:{}/diag", relay.addr.port()),
        "closed": closed.port(),
        "screenshot": screenshot,
        "runs": [
            // Wrapped over lines, as a token pasted from an email is.
            {"token": wrapped(&token("au1_valid_until_2100")), "wsServer": format!("{base}/signaling")},
            {"token": token("au1_expired_2020"), "wsServer": ""},
            // Last, so the screenshot shows a failure and its fix.
            {"token": token("de1_valid_until_2100"), "wsServer": format!("{base}/au1/signaling")},
        ],
    }))
    .await;
    let runs: Vec<&Value> = lines.iter().filter(|l| l["event"] == "run").collect();
    assert_eq!(runs.len(), 3, "{lines:?}");
    let done = lines.iter().find(|l| l["event"] == "done").expect("done line");
    assert_eq!(done["cspViolations"], json!([]), "the page runs under its own CSP without violations");

    // Every route in every region, and the TURN upstream.
    let n_probes = relay.app.current().config.routes.len() * relay.app.current().config.regions.len() + 1;
    for run in &runs {
        // Relay and gateway checks pass; the direct path to Twilio is blocked.
        assert_eq!(statuses(run, "browser"), ["pass"], "{run}");
        assert_eq!(statuses(run, "relay-http"), ["pass"], "{run}");
        assert_eq!(statuses(run, "relay-ws"), ["pass"], "{run}");
        assert_eq!(statuses(run, "gateway"), vec!["pass"; n_probes], "{run}");
        assert_eq!(statuses(run, "direct"), ["fail", "fail"], "{run}");
        assert!(findings(run).contains("blocked from this network directly"), "{run}");
        // The copied report is the report, and names the page's own connection.
        assert_eq!(run["clipboard"], run["report"]);
        let ids = run["connIds"].as_array().unwrap();
        assert_eq!(ids.len(), 1, "{run}");
        assert!(run["report"].as_str().unwrap().contains(ids[0].as_str().unwrap()), "{run}");
        assert!(!run["report"].as_str().unwrap().contains("eyJ"), "the report carries no token");
        // Every row is rendered with its status.
        assert_eq!(run["rows"].as_array().unwrap().len(), run["checks"].as_array().unwrap().len());
    }
    let (fine, expired, mismatch) = (runs[0], runs[1], runs[2]);
    assert_eq!(statuses(expired, "token-exp"), ["fail"], "{expired}");
    assert_eq!(statuses(expired, "token-region"), ["pass"], "{expired}");
    assert!(findings(expired).contains("Expired token"), "{expired}");
    assert!(!findings(expired).contains("Region mismatch"), "{expired}");

    assert_eq!(statuses(mismatch, "token-exp"), ["pass"], "{mismatch}");
    assert_eq!(statuses(mismatch, "token-region"), ["fail"], "{mismatch}");
    assert!(findings(mismatch).contains("Region mismatch"), "{mismatch}");
    assert!(mismatch["report"].as_str().unwrap().contains("minted for de1 but the connection goes to au1"), "{mismatch}");

    assert_eq!(statuses(fine, "token-exp"), ["pass"], "{fine}");
    assert_eq!(statuses(fine, "token-region"), ["pass"], "{fine}");
    assert!(findings(fine).contains("No problem found"), "{fine}");
    assert!(fine["report"].as_str().unwrap().contains("wss://au1.vss.twilio.com/signaling"), "{fine}");

    // The conn ids in the reports are the ones in sigrelay's records.
    let mut recorded = Vec::new();
    while recorded.len() < 3 {
        let r = relay.record("handshake").await;
        if r["route"] == "diag" {
            assert_eq!(r["outcome"], "ok");
            recorded.push(r["conn_id"].as_str().unwrap().to_string());
        }
    }
    let reported: Vec<String> = runs.iter().map(|r| r["connIds"][0].as_str().unwrap().to_string()).collect();
    assert_eq!(recorded, reported);
    let png = std::fs::metadata(&screenshot).expect("screenshot written");
    assert!(png.len() > 10_000, "a real screenshot");
    eprintln!("screenshot: {}", screenshot.display());
}

#[tokio::test]
async fn the_page_in_chromium_names_an_old_browser_a_blocked_network_and_a_gateway_down() {
    if !browser_ready() {
        return;
    }
    let pki = Pki::new();
    let closed = closed_port().await;
    // Every gateway on a closed port: down, as far as the relay can tell.
    let relay = Relay::start(&pki, "", "", &resolve_all_to(closed)).await;
    let lines = run_page(json!({
        "url": format!("https://localhost:{}/diag", relay.addr.port()),
        "closed": closed.port(),
        "simulate": ["no-webrtc", "ws-blocked"],
        "runs": [{"token": token("au1_valid_until_2100"), "wsServer": ""}],
    }))
    .await;
    let run = lines.iter().find(|l| l["event"] == "run").expect("a run");
    assert_eq!(statuses(run, "browser"), ["fail"], "{run}");
    assert_eq!(statuses(run, "relay-http"), ["pass"], "{run}");
    assert_eq!(statuses(run, "relay-ws"), ["fail"], "{run}");
    let gateways = statuses(run, "gateway");
    assert!(!gateways.is_empty() && gateways.iter().all(|s| s == "fail"), "{run}");
    let found = findings(run);
    for cause in ["Unsupported browser", "Blocked network", "Gateway down"] {
        assert!(found.contains(cause), "{cause} missing from {found}");
    }
    assert!(!found.contains("No problem found"), "{found}");
    assert!(run["report"].as_str().unwrap().contains("upstream_connect_error"), "{run}");
}
