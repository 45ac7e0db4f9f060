//! The denial-of-service and trust holes a review found, each closed: the phase before the
//! upgrade bounded and counted, IPv6 counted by prefix, refusals closing their connection and
//! paying the handshake rate, an ambiguous region refused, an unanswered close answered, the
//! admin listener bounded and checking Host, the gateway's 101 checked strictly, and gateway
//! names resolved asynchronously with a cache. Real servers on 127.0.0.1:0.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sigrelay::tools::mock_gateway::Mode;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// Reads until the peer closes, or `limit` passes; whether it closed.
async fn closes_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, limit: Duration) -> bool {
    let mut sink = vec![0u8; 64 * 1024];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_pipelines_and_never_reads_is_cut_at_the_handshake_timeout() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "handshake_timeout = \"1s\"\ndrain_timeout = \"30s\"").await;
    // A tiny receive window, and 200 requests for a 15 KiB script, never read.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&relay.addr.into()).unwrap();
    socket.set_nonblocking(true).unwrap();
    let tcp = TcpStream::from_std(socket.into()).unwrap();
    let connector = tokio_rustls::TlsConnector::from(pki.client_tls());
    let tls = connector.connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    // More responses (2,000 x 15 KiB) than the kernels' socket buffers hold: the relay's writes
    // block. The requests are written from a task of their own, as the relay stops reading them.
    let (reader, mut writer) = tokio::io::split(tls);
    let requests = "GET /diag/diag.js HTTP/1.1\r\nHost: localhost\r\n\r\n".repeat(2000);
    let pipelining = tokio::spawn(async move {
        let _ = writer.write_all(requests.as_bytes()).await;
        writer
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // The relay has given up on it (the connection counted from its accept is gone), though the
    // client never read a byte.
    assert_eq!(relay.app.limiter.total(), 0, "the connection is still held");
    let mut tls = reader;
    assert!(closes_within(&mut tls, Duration::from_secs(5)).await, "reading drains what was sent, then the end");
    pipelining.abort();
    // Nothing is left for the drain to wait for.
    let started = Instant::now();
    relay.stop().await;
    assert!(started.elapsed() < Duration::from_secs(5), "shutdown waited {:?}", started.elapsed());
}

#[tokio::test]
async fn connections_before_their_upgrade_count_against_the_limits() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let limits = "[limits]\nmax_connections = 3\n";
    let mut relay = Relay::start(&pki, "handshake_timeout = \"2s\"", "", &format!("{}{limits}", resolve_all_to(gw.addr))).await;
    let idle: Vec<TcpStream> = futures_util::future::join_all((0..3).map(|_| TcpStream::connect(relay.addr))).await.into_iter().map(Result::unwrap).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    match relay.ws_with(&pki, "/au1/signaling", &[]).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 503),
        other => panic!("expected a 503 while three connections sit before their upgrade: {other:?}"),
    }
    let r = loop {
        let r = relay.record("handshake").await;
        if r["outcome"] != "client_timeout" {
            break r;
        }
    };
    assert_eq!(r["outcome"], "over_max_connections");
    drop(idle);
    // Once they are gone, there is room again.
    let mut ws = None;
    for _ in 0..50 {
        if let Ok(w) = relay.ws_with(&pki, "/au1/signaling", &[]).await {
            ws = Some(w);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    send_text(ws.as_mut().expect("room once the idle connections closed"), "hi").await;

    // The per-address limit counts them the same way: the upgrade is accepted, then closed 1013.
    let relay = Relay::start(&pki, "handshake_timeout = \"2s\"", "", &format!("{}[limits]\nmax_connections_per_ip = 2\n", resolve_all_to(gw.addr))).await;
    let _idle: Vec<TcpStream> = futures_util::future::join_all((0..2).map(|_| TcpStream::connect(relay.addr))).await.into_iter().map(Result::unwrap).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut raw = RawWs::connect(&relay, &pki, "/au1/signaling").await;
    let (code, reason) = raw.read_close().await.expect("a close");
    assert_eq!(code, 1013);
    assert!(reason.starts_with("over_max_connections_per_ip conn="), "{reason}");
}

#[tokio::test]
async fn far_over_a_limit_a_connection_is_closed_at_accept_and_its_records_pay_the_rate() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let extra = format!("{}[limits]\nmax_connections_per_ip = 1\nhandshakes_per_ip_per_s = 0.01\nhandshake_burst = 3\n", resolve_all_to(gw.addr));
    let mut relay = Relay::start(&pki, "handshake_timeout = \"5s\"", "", &extra).await;
    // One within the limit and 32 over it are held (to be told why, were they to upgrade).
    let held: Vec<TcpStream> = futures_util::future::join_all((0..33).map(|_| TcpStream::connect(relay.addr))).await.into_iter().map(Result::unwrap).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(relay.app.limiter.total(), 33);
    // The next is closed before any TLS.
    let mut refused = TcpStream::connect(relay.addr).await.unwrap();
    assert!(closes_within(&mut refused, Duration::from_secs(2)).await);
    let r = relay.record("handshake").await;
    assert_eq!(r["outcome"], "over_max_connections_per_ip");
    assert!(r["error"].as_str().unwrap().contains("closed at accept"), "{r}");
    // Two more early failures use up the burst of three; the rest are counted, not written.
    for _ in 0..4 {
        drop(TcpStream::connect(relay.addr).await.unwrap());
    }
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let metrics = relay.app.metrics.encode();
    let suppressed = metrics.lines().find_map(|l| l.strip_prefix("sigrelay_records_suppressed_total ")).unwrap().trim().parse::<f64>().unwrap();
    assert!(suppressed >= 33.0, "{suppressed}: past the burst of three, early failures are counted, not written");
}

#[tokio::test]
async fn past_half_its_budget_a_connection_is_asked_to_close() {
    let pki = Pki::new();
    let relay = Relay::start(&pki, "handshake_timeout = \"2s\"", "", "").await;
    let mut tls = relay.tls(&pki).await;
    let get = async |tls: &mut tokio_rustls::client::TlsStream<TcpStream>| {
        tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        let mut head = vec![0u8; 1024];
        let n = tls.read(&mut head).await.unwrap();
        String::from_utf8_lossy(&head[..n]).to_lowercase()
    };
    assert!(!get(&mut tls).await.contains("connection: close"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(get(&mut tls).await.contains("connection: close"), "a fresh connection for the next request");
}

#[tokio::test]
async fn ipv6_clients_count_by_their_64_and_mapped_ipv4_as_ipv4() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let extra = format!("{}[limits]\nmax_connections_per_ip = 1\n", resolve_all_to(gw.addr));
    let relay = Relay::start(&pki, "trusted_proxies = [\"127.0.0.1\"]", "", &extra).await;
    let behind = |xff: &'static str| {
        let (relay, pki) = (&relay, &pki);
        async move { relay.ws_with(pki, "/au1/signaling", &[("x-forwarded-for", xff)]).await.unwrap() }
    };
    let expect_1013 = |mut ws: Ws| async move {
        let frame = read_close(&mut ws).await.expect("a close");
        assert_eq!(u16::from(frame.code), 1013);
        assert!(frame.reason.starts_with("over_max_connections_per_ip"), "{}", frame.reason);
    };
    let mut first = behind("2001:db8::1").await;
    send_text(&mut first, "held").await;
    next_data(&mut first).await;
    expect_1013(behind("2001:db8::2").await).await;
    let mut other_64 = behind("2001:db8:0:1::1").await;
    send_text(&mut other_64, "own /64").await;
    assert_eq!(next_data(&mut other_64).await.into_text().unwrap(), "own /64");
    let mut v4 = behind("203.0.113.5").await;
    send_text(&mut v4, "v4").await;
    next_data(&mut v4).await;
    expect_1013(behind("::ffff:203.0.113.5").await).await;
}

#[tokio::test]
async fn refusals_close_their_connection_and_pay_the_handshake_rate() {
    let pki = Pki::new();
    let gw = Gateway::start(&pki, Mode::Echo).await;
    let extra = format!("{}[limits]\nhandshakes_per_ip_per_s = 0.01\nhandshake_burst = 3\n", resolve_all_to(gw.addr));
    let mut relay = Relay::start(&pki, "", "", &extra).await;
    // A plain GET on a route (426) used to keep its connection for more.
    let mut tls = relay.tls(&pki).await;
    tls.write_all(b"GET /signaling HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut head = vec![0u8; 512];
    let n = tls.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_lowercase();
    assert!(head.starts_with("http/1.1 426"), "{head}");
    assert!(head.contains("connection: upgrade, close"), "{head}");
    assert!(closes_within(&mut tls, Duration::from_secs(2)).await, "a refusal keeps no connection");
    // Two more refusals use up the burst of three: the upgrade that follows is over the rate.
    for _ in 0..2 {
        assert!(relay.raw(&pki, "GET /nowhere HTTP/1.1\r\nHost: localhost\r\n\r\n").await.starts_with("HTTP/1.1 404"));
    }
    let mut raw = RawWs::connect(&relay, &pki, "/au1/signaling").await;
    let (code, reason) = raw.read_close().await.expect("a close");
    assert_eq!(code, 1013);
    assert!(reason.starts_with("over_handshake_rate"), "{reason}");
    // And past the rate, a refusal is a 429 that closes its connection.
    let answer = relay.raw(&pki, "GET /nowhere HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    let outcomes: Vec<String> = std::iter::from_fn(|| relay.records.try_recv().ok())
        .map(|l| serde_json::from_str::<serde_json::Value>(&l).unwrap())
        .filter(|r| r["event"] == "handshake")
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(outcomes, ["not_websocket", "not_found", "not_found", "over_handshake_rate", "over_handshake_rate"]);
}

#[tokio::test]
async fn a_full_records_queue_drops_counts_and_never_stalls() {
    let pki = Pki::new();
    let text = format!(
        "[server]\ncert = {:?}\nkey = {:?}\n[upstream]\nca_file = {:?}\nsystem_dns = false\n[admin]\nlisten = \"off\"\n",
        pki.relay_cert, pki.relay_key, pki.ca_file
    );
    // A stdout nobody reads: two records fit, the rest are dropped.
    let (records, _unread) = sigrelay::Records::channel(2);
    let app = sigrelay::App::new(sigrelay::Config::parse(&text, "t.toml").unwrap(), records).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(sigrelay::serve(app.clone(), listener, async {
        let _ = stopped.await;
    }));
    while !app.ready() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let relay = RelayAt(addr);
    let started = Instant::now();
    for _ in 0..10 {
        assert!(relay.get(&pki, "/nowhere").await.starts_with("HTTP/1.1 404"));
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    let metrics = app.metrics.encode();
    let dropped = metrics.lines().find_map(|l| l.strip_prefix("sigrelay_records_dropped_total ")).expect("the dropped counter");
    assert_eq!(dropped.trim().parse::<f64>().unwrap(), 8.0, "{metrics}");
    let _ = stop.send(());
    served.await.unwrap().unwrap();
}

/// Just an address to send raw requests to.
struct RelayAt(SocketAddr);

impl RelayAt {
    async fn get(&self, pki: &Pki, path: &str) -> String {
        let tcp = TcpStream::connect(self.0).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(pki.client_tls());
        let mut tls = connector.connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
        tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[tokio::test]
async fn more_than_one_region_in_the_query_is_refused() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Echo).await;
    let mut relay = Relay::to_gateway(&pki, &gw, "").await;
    let upgrade = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let answer = relay.raw(&pki, &format!("GET /signaling?region=au1&region=evil.example.com HTTP/1.1\r\nHost: localhost\r\n{upgrade}\r\n")).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let r = relay.record("handshake").await;
    assert_eq!(r["outcome"], "bad_region");
    assert_eq!(r["error"], "more than one region in the query");
    gw.assert_quiet().await;
}

#[tokio::test]
async fn a_close_the_gateway_never_answers_is_answered_before_tls_is_shut() {
    let pki = Pki::new();
    let cfg = pki.server_tls(&sigrelay::tools::pki::twilio_names());
    let gw = fault_gateway(Fault::TlsUpgradeThenSilent(cfg)).await;
    let mut relay = Relay::start(&pki, "", "", &resolve_all_to(gw)).await;
    let mut raw = RawWs::connect(&relay, &pki, "/au1/signaling").await;
    raw.send_close(4000, "done").await;
    let started = Instant::now();
    let (code, reason) = raw.read_close().await.expect("a close frame, not a cut connection");
    assert_eq!(code, 4000);
    assert!(reason.starts_with("upstream did not answer the close conn="), "{reason}");
    assert!(started.elapsed() >= Duration::from_secs(4), "after the grace, not at once");
    let close = relay.record("close").await;
    assert_eq!((close["outcome"].as_str(), close["close_code"].as_u64()), (Some("client_closed"), Some(4000)));
}

#[tokio::test]
async fn the_gateways_101_is_checked_to_the_letter() {
    let pki = Pki::new();
    let cfg = pki.server_tls(&sigrelay::tools::pki::twilio_names());
    for (answer, why) in [
        (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept_lower}\r\n\r\n",
            "wrong Sec-WebSocket-Accept",
        ),
        ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept}\r\n\r\n", "without Connection: Upgrade"),
        (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: chat\r\n\r\n",
            "subprotocol that was not offered",
        ),
    ] {
        let gw = fault_gateway(Fault::TlsUpgradeAnswer(cfg.clone(), answer)).await;
        let mut relay = Relay::start(&pki, "", "", &resolve_all_to(gw)).await;
        let mut raw = RawWs::connect(&relay, &pki, "/au1/signaling").await;
        raw.send_text("hello").await;
        assert_eq!(raw.read_close().await.map(|c| c.0), Some(1014));
        let r = relay.record("handshake").await;
        assert_eq!(r["outcome"], "upstream_protocol_error", "{answer}");
        assert!(r["error"].as_str().unwrap().contains(why), "{r}");
    }
    // The exact answer, with Connection listing more than Upgrade, is fine.
    let gw = fault_gateway(Fault::TlsUpgradeAnswer(
        cfg,
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: WebSocket\r\nconnection: keep-alive, upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n",
    ))
    .await;
    let mut relay = Relay::start(&pki, "", "", &resolve_all_to(gw)).await;
    let _raw = RawWs::connect(&relay, &pki, "/au1/signaling").await;
    let mut raw = RawWs::connect(&relay, &pki, "/au1/signaling").await;
    raw.send_text("hello").await;
    assert_eq!(relay.record("handshake").await["outcome"], "ok");
}

/// A DNS server on 127.0.0.1 (UDP) that answers every A query with 127.0.0.1 for 300 s, or
/// never answers; it counts the queries.
async fn fake_dns(answers: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let queries = Arc::new(AtomicUsize::new(0));
    let counted = queries.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            counted.fetch_add(1, Ordering::SeqCst);
            if answers {
                if let Some(reply) = dns_answer(&buf[..n]) {
                    let _ = socket.send_to(&reply, from).await;
                }
            }
        }
    });
    (addr, queries)
}

/// The answer to a one-question query: 127.0.0.1 for an A question, nothing (NOERROR) for others.
fn dns_answer(query: &[u8]) -> Option<Vec<u8>> {
    let mut end = 12;
    while *query.get(end)? != 0 {
        end += 1 + query[end] as usize;
    }
    let qtype = u16::from_be_bytes([*query.get(end + 1)?, *query.get(end + 2)?]);
    end += 5;
    let mut reply = query.get(..end)?.to_vec();
    reply[2] = 0x81; // a response, recursion desired
    reply[3] = 0x80; // recursion available, NOERROR
    let a = qtype == 1;
    reply[6..8].copy_from_slice(&(a as u16).to_be_bytes());
    reply[8..12].fill(0);
    if a {
        reply.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1, 0, 0, 1, 0x2C, 0, 4, 127, 0, 0, 1]);
    }
    Some(reply)
}

/// A relay whose signalling route names the gateway by host (and `port`), resolved through the
/// DNS server at `dns`.
async fn relay_with_dns(pki: &Pki, dns: SocketAddr, port: u16, connect_timeout: &str) -> Relay {
    let text = format!(
        "[server]\ncert = {:?}\nkey = {:?}\n[upstream]\nca_file = {:?}\nsystem_dns = true\ndns_servers = [\"{dns}\"]\nconnect_timeout = \"{connect_timeout}\"\n\
         [admin]\nlisten = \"off\"\n[[routes]]\nname = \"signaling\"\npath = \"/signaling\"\nupstream = \"wss://{{region}}.vss.twilio.com:{port}/signaling\"\nregion_from = [\"path\"]\ndefault_region = \"au1\"\n",
        pki.relay_cert, pki.relay_key, pki.ca_file
    );
    Relay::start_config(sigrelay::Config::parse(&text, "dns.toml").unwrap()).await
}

#[tokio::test]
async fn gateway_names_resolve_asynchronously_once_per_ttl() {
    let pki = Pki::new();
    let mut gw = Gateway::start(&pki, Mode::Echo).await;
    let (dns, queries) = fake_dns(true).await;
    let mut relay = relay_with_dns(&pki, dns, gw.addr.port(), "2s").await;
    for i in 0..3 {
        let mut ws = relay.ws(&pki, "/au1/signaling").await;
        send_text(&mut ws, &format!("m{i}")).await;
        next_data(&mut ws).await;
        let r = relay.record("handshake").await;
        assert_eq!(r["outcome"], "ok", "{r}");
        assert_eq!(gw.event("connection").await["host"], "au1.vss.twilio.com");
    }
    assert_eq!(queries.load(Ordering::SeqCst), 1, "answered once, then from the cache");
}

#[tokio::test]
async fn a_lookup_that_never_answers_fails_in_time_and_stops() {
    let pki = Pki::new();
    let (dns, queries) = fake_dns(false).await;
    let mut relay = relay_with_dns(&pki, dns, 443, "1s").await;
    let started = Instant::now();
    let mut raw = RawWs::connect(&relay, &pki, "/au1/signaling").await;
    raw.send_text("hello").await;
    assert_eq!(raw.read_close().await.map(|c| c.0), Some(1014));
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    let r = relay.record("handshake").await;
    assert!(["upstream_timeout", "upstream_dns_error"].contains(&r["outcome"].as_str().unwrap()), "{r}");
    // The abandoned lookup does not go on asking.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let asked = queries.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(queries.load(Ordering::SeqCst), asked);
}

/// A raw HTTP/1.1 request to the admin listener with this Host; the status line.
async fn admin_status(addr: SocketAddr, host: &str) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut out)).await.unwrap().unwrap();
    String::from_utf8_lossy(&out).lines().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn the_admin_listener_checks_host_and_bounds_its_connections() {
    let pki = Pki::new();
    let relay = Relay::start_with_admin(&pki, "", "", "host_names = [\"relay-admin.internal\"]", "").await;
    let admin = relay.admin();
    assert_eq!(admin_status(admin, &admin.to_string()).await, "HTTP/1.1 200 OK");
    assert_eq!(admin_status(admin, "localhost:9090").await, "HTTP/1.1 200 OK");
    assert_eq!(admin_status(admin, "relay-admin.internal").await, "HTTP/1.1 200 OK");
    // DNS rebinding: a page's own name pointed at this address.
    assert_eq!(admin_status(admin, "attacker.example.com").await, "HTTP/1.1 421 Misdirected Request");

    // Heads are bounded, and no endpoint takes a body.
    let big = "a".repeat(32 * 1024);
    let (status, _) = http(admin, "GET", "/healthz", &[("cookie", &big)]).await;
    assert_eq!(status, 431);
    let (status, body) = http(admin, "DELETE", "/connections/x", &[("content-length", "1000000")]).await;
    assert_eq!((status, body.as_str()), (413, "admin endpoints take no request body\n"));

    // Connections beyond the cap are closed at once; a silent one is closed after the header timeout.
    let held: Vec<TcpStream> = futures_util::future::join_all((0..64).map(|_| TcpStream::connect(admin))).await.into_iter().map(Result::unwrap).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut over = TcpStream::connect(admin).await.unwrap();
    assert!(closes_within(&mut over, Duration::from_secs(2)).await, "the 65th connection is refused");
    let mut silent = held.into_iter().next().unwrap();
    assert!(closes_within(&mut silent, Duration::from_secs(8)).await, "a silent connection is not kept");
}

#[test]
fn a_public_admin_address_needs_a_token_or_an_explicit_opt_out() {
    let err = sigrelay::Config::parse("[admin]\nlisten = \"0.0.0.0:9090\"\n", "t.toml").unwrap_err();
    assert!(err.to_string().contains("admin.listen"), "{err}");
    assert!(err.to_string().contains("token_file"), "{err}");
    sigrelay::Config::parse("[admin]\nlisten = \"0.0.0.0:9090\"\nallow_unauthenticated = true\n", "t.toml").unwrap();
    sigrelay::Config::parse("[admin]\nlisten = \"[::1]:9090\"\n", "t.toml").unwrap();

    // The command line's address is checked as the file's is, and the problem names the flag.
    let public = sigrelay::config::Overrides { admin_listen: Some("0.0.0.0:9090".into()), ..Default::default() };
    let err = sigrelay::Config::parse_with("", "t.toml", &public).unwrap_err().to_string();
    assert!(err.contains("admin.listen (from --admin-listen or SIGRELAY_ADMIN_LISTEN)"), "{err}");
    assert!(err.contains("token_file"), "{err}");
    sigrelay::Config::parse_with("[admin]\nallow_unauthenticated = true\n", "t.toml", &public).unwrap();
    let off = sigrelay::config::Overrides { admin_listen: Some("off".into()), ..Default::default() };
    let c = sigrelay::Config::parse_with("[admin]\nlisten = \"0.0.0.0:9090\"\n", "t.toml", &off).unwrap();
    assert_eq!(c.admin.listen, None, "--admin-listen off takes the file's public address away, and its problem with it");
}
