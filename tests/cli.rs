//! The `sigrelay` binary as users run it: check-config, and a start on the shipped config.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

mod support;

const BIN: &str = env!("CARGO_BIN_EXE_sigrelay");
const REPO: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn check_config_reports_every_problem_with_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"nowhere\"\nhandshake_timeout = \"forever\"\n[routing]\nregions = []\n\
         [[routes]]\npath = \"/signaling\"\nupstream = \"wss://evil.example.com/\"\nregion_from = [\"header\"]\n",
    )
    .unwrap();
    let out = Command::new(BIN).args(["check-config", "--config"]).arg(&file).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let f = file.display();
    for key in ["server.listen", "server.handshake_timeout", "routing.regions", "routes[0].upstream", "routes[0].region_from[0]"] {
        assert!(err.contains(&format!("{f}: {key}: ")), "{key} missing from:\n{err}");
    }

    let out = Command::new(BIN).args(["check-config", "--config", "/does/not/exist.toml"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));

    // A syntax error names the line.
    std::fs::write(&file, "[server\nlisten = 1\n").unwrap();
    let out = Command::new(BIN).args(["check-config", "--config"]).arg(&file).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn check_config_accepts_the_shipped_config() {
    let out = Command::new(BIN)
        .current_dir(REPO)
        .args(["check-config", "--config", "config/sigrelay.toml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok: 2 route(s), 10 region(s)"));
}

#[test]
fn version_and_help() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("sigrelay {}", env!("CARGO_PKG_VERSION")));
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["check-config", "mock-gateway", "--listen", "SIGRELAY_LISTEN"] {
        assert!(help.contains(word), "{word} missing from --help:\n{help}");
    }
}

/// `--admin-listen` (or its variable) on a public address is refused as the same line in the
/// file would be: the admin listener lists and closes connections.
#[test]
fn a_public_admin_address_on_the_command_line_needs_a_token_too() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::copy(Path::new(REPO).join("config/sigrelay.toml"), dir.path().join("config/sigrelay.toml")).unwrap();
    for (flag, env) in [(Some("0.0.0.0:0"), None), (None, Some("0.0.0.0:0"))] {
        let mut cmd = Command::new(BIN);
        cmd.current_dir(dir.path()).args(["run", "--listen", "127.0.0.1:0"]);
        if let Some(a) = flag {
            cmd.args(["--admin-listen", a]);
        }
        if let Some(a) = env {
            cmd.env("SIGRELAY_ADMIN_LISTEN", a);
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        // Before the fix it started and served: the timeout kills it and fails the test.
        let status = wait_with_timeout(&mut child, Duration::from_secs(20));
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert_eq!(status.code(), Some(1), "{err}");
        assert!(err.contains("admin.listen (from --admin-listen or SIGRELAY_ADMIN_LISTEN)"), "{err}");
        assert!(err.contains("token_file"), "{err}");
    }
}

/// A fresh checkout: the shipped config, no certificates yet. sigrelay generates the dev pair,
/// serves, writes records only on stdout, and exits 0 on SIGTERM.
#[test]
fn starts_on_the_shipped_config_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::copy(Path::new(REPO).join("config/sigrelay.toml"), dir.path().join("config/sigrelay.toml")).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir.path()).env("SIGRELAY_LISTEN", "127.0.0.1:0").env("SIGRELAY_ADMIN_LISTEN", "127.0.0.1:0");
    let Running { mut child, early_log: log, addr, .. } = start(cmd);
    assert!(log.iter().any(|l| l.contains("SELF-SIGNED")), "a loud warning: {log:?}");
    let cert = dir.path().join("certs/dev/cert.pem");
    assert!(cert.exists() && dir.path().join("certs/dev/key.pem").exists());

    // A plain GET on a route: 426 and one record on stdout.
    let resp = https_get(&addr, &cert, "/signaling");
    assert!(resp.starts_with("HTTP/1.1 426"), "{resp}");
    let resp = https_get(&addr, &cert, "/healthz");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    let probe = |addr: &str| Command::new(BIN).args(["healthcheck", "--listen", addr]).output().unwrap();
    let up = probe(&addr);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));

    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = wait_with_timeout(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
    assert!(!probe(&addr).status.success(), "healthcheck fails once the relay is gone");
    let mut stdout = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout carries records only: {stdout}");
    let record: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(record["outcome"], "not_websocket");
    assert_eq!(record["sni"], "localhost");
}

/// A running `sigrelay run`: its stderr lines on a channel, and the address it printed.
struct Running {
    child: std::process::Child,
    stderr: mpsc::Receiver<String>,
    /// Every stderr line up to and including the address line.
    early_log: Vec<String>,
    addr: String,
}

/// Starts the binary as set up by `cmd` and waits for its address line.
fn start(mut cmd: Command) -> Running {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (tx, stderr) = mpsc::channel();
    let pipe = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut early_log = Vec::new();
    let addr = loop {
        let line = stderr.recv_timeout(Duration::from_secs(20)).expect("sigrelay printed its address");
        early_log.push(line.clone());
        if let Some(addr) = line.split("listening on ").nth(1) {
            break addr.trim().to_string();
        }
    };
    Running { child, stderr, early_log, addr }
}

fn wait_with_timeout(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("sigrelay did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// GET over TLS, trusting the given self-signed certificate; returns the whole response.
fn https_get(addr: &str, cert: &Path, path: &str) -> String {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    write!(tls, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// SIGHUP reloads the file (a broken one is rejected with its problems and the running config
/// kept); SIGTERM drains live relayed connections with 1012 and exits 0.
#[test]
fn sighup_reloads_and_sigterm_drains_live_connections() {
    use futures_util::{SinkExt, StreamExt};
    use sigrelay::tools::mock_gateway::Mode;
    use tokio_tungstenite::tungstenite::Message;

    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = support::Pki::new();
    let gw = rt.block_on(support::Gateway::start(&pki, Mode::Echo));
    let config = pki.dir.path().join("sigrelay.toml");
    let write_config = |route: &str| {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\ndrain_timeout = \"300ms\"\ndrain_jitter = \"100ms\"\n\
             [upstream]\nca_file = {:?}\nsystem_dns = false\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [[routes]]\npath = \"{route}\"\nupstream = \"wss://{{region}}.vss.twilio.com/signaling\"\nregion_from = [\"path\"]\ndefault_region = \"au1\"\n{}",
            pki.relay_cert, pki.relay_key, pki.ca_file, support::resolve_all_to(gw.addr)
        );
        std::fs::write(&config, text).unwrap();
    };
    write_config("/signaling");
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--config"]).arg(&config);
    let Running { mut child, stderr: rx, addr, .. } = start(cmd);
    let get = |path: &str| https_get(&addr, &pki.ca_file, path);
    assert!(get("/signaling").starts_with("HTTP/1.1 426"));
    let hup = |child: &std::process::Child| {
        assert!(Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap().success());
    };

    // A good reload: the route moves.
    write_config("/sig2");
    hup(&child);
    let moved = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        get("/sig2").starts_with("HTTP/1.1 426")
    });
    assert!(moved, "the new route answers after SIGHUP");
    assert!(get("/signaling").starts_with("HTTP/1.1 404"));

    // A bad reload: every problem logged, the running config kept.
    std::fs::write(&config, "[server]\nlisten = \"nowhere\"\n[[routes]]\npath = \"x\"\n").unwrap();
    hup(&child);
    let mut log = Vec::new();
    while !log.iter().any(|l: &String| l.contains("reload rejected")) {
        log.push(rx.recv_timeout(Duration::from_secs(10)).expect("a reload rejection in the log"));
    }
    // The message lists every problem, one per line.
    let mut rejected = log.last().unwrap().clone();
    while !(rejected.contains("server.listen") && rejected.contains("routes[0].path")) {
        rejected += &rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| panic!("problems missing: {rejected}"));
    }
    assert!(get("/sig2").starts_with("HTTP/1.1 426"));

    // A live relayed connection, then SIGTERM.
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let close = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(pki.client_tls())
            .connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://localhost:{port}/au1/sig2"), tls).await.unwrap();
        ws.send(Message::text("hi")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap().to_text().unwrap(), "hi");
        assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("close in time") {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        }
    });
    let close = close.expect("a close frame with a code");
    assert_eq!(u16::from(close.code), 1012);
    assert_eq!(wait_with_timeout(&mut child, Duration::from_secs(20)).code(), Some(0));
    let mut stdout = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    let closes: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "close")
        .collect();
    assert_eq!(closes.len(), 1, "{stdout}");
    assert_eq!((closes[0]["outcome"].as_str(), closes[0]["closed_by"].as_str()), (Some("shutdown"), Some("relay")));
}

/// With debug logging on, neither stderr nor stdout ever holds the token, a cookie or an
/// Authorization value, whether the connection is relayed or fails.
#[test]
fn no_log_line_or_record_carries_a_secret() {
    use futures_util::{SinkExt, StreamExt};
    use sigrelay::tools::mock_gateway::Mode;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = support::Pki::new();
    let gw = rt.block_on(support::Gateway::start(&pki, Mode::Echo));
    let config = pki.dir.path().join("sigrelay.toml");
    let closed = rt.block_on(support::closed_port());
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\n[upstream]\nca_file = {:?}\nsystem_dns = false\n\
         [admin]\nlisten = \"off\"\n[upstream.resolve]\n\"au1.vss.twilio.com\" = \"{}\"\n\"de1.vss.twilio.com\" = \"{closed}\"\n",
        pki.relay_cert, pki.relay_key, pki.ca_file, gw.addr
    );
    std::fs::write(&config, text).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--config"]).arg(&config).env("SIGRELAY_LOG", "trace").env("SIGRELAY_LOG_FORMAT", "json");
    let Running { mut child, stderr, early_log, addr } = start(cmd);
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let token = support::token("au1_valid_until_2100");
    let (cookie, bearer) = ("session=COOKIE-SECRET-1234", "Bearer AUTH-SECRET-5678");
    rt.block_on(async {
        for path in ["/au1/signaling", "/de1/signaling"] {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let tls = tokio_rustls::TlsConnector::from(pki.client_tls())
                .connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap();
            let mut req = format!("wss://localhost:{port}{path}").into_client_request().unwrap();
            req.headers_mut().insert("cookie", cookie.parse().unwrap());
            req.headers_mut().insert("authorization", bearer.parse().unwrap());
            let (mut ws, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
            ws.send(Message::text(support::hello(&token))).await.unwrap();
            while let Some(Ok(m)) = ws.next().await {
                if m.is_close() || m.is_text() {
                    break;
                }
            }
            let _ = ws.close(None).await;
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert_eq!(wait_with_timeout(&mut child, Duration::from_secs(20)).code(), Some(0));
    let mut logs = early_log.join("\n");
    for line in stderr.iter() {
        logs += &line;
        logs.push('\n');
    }
    let mut records = String::new();
    child.stdout.take().unwrap().read_to_string(&mut records).unwrap();
    assert!(records.contains("upstream_connect_error") && records.contains("\"outcome\":\"ok\""), "{records}");
    assert!(logs.lines().count() > 5, "trace logging produced lines");
    let signature = token.rsplit('.').next().unwrap();
    for (name, text) in [("stderr", &logs), ("stdout", &records)] {
        for secret in [token.as_str(), signature, "COOKIE-SECRET-1234", "AUTH-SECRET-5678"] {
            assert!(!text.contains(secret), "{name} contains a secret ({})", &secret[..8]);
        }
    }
}

/// sigrelay raises its soft descriptor limit to the hard one, derives `max_connections` from it
/// (two descriptors per relayed connection; 64 in reserve, plus 4 per extra thread), and past it refuses with a 503 and a
/// record instead of failing `accept()` or crashing.
#[test]
fn past_the_descriptor_limit_it_refuses_with_503_and_a_record() {
    use futures_util::{SinkExt, StreamExt};
    use sigrelay::tools::mock_gateway::Mode;
    use tokio_tungstenite::tungstenite::Message;

    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = support::Pki::new();
    let gw = rt.block_on(support::Gateway::start(&pki, Mode::Echo));
    let config = pki.dir.path().join("sigrelay.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\nthreads = 3\n[upstream]\nca_file = {:?}\nsystem_dns = false\n\
         [admin]\nlisten = \"off\"\n{}",
        pki.relay_cert, pki.relay_key, pki.ca_file, support::resolve_all_to(gw.addr)
    );
    std::fs::write(&config, text).unwrap();
    // Soft 100, hard 200: without the raise the cap would be 14; with it, (200 - 64 - 2 * 4) / 2 = 64.
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=100:200", BIN, "run", "--config"]).arg(&config);
    let Running { mut child, addr, .. } = start(cmd);
    let (tx, records) = mpsc::channel::<serde_json::Value>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(serde_json::from_str(&line).unwrap());
        }
    });
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let relay_ws = || async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(pki.client_tls())
            .connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        tokio_tungstenite::client_async(format!("wss://localhost:{port}/au1/signaling"), tls).await
    };
    rt.block_on(async {
        let mut held = Vec::new();
        for i in 0..64 {
            let (mut ws, _) = relay_ws().await.unwrap_or_else(|e| panic!("connection {i}: {e}"));
            ws.send(Message::text(format!("hello {i}"))).await.unwrap();
            let echoed = tokio::time::timeout(support::WAIT, ws.next()).await.unwrap().unwrap().unwrap();
            assert_eq!(echoed.to_text().unwrap(), format!("hello {i}"));
            held.push(ws);
        }
        match relay_ws().await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 503),
            other => panic!("the 65th connection was not refused with 503: {other:?}"),
        }
        // Still serving: one leaves, another gets in.
        let mut first = held.remove(0);
        first.close(None).await.unwrap();
        while first.next().await.is_some() {}
        let mut again = None;
        for _ in 0..50 {
            if let Ok((ws, _)) = relay_ws().await {
                again = Some(ws);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut again = again.expect("a connection once one left");
        again.send(Message::text("again")).await.unwrap();
        assert_eq!(tokio::time::timeout(support::WAIT, again.next()).await.unwrap().unwrap().unwrap().to_text().unwrap(), "again");
    });
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert_eq!(wait_with_timeout(&mut child, Duration::from_secs(30)).code(), Some(0));
    let all: Vec<serde_json::Value> = records.try_iter().collect();
    let refused: Vec<_> = all.iter().filter(|r| r["outcome"] == "over_max_connections").collect();
    assert!(!refused.is_empty(), "a record for the refused connection");
    assert!(refused.iter().all(|r| r["event"] == "handshake" && r["route"] == "signaling"));
    let ok = all.iter().filter(|r| r["event"] == "handshake" && r["outcome"] == "ok").count();
    assert_eq!(ok, 65, "64 held plus the one after a slot freed");
}

/// Under systemd (`Type=notify`), sigrelay says READY=1 on `NOTIFY_SOCKET` only once every
/// accept thread accepts (the main listener's `/readyz` answers 200 when it arrives), with a
/// STATUS= naming how many threads accept (what `systemctl status` shows), brackets a
/// SIGHUP reload with RELOADING=1 and READY=1, and says STOPPING=1 when SIGTERM starts the drain.
#[test]
fn tells_systemd_ready_only_once_accepting_then_reloading_and_stopping() {
    let pki = support::Pki::new();
    let config = pki.dir.path().join("sigrelay.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nthreads = 2\ncert = {:?}\nkey = {:?}\ndrain_timeout = \"200ms\"\ndrain_jitter = \"0s\"\n\
             [upstream]\nsystem_dns = false\n[admin]\nlisten = \"off\"\n",
            pki.relay_cert, pki.relay_key
        ),
    )
    .unwrap();
    let (socket, socket_path) = notify_socket(&pki);

    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--config"]).arg(&config).env("NOTIFY_SOCKET", &socket_path);
    let Running { mut child, addr, .. } = start(cmd);
    let ready = next_notification(&socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(ready.lines().any(|l| l == "STATUS=accepting on 2 thread(s)"), "systemctl status names the threads: {ready:?}");
    // READY=1 was sent after every thread started accepting, so the listener answers ready now.
    let readyz = https_get(&addr, &pki.ca_file, "/readyz");
    assert!(readyz.starts_with("HTTP/1.1 200"), "{readyz}");

    assert!(Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap().success());
    let reloading = next_notification(&socket);
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading:?}");
    assert!(reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")), "{reloading:?}");
    let reloaded = next_notification(&socket);
    assert!(reloaded.lines().any(|l| l == "READY=1"), "{reloaded:?}");

    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let stopping = next_notification(&socket);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(wait_with_timeout(&mut child, Duration::from_secs(20)).success());
}

/// A datagram socket standing in for systemd's notify socket, in the test's directory.
fn notify_socket(pki: &support::Pki) -> (std::os::unix::net::UnixDatagram, std::path::PathBuf) {
    let path = pki.dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    (socket, path)
}

/// The next notification sigrelay sent (within 20 s).
fn next_notification(socket: &std::os::unix::net::UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification in time");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A SIGHUP while a drain is under way is applied, but systemd hears nothing of it: READY=1
/// after STOPPING=1 would tell systemd the stopping service is up again.
#[test]
fn a_reload_during_the_drain_sends_no_ready_after_stopping() {

    use futures_util::{SinkExt, StreamExt};
    use sigrelay::tools::mock_gateway::Mode;
    use tokio_tungstenite::tungstenite::Message;

    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = support::Pki::new();
    let gw = rt.block_on(support::Gateway::start(&pki, Mode::Echo));
    let config = pki.dir.path().join("sigrelay.toml");
    // A drain long enough for the reload to happen inside it.
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\ndrain_timeout = \"4s\"\ndrain_jitter = \"0s\"\n\
             [upstream]\nca_file = {:?}\nsystem_dns = false\n[admin]\nlisten = \"off\"\n\
             [[routes]]\npath = \"/signaling\"\nupstream = \"wss://{{region}}.vss.twilio.com/signaling\"\nregion_from = [\"path\"]\ndefault_region = \"au1\"\n{}",
            pki.relay_cert, pki.relay_key, pki.ca_file, support::resolve_all_to(gw.addr)
        ),
    )
    .unwrap();
    let (socket, socket_path) = notify_socket(&pki);
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--config"]).arg(&config).env("NOTIFY_SOCKET", &socket_path);
    let Running { mut child, stderr: rx, addr, .. } = start(cmd);
    let ready = next_notification(&socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");

    // A live relayed connection keeps the drain going for its drain_timeout.
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let _ws = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(pki.client_tls())
            .connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://localhost:{port}/au1/signaling"), tls).await.unwrap();
        ws.send(Message::text("hi")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap().to_text().unwrap(), "hi");
        ws
    });
    let signal = |sig: &str| assert!(Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success());
    signal("-TERM");
    let stopping = next_notification(&socket);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    signal("-HUP");
    // The reload is applied inside the drain (the log says so) ...
    let mut log = Vec::new();
    while !log.iter().any(|l: &String| l.contains("configuration reloaded")) {
        log.push(rx.recv_timeout(Duration::from_secs(3)).unwrap_or_else(|_| panic!("no reload during the drain: {log:?}")));
    }
    assert!(!log.iter().any(|l| l.contains("drain timeout reached")), "the reload came after the drain: {log:?}");
    assert!(wait_with_timeout(&mut child, Duration::from_secs(20)).success());
    // ... and nothing was sent after STOPPING=1.
    socket.set_nonblocking(true).unwrap();
    let mut after = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = socket.recv(&mut buf) {
        after.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        !after.iter().any(|d| d.lines().any(|l| l == "READY=1" || l == "RELOADING=1")),
        "READY=1 or RELOADING=1 after STOPPING=1: {after:?}"
    );
}
