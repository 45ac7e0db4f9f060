//! ICE server rewriting, so that media can follow signalling through the relay. The SDK asks
//! for ICE servers in its hello (body `ice`) and the gateway answers, right after `welcome`,
//! with `{"type":"msg","body":{"type":"iced","ice_servers":[…]}}`. In that one message, the
//! TURN entries that point at the TURN upstream's host become the relay's own `turns:` URL
//! (credentials kept: they are checked inside TURN's messages, not bound to a host); UDP and
//! STUN entries stay, so browsers that can use UDP still go direct.
//!
//! It happens before the pump starts, on the first gateway frames only: each is forwarded as it
//! arrived until the `iced`, which alone is re-framed. A frame that is not a complete, unmasked,
//! UTF-8 text frame of at most [`MAX_ICED`] bytes ends the watch untouched, as does the bound on
//! frames and time; the pump then takes over where it stopped.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::config::turn_url_authority;
use crate::frame::{self, OpCode};

/// The largest frame that may be an `iced` (it lists a few servers: under 2 KiB in practice).
pub const MAX_ICED: usize = 16 * 1024;
/// Gateway frames watched for the `iced` at most (it follows `welcome`).
const MAX_FRAMES: usize = 8;
/// How long the gateway's answer to the hello is watched for it.
const WATCH: Duration = Duration::from_secs(3);
/// How much longer writing what was read to the browser may take: a browser that does not read
/// the gateway's first answer by then is not going to.
const WRITE_GRACE: Duration = Duration::from_secs(2);

/// What the watch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rewrite {
    /// Whether an `iced` passed, and how many of its servers now point at the relay.
    pub iced_seen: bool,
    pub servers_rewritten: u32,
    /// Data messages and bytes forwarded to the browser meanwhile.
    pub msgs: u64,
    pub bytes: u64,
    /// Whether the browser stopped reading: a write to it did not finish in time, so its
    /// stream may hold part of a frame and the connection cannot go on.
    pub client_stalled: bool,
}

/// Which servers to rewrite, and to what.
#[derive(Debug, Clone)]
pub struct Rule<'a> {
    /// The TURN upstream's host (`global.turn.twilio.com`).
    pub upstream_host: &'a str,
    /// The relay's `turns:` URL.
    pub public_url: &'a str,
}

impl Rule<'_> {
    /// Whether a server URL is a TURN entry over TCP or TLS for the upstream's host (schemes and
    /// hosts compared without case, RFC 7065; an IPv6 host in brackets).
    fn applies(&self, url: &str) -> bool {
        let (scheme, _) = url.split_once(':').unwrap_or(("", ""));
        let scheme = scheme.to_ascii_lowercase();
        let query = url.split_once('?').map_or("", |(_, q)| q).to_ascii_lowercase();
        let udp = query.contains("transport=udp") || (scheme == "turn" && !query.contains("transport=tcp"));
        let authority = turn_url_authority(url);
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split_once(']').map_or(v6, |(h, _)| h),
            None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
        };
        let ours = self.upstream_host.trim_start_matches('[').trim_end_matches(']');
        matches!(scheme.as_str(), "turns" | "turn") && !udp && host.eq_ignore_ascii_case(ours)
    }

    /// What a message is, and for an `iced` naming the upstream's TURN servers, the message with
    /// them rewritten. Entries that end up the same as an earlier one (the upstream's TCP and
    /// TLS URLs with the same credentials both become the relay's) are dropped, so a browser
    /// opens one TURN connection to the relay, not one per copy.
    pub fn rewrite(&self, payload: &[u8]) -> Iced {
        let Ok(mut msg) = serde_json::from_slice::<Value>(payload) else { return Iced::Not };
        if msg["type"] != "msg" || msg["body"]["type"] != "iced" {
            return Iced::Not;
        }
        let Some(servers) = msg.pointer_mut("/body/ice_servers").and_then(Value::as_array_mut) else { return Iced::Unchanged };
        let mut moved = vec![false; servers.len()];
        for (server, moved) in servers.iter_mut().zip(moved.iter_mut()) {
            match server.get_mut("urls") {
                Some(Value::String(u)) if self.applies(u) => {
                    *u = self.public_url.to_string();
                    *moved = true;
                }
                Some(Value::Array(list)) => {
                    for u in list.iter_mut() {
                        if u.as_str().is_some_and(|s| self.applies(s)) {
                            *u = Value::String(self.public_url.to_string());
                            *moved = true;
                        }
                    }
                    if *moved {
                        let mut seen = std::collections::HashSet::new();
                        list.retain(|u| seen.insert(u.to_string()));
                    }
                }
                _ => {}
            }
        }
        if !moved.contains(&true) {
            return Iced::Unchanged;
        }
        let mut seen = std::collections::HashSet::new();
        let mut kept = moved.iter();
        servers.retain(|server| !*kept.next().expect("one flag per entry") || seen.insert(server.to_string()));
        let rewritten = servers.iter().filter(|s| self.points_here(s)).count() as u32;
        Iced::Rewritten(serde_json::to_vec(&msg).expect("a Value serializes"), rewritten)
    }

    /// Whether an entry lists the relay's URL.
    fn points_here(&self, server: &Value) -> bool {
        match &server["urls"] {
            Value::String(u) => u == self.public_url,
            Value::Array(list) => list.iter().any(|u| u == self.public_url),
            _ => false,
        }
    }
}

/// What [`Rule::rewrite`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Iced {
    /// Not an `iced` message.
    Not,
    /// An `iced` naming none of the upstream's TURN servers: passed on as it came.
    Unchanged,
    /// An `iced` with this many servers pointed at the relay, re-serialized.
    Rewritten(Vec<u8>, u32),
}

/// Watches the gateway's first frames (`leftover` came with its 101, the rest is read from
/// `upstream`) for the `iced`, forwarding each to `client` as it arrived and the `iced`
/// rewritten; frames larger than `max_frame` (or [`MAX_ICED`]) end the watch. Returns what it
/// did and the bytes read but not forwarded, for the pump; an I/O error is left for the pump to
/// find.
pub async fn watch<U, C>(upstream: &mut U, client: &mut C, leftover: Vec<u8>, rule: &Rule<'_>, max_frame: u64) -> (Rewrite, Vec<u8>)
where
    U: AsyncRead + Unpin,
    C: AsyncWrite + Unpin,
{
    let deadline = Instant::now() + WATCH;
    let write_deadline = deadline + WRITE_GRACE;
    let max_frame = max_frame.min(MAX_ICED as u64);
    let mut buf = leftover;
    let mut done = Rewrite::default();
    for _ in 0..MAX_FRAMES {
        // A whole candidate frame in `buf`, or the watch ends.
        let (header_len, total) = loop {
            match frame::parse_header(&buf) {
                Ok(Some(h)) if h.opcode == OpCode::Text && h.fin && h.mask.is_none() && h.frame_len() <= max_frame => {
                    if buf.len() as u64 >= h.frame_len() {
                        break (h.header_len, h.frame_len() as usize);
                    }
                }
                Ok(None) => {}
                _ => return (done, buf),
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, upstream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return (done, buf),
            }
        };
        let payload = &buf[header_len..total];
        // Invalid text is the pump's to fail, as it fails all invalid text.
        if !crate::utf8::is_valid(payload) {
            return (done, buf);
        }
        let iced = if mentions_iced(payload) { rule.rewrite(payload) } else { Iced::Not };
        let out = match &iced {
            Iced::Rewritten(rewritten, n) => {
                let mut out = Vec::with_capacity(frame::MAX_HEADER_LEN + rewritten.len());
                frame::encode_frame(&mut out, OpCode::Text, rewritten, None);
                done.servers_rewritten = *n;
                std::borrow::Cow::Owned(out)
            }
            Iced::Not | Iced::Unchanged => std::borrow::Cow::Borrowed(&buf[..total]),
        };
        // Each frame goes on as it came: the browser may be waiting for it.
        let write = async {
            client.write_all(&out).await?;
            client.flush().await
        };
        let written = match tokio::time::timeout_at(write_deadline, write).await {
            Ok(Ok(())) => out.len(),
            Ok(Err(_)) => return (done, buf),
            Err(_) => {
                done.client_stalled = true;
                return (done, buf);
            }
        };
        done.msgs += 1;
        done.bytes += written as u64;
        buf.drain(..total);
        if iced != Iced::Not {
            done.iced_seen = true;
            break;
        }
    }
    (done, buf)
}

/// Whether a payload mentions `"iced"` at all: the cheap test before any JSON parsing.
fn mentions_iced(payload: &[u8]) -> bool {
    payload.windows(6).any(|w| w == b"\"iced\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: Rule = Rule { upstream_host: "global.turn.twilio.com", public_url: "turns:relay.example.com:443?transport=tcp" };

    fn iced() -> String {
        r#"{"type":"msg","body":{"type":"iced","ice_servers":[
            {"urls":"turns:global.turn.twilio.com:443?transport=tcp","username":"u1","credential":"c1"},
            {"urls":["turn:global.turn.twilio.com:3478?transport=udp","turn:global.turn.twilio.com:443?transport=tcp"],"username":"u2","credential":"c2"},
            {"urls":"stun:global.stun.twilio.com:3478?transport=udp"},
            {"urls":"turns:elsewhere.example.net:443?transport=tcp","username":"u3","credential":"c3"}],"version":1}}"#
            .to_string()
    }

    #[test]
    fn rewrites_the_upstreams_tcp_and_tls_entries_and_keeps_the_rest() {
        let Iced::Rewritten(out, n) = RULE.rewrite(iced().as_bytes()) else { panic!("rewritten") };
        assert_eq!(n, 2);
        let v: Value = serde_json::from_slice(&out).unwrap();
        let servers = v["body"]["ice_servers"].as_array().unwrap();
        assert_eq!(servers[0]["urls"], "turns:relay.example.com:443?transport=tcp");
        assert_eq!(servers[0]["credential"], "c1", "credentials kept");
        assert_eq!(servers[1]["urls"], serde_json::json!(["turn:global.turn.twilio.com:3478?transport=udp", "turns:relay.example.com:443?transport=tcp"]));
        assert_eq!(servers[2]["urls"], "stun:global.stun.twilio.com:3478?transport=udp");
        assert_eq!(servers[3]["urls"], "turns:elsewhere.example.net:443?transport=tcp", "another host is not ours to move");
        assert!(String::from_utf8(out).unwrap().starts_with(r#"{"type":"msg","body":{"type":"iced""#), "key order kept");
    }

    #[test]
    fn one_relay_entry_per_credential_and_any_case() {
        let iced = r#"{"type":"msg","body":{"type":"iced","ice_servers":[
            {"urls":"TURNS:Global.Turn.Twilio.com:443?transport=tcp","username":"u","credential":"c"},
            {"urls":"turn:global.turn.twilio.com:3478?TRANSPORT=TCP","username":"u","credential":"c"},
            {"urls":"turn:global.turn.twilio.com:3478?transport=tcp","username":"v","credential":"d"},
            {"urls":"turns:global.turn.twilio.com:443?transport=tcp","username":"u","credential":"c"}]}}"#;
        let Iced::Rewritten(out, n) = RULE.rewrite(iced.as_bytes()) else { panic!("rewritten") };
        let v: Value = serde_json::from_slice(&out).unwrap();
        let servers = v["body"]["ice_servers"].as_array().unwrap();
        assert_eq!(servers.len(), 2, "{servers:?}");
        assert_eq!((servers[0]["username"].as_str(), servers[1]["username"].as_str()), (Some("u"), Some("v")));
        assert_eq!(n, 2);
        // An IPv6 upstream matches its bracketed URLs.
        let v6 = Rule { upstream_host: "::1", public_url: RULE.public_url };
        assert!(v6.applies("turns:[::1]:5349?transport=tcp"));
        assert!(!v6.applies("turns:[::2]:5349?transport=tcp"));
        // Duplicates that point elsewhere are the gateway's business, not a rewrite.
        let twice = r#"{"type":"msg","body":{"type":"iced","ice_servers":[{"urls":["stun:a:3478","stun:a:3478"]}]}}"#;
        assert_eq!(RULE.rewrite(twice.as_bytes()), Iced::Unchanged);
    }

    #[test]
    fn leaves_what_is_not_an_iced() {
        assert_eq!(RULE.rewrite(br#"{"type":"welcome","negotiatedTimeout":5000}"#), Iced::Not);
        assert_eq!(RULE.rewrite(b"not json"), Iced::Not);
        assert_eq!(RULE.rewrite(br#"{"type":"msg","body":{"type":"iced","ice_servers":[]}}"#), Iced::Unchanged);
    }

    fn text(s: &str) -> Vec<u8> {
        let mut f = Vec::new();
        frame::encode_frame(&mut f, OpCode::Text, s.as_bytes(), None);
        f
    }

    #[tokio::test]
    async fn forwards_frames_as_they_came_until_the_iced_and_hands_on_the_rest() {
        let welcome = text(r#"{"type":"welcome","negotiatedTimeout":5000}"#);
        let after = text(r#"{"type":"heartbeat"}"#);
        let (mut gw, mut up) = tokio::io::duplex(64 * 1024);
        // The welcome came with the 101; the iced and a heartbeat follow, split mid-frame.
        let mut rest = text(&iced());
        rest.extend_from_slice(&after);
        let cut = rest.len() / 2;
        gw.write_all(&rest[..cut]).await.unwrap();
        let tail = rest[cut..].to_vec();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            gw.write_all(&tail).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let mut to_browser = Vec::new();
        let (done, left) = watch(&mut up, &mut to_browser, welcome.clone(), &RULE, u64::MAX).await;
        assert!(done.iced_seen);
        assert_eq!((done.servers_rewritten, done.msgs), (2, 2));
        assert_eq!(&to_browser[..welcome.len()], &welcome[..], "the welcome as it came");
        let h = frame::parse_header(&to_browser[welcome.len()..]).unwrap().unwrap();
        let body: Value = serde_json::from_slice(&to_browser[welcome.len() + h.header_len..]).unwrap();
        assert_eq!(body["body"]["ice_servers"][0]["urls"], "turns:relay.example.com:443?transport=tcp");
        assert_eq!(left, after, "the pump gets the rest");
        assert_eq!(done.bytes as usize, to_browser.len());
    }

    /// The browser's writer sends only what is flushed (as the TLS stream does): each frame is
    /// flushed before the watch waits for the next, or a browser waiting for it would wait out
    /// the watch.
    #[tokio::test]
    async fn each_frame_reaches_the_browser_before_the_watch_reads_on() {
        let welcome = text(r#"{"type":"welcome","negotiatedTimeout":5000}"#);
        let (mut gw, mut up) = tokio::io::duplex(64 * 1024);
        let (browser_end, mut browser) = tokio::io::duplex(64 * 1024);
        let mut to_browser = tokio::io::BufWriter::new(browser_end);
        let expect = welcome.clone();
        let gateway = tokio::spawn(async move {
            // The gateway sends its iced only once the browser has the welcome.
            let mut got = vec![0; expect.len()];
            browser.read_exact(&mut got).await.unwrap();
            assert_eq!(got, expect);
            gw.write_all(&text(&iced())).await.unwrap();
            (gw, browser)
        });
        let (done, _) = watch(&mut up, &mut to_browser, welcome, &RULE, u64::MAX).await;
        assert!(done.iced_seen, "the welcome reached the browser before the watch ran out");
        gateway.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_browser_that_does_not_read_ends_the_watch_in_bounded_time() {
        let (mut gw, mut up) = tokio::io::duplex(64 * 1024);
        gw.write_all(&text(&iced())).await.unwrap();
        // The browser's side holds 16 bytes and is never read.
        let (mut to_browser, _unread) = tokio::io::duplex(16);
        let started = Instant::now();
        let (done, _) = watch(&mut up, &mut to_browser, Vec::new(), &RULE, u64::MAX).await;
        assert!(done.client_stalled);
        assert!(started.elapsed() <= WATCH + WRITE_GRACE);
        drop(gw);
    }

    #[tokio::test]
    async fn frames_over_the_message_limit_are_left_to_the_pump() {
        let iced = text(&iced());
        let (_gw, mut up) = tokio::io::duplex(1024);
        let mut to_browser = Vec::new();
        let (done, left) = watch(&mut up, &mut to_browser, iced.clone(), &RULE, 100).await;
        assert_eq!((done.iced_seen, done.msgs), (false, 0));
        assert_eq!(left, iced);
    }

    #[tokio::test]
    async fn a_frame_that_cannot_be_an_iced_ends_the_watch_untouched() {
        let mut big = Vec::new();
        frame::encode_frame(&mut big, OpCode::Text, &vec![b' '; MAX_ICED + 1], None);
        let (_gw, mut up) = tokio::io::duplex(1024);
        let mut to_browser = Vec::new();
        let (done, left) = watch(&mut up, &mut to_browser, big.clone(), &RULE, u64::MAX).await;
        assert_eq!((done.iced_seen, done.msgs), (false, 0));
        assert!(to_browser.is_empty());
        assert_eq!(left, big);
    }
}
