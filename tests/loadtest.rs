//! `sigrelay loadtest` against a real relay and mock gateway: each mode runs clean and counts
//! what it did; non-loopback targets are refused without the flag.

mod support;

use std::time::Duration;

use sigrelay::tools::loadtest::{self, Mode, Plan};
use sigrelay::tools::mock_gateway;
use support::*;

fn plan(pki: &Pki, relay: &Relay, mode: Mode) -> Plan {
    Plan {
        url: format!("wss://localhost:{}/au1/signaling", relay.addr.port()),
        mode,
        connections: 20,
        concurrency: 8,
        rate: 400,
        size: 64,
        duration: Duration::from_millis(500),
        source_ips: vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()],
        tls: pki.client_tls(),
        progress: false,
        turn: false,
    }
}

/// The same modes over TURN: STUN-framed messages on TLS, through the relay's TURN relay to the
/// mock gateway, which echoes them.
#[tokio::test]
async fn every_mode_runs_clean_over_turn_through_the_relay() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, mock_gateway::Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;
    let turn = |mode| Plan { turn: true, ..plan(&pki, &relay, mode) };
    let mut held = 0;
    let idle = loadtest::run(turn(Mode::Idle), |n| held = n).await.unwrap();
    assert!(idle.clean(), "{}", idle.table());
    assert_eq!((held, idle.completed), (20, 20));
    let churn = loadtest::run(turn(Mode::Churn), |_| {}).await.unwrap();
    assert!(churn.clean() && churn.completed > 0, "{}", churn.table());
    let echo = loadtest::run(Plan { size: 1000, ..turn(Mode::Echo) }, |_| {}).await.unwrap();
    assert!(echo.clean(), "{}", echo.table());
    assert_eq!((echo.sent, echo.received), (200, 200));
    let r = relay.record("handshake").await;
    assert_eq!(r["route"], "turn", "the relay's TURN relay carried them: {r}");
}

#[tokio::test]
async fn every_mode_runs_clean_through_the_relay() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, mock_gateway::Mode::Echo).await;
    let relay = Relay::to_gateway(&pki, &gw, "").await;

    let mut held = 0;
    let idle = loadtest::run(plan(&pki, &relay, Mode::Idle), |n| held = n).await.unwrap();
    assert!(idle.clean(), "{}", idle.table());
    assert_eq!((held, idle.completed, idle.latency.count), (20, 20, 20));

    let churn = loadtest::run(plan(&pki, &relay, Mode::Churn), |_| {}).await.unwrap();
    assert!(churn.clean(), "{}", churn.table());
    assert!(churn.completed > 0 && churn.per_second > 0.0);

    let echo = loadtest::run(plan(&pki, &relay, Mode::Echo), |_| {}).await.unwrap();
    assert!(echo.clean(), "{}", echo.table());
    assert_eq!(echo.sent, 200, "400/s for 0.5 s");
    assert_eq!((echo.received, echo.lost, echo.reordered, echo.duplicated), (200, 0, 0, 0));
    let json = serde_json::to_value(&echo).unwrap();
    assert_eq!(json["latency"]["count"], 200);
}

#[tokio::test]
async fn a_refused_relay_shows_up_as_errors_by_cause() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, mock_gateway::Mode::Echo).await;
    let relay = Relay::to_gateway(&pki, &gw, "").await;
    let mut p = plan(&pki, &relay, Mode::Idle);
    p.url = format!("wss://localhost:{}/nowhere", relay.addr.port());
    let report = loadtest::run(p, |_| {}).await.unwrap();
    assert!(!report.clean());
    assert_eq!(report.errors.get("upgrade: HTTP 404"), Some(&20), "{:?}", report.errors);
}

#[test]
fn non_loopback_targets_need_the_flag() {
    let err = loadtest::target("wss://192.0.2.1:443/signaling", false).unwrap_err();
    assert!(err.contains("--allow-non-loopback"), "{err}");
    assert!(loadtest::target("wss://127.0.0.1:8443/signaling", false).is_ok());
    assert!(loadtest::target("ws://127.0.0.1:8443/signaling", false).is_err());
}
