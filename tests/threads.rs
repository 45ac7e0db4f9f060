//! `server.threads`: every thread accepts on the same port, new connections go to the
//! least-loaded thread, each thread serves its connections to the end, drain included, and the
//! threads end with the relay. Alone in its test binary, so the threads it counts are this
//! relay's.

mod support;

use std::time::Duration;

use sigrelay::tools::mock_gateway::Mode;
use support::*;

/// The relay's extra threads (named `sigrelay-<n>`) alive in this process.
fn relay_threads() -> usize {
    let names = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok());
    names.filter(|n| n.trim_end().strip_prefix("sigrelay-").is_some_and(|i| i.parse::<u32>().is_ok())).count()
}

/// Waits (up to 10 s) until `relay_threads()` is `n`; a thread takes its name only once it runs.
async fn expect_threads(n: usize, why: &str) {
    for _ in 0..1000 {
        if relay_threads() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{why}: {} extra threads, expected {n}", relay_threads());
}

#[tokio::test]
async fn every_thread_serves_and_drains_its_connections() {
    const N: usize = 12;
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "threads = 4\ndrain_timeout = \"200ms\"\ndrain_jitter = \"100ms\"").await;
    expect_threads(3, "three threads beside the caller's").await;
    let mut sockets = Vec::new();
    for i in 0..N {
        sockets.push(echoed(&relay, &pki, i).await);
    }
    relay.stop().await;
    for ws in &mut sockets {
        assert_eq!(read_close(ws).await.map(|f| u16::from(f.code)), Some(1012));
    }
    for _ in 0..N {
        assert_eq!(gw.event("close").await["code"], 1012);
    }
    assert_eq!(relay.written_closes().len(), N, "one close record per connection");
    expect_threads(0, "the extra threads end with the relay").await;

    // A serve future dropped without a shutdown (its task aborted) must not leave threads
    // accepting on the socket behind it.
    let text = format!("[server]\ncert = {:?}\nkey = {:?}\nthreads = 3\n[admin]\nlisten = \"off\"\n", pki.relay_cert, pki.relay_key);
    let config = sigrelay::Config::parse(&text, "t.toml").unwrap();
    let app = sigrelay::App::new(config, sigrelay::Records::channel(1 << 16).0).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let serving = tokio::spawn(sigrelay::serve(app, listener, std::future::pending()));
    expect_threads(2, "two threads beside the caller's").await;
    serving.abort();
    let _ = serving.await;
    expect_threads(0, "threads still running after serve was dropped").await;
}

/// `sigrelay_thread_connections`, by thread index.
fn thread_connections(relay: &Relay) -> Vec<i64> {
    let metrics = relay.app.metrics.encode();
    let mut held: Vec<(usize, i64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("sigrelay_thread_connections{thread=\""))
        .map(|l| {
            let (thread, value) = l.split_once("\"} ").unwrap();
            (thread.parse().unwrap(), value.parse().unwrap())
        })
        .collect();
    held.sort();
    held.into_iter().map(|(_, n)| n).collect()
}

/// A WebSocket through the relay that has echoed one message.
async fn echoed(relay: &Relay, pki: &Pki, i: usize) -> Ws {
    let mut ws = relay.ws(pki, "/au1/signaling").await;
    send_text(&mut ws, &format!("hello {i}")).await;
    assert_eq!(next_data(&mut ws).await.to_text().unwrap(), format!("hello {i}"));
    ws
}

/// `n` connections counted over `threads` threads, no two more than two apart.
fn assert_even(relay: &Relay, threads: usize, n: usize) {
    let held = thread_connections(relay);
    assert_eq!(held.len(), threads, "{held:?}");
    assert_eq!(held.iter().sum::<i64>(), n as i64, "{held:?}");
    assert!(held.iter().max().unwrap() - held.iter().min().unwrap() <= 2, "uneven: {held:?}");
}

#[tokio::test]
async fn connections_are_spread_evenly_over_the_threads() {
    // The kernel's SO_REUSEPORT hash alone leaves 60 connections over 4 threads within two of
    // even only by luck (a few runs in a hundred).
    const N: usize = 60;
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let relay = Relay::to_gateway(&pki, &gw, "threads = 4").await;
    let mut sockets = Vec::new();
    for i in 0..N {
        sockets.push(echoed(&relay, &pki, i).await);
    }
    assert_even(&relay, 4, N);
    drop(sockets);
    for _ in 0..500 {
        if thread_connections(&relay).iter().sum::<i64>() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("connections still counted after they closed: {:?}", thread_connections(&relay));
}

#[tokio::test]
async fn a_burst_of_connections_is_spread_evenly_too() {
    // All at once: each thread must see the placements the others made a moment ago.
    const N: usize = 120;
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let relay = Relay::to_gateway(&pki, &gw, "threads = 4").await;
    let sockets = futures_util::future::join_all((0..N).map(|i| echoed(&relay, &pki, i))).await;
    assert_even(&relay, 4, N);
    drop(sockets);
}

#[test]
fn threads_must_be_a_sensible_count() {
    for bad in ["0", "-1", "5000"] {
        let err = sigrelay::config::Config::parse(&format!("[server]\nthreads = {bad}\n"), "t.toml").unwrap_err().to_string();
        assert!(err.contains("server.threads") && err.contains("outside 1..=1024"), "{bad}: {err}");
    }
    let ok = sigrelay::config::Config::parse("[server]\nthreads = 3\n", "t.toml").unwrap();
    assert_eq!(ok.server.threads, 3);
}

#[tokio::test]
async fn a_port_in_use_is_refused_though_the_threads_share_theirs() {
    let first = sigrelay::listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let err = sigrelay::listener::bind(first.local_addr().unwrap()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
}
