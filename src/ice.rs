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

/// What the watch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rewrite {
    /// Whether an `iced` passed, and how many of its servers now point at the relay.
    pub iced_seen: bool,
    pub servers_rewritten: u32,
    /// Data messages and bytes forwarded to the browser meanwhile.
    pub msgs: u64,
    pub bytes: u64,
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
    /// Whether a server URL is a TURN entry over TCP or TLS for the upstream's host.
    fn applies(&self, url: &str) -> bool {
        let (scheme, _) = url.split_once(':').unwrap_or(("", ""));
        let udp = url.contains("transport=udp") || (scheme == "turn" && !url.contains("transport=tcp"));
        let host = turn_url_authority(url).rsplit_once(':').map_or(turn_url_authority(url), |(h, _)| h);
        matches!(scheme, "turns" | "turn") && !udp && host.eq_ignore_ascii_case(self.upstream_host)
    }

    /// What a message is, and for an `iced` naming the upstream's TURN servers, the message with
    /// them rewritten.
    pub fn rewrite(&self, payload: &[u8]) -> Iced {
        let Ok(mut msg) = serde_json::from_slice::<Value>(payload) else { return Iced::Not };
        if msg["type"] != "msg" || msg["body"]["type"] != "iced" {
            return Iced::Not;
        }
        let Some(servers) = msg.pointer_mut("/body/ice_servers").and_then(Value::as_array_mut) else { return Iced::Unchanged };
        let mut rewritten = 0;
        for server in servers {
            let Some(urls) = server.get_mut("urls") else { continue };
            let changed = match urls {
                Value::String(u) if self.applies(u) => {
                    *u = self.public_url.to_string();
                    true
                }
                Value::Array(list) => {
                    let before = list.len();
                    let mut changed = false;
                    for u in list.iter_mut() {
                        if u.as_str().is_some_and(|s| self.applies(s)) {
                            *u = Value::String(self.public_url.to_string());
                            changed = true;
                        }
                    }
                    // Two of the upstream's URLs in one entry become one of the relay's.
                    let mut seen = std::collections::HashSet::new();
                    list.retain(|u| seen.insert(u.to_string()));
                    changed || list.len() != before
                }
                _ => false,
            };
            rewritten += changed as u32;
        }
        if rewritten == 0 {
            return Iced::Unchanged;
        }
        Iced::Rewritten(serde_json::to_vec(&msg).expect("a Value serializes"), rewritten)
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
/// rewritten. Returns what it did and the bytes read but not forwarded, for the pump; an I/O
/// error is left for the pump to find.
pub async fn watch<U, C>(upstream: &mut U, client: &mut C, leftover: Vec<u8>, rule: &Rule<'_>) -> (Rewrite, Vec<u8>)
where
    U: AsyncRead + Unpin,
    C: AsyncWrite + Unpin,
{
    let deadline = Instant::now() + WATCH;
    let mut buf = leftover;
    let mut done = Rewrite::default();
    for _ in 0..MAX_FRAMES {
        // A whole candidate frame in `buf`, or the watch ends.
        let (header_len, total) = loop {
            match frame::parse_header(&buf) {
                Ok(Some(h)) if h.opcode == OpCode::Text && h.fin && h.mask.is_none() && h.frame_len() <= MAX_ICED as u64 => {
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
        let written = match &iced {
            Iced::Rewritten(rewritten, n) => {
                let mut out = Vec::with_capacity(frame::MAX_HEADER_LEN + rewritten.len());
                frame::encode_frame(&mut out, OpCode::Text, rewritten, None);
                done.servers_rewritten = *n;
                client.write_all(&out).await.map(|()| out.len())
            }
            Iced::Not | Iced::Unchanged => client.write_all(&buf[..total]).await.map(|()| total),
        };
        let Ok(written) = written else { return (done, buf) };
        done.msgs += 1;
        done.bytes += written as u64;
        buf.drain(..total);
        if iced != Iced::Not {
            done.iced_seen = true;
            break;
        }
    }
    let _ = client.flush().await;
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
        let (done, left) = watch(&mut up, &mut to_browser, welcome.clone(), &RULE).await;
        assert!(done.iced_seen);
        assert_eq!((done.servers_rewritten, done.msgs), (2, 2));
        assert_eq!(&to_browser[..welcome.len()], &welcome[..], "the welcome as it came");
        let h = frame::parse_header(&to_browser[welcome.len()..]).unwrap().unwrap();
        let body: Value = serde_json::from_slice(&to_browser[welcome.len() + h.header_len..]).unwrap();
        assert_eq!(body["body"]["ice_servers"][0]["urls"], "turns:relay.example.com:443?transport=tcp");
        assert_eq!(left, after, "the pump gets the rest");
        assert_eq!(done.bytes as usize, to_browser.len());
    }

    #[tokio::test]
    async fn a_frame_that_cannot_be_an_iced_ends_the_watch_untouched() {
        let mut big = Vec::new();
        frame::encode_frame(&mut big, OpCode::Text, &vec![b' '; MAX_ICED + 1], None);
        let (_gw, mut up) = tokio::io::duplex(1024);
        let mut to_browser = Vec::new();
        let (done, left) = watch(&mut up, &mut to_browser, big.clone(), &RULE).await;
        assert_eq!((done.iced_seen, done.msgs), (false, 0));
        assert!(to_browser.is_empty());
        assert_eq!(left, big);
    }
}
