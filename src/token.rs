//! Reading the Twilio access token from the browser's first message, without verifying it.
//!
//! The relay has no signing secret; it only reads the JWT's header (`twr`, the region the token
//! was minted for) and payload (`exp`, `nbf`, identity and room for diagnostics). The token itself
//! is never logged or recorded.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;

/// What the relay learns from a token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenInfo {
    /// `twr` from the header: the region the token was minted for.
    pub region: Option<String>,
    pub exp: Option<i64>,
    pub nbf: Option<i64>,
    pub identity: Option<String>,
    pub room: Option<String>,
}

impl TokenInfo {
    /// Whether `exp` is in the past at `now` (unix seconds).
    pub fn expired_at(&self, now: i64) -> bool {
        self.exp.is_some_and(|exp| exp <= now)
    }
}

#[derive(Deserialize)]
struct FirstMessage<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    token: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    body: Option<Body<'a>>,
}

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    token: Option<std::borrow::Cow<'a, str>>,
}

/// What a first message says: its kind and its token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirstFacts {
    /// The signalling hello's body type (`ice`, `connect`, `sync`), or the message's own type
    /// (`connect` on the insights socket); cut to 32 characters.
    pub kind: Option<String>,
    /// The token at `$.body.token` (signalling hello or sync) or `$.token` (insights connect).
    pub token: Option<String>,
}

/// Reads a first message; `None` for anything that is not such JSON.
pub fn read_first(message: &[u8]) -> Option<FirstFacts> {
    let msg: FirstMessage = serde_json::from_slice(message).ok()?;
    let hello = msg.kind.as_deref() == Some("hello");
    let (body_kind, body_token) = msg.body.map(|b| (b.kind, b.token)).unwrap_or_default();
    let kind = if hello { body_kind } else { msg.kind };
    Some(FirstFacts {
        kind: kind.map(|k| k.chars().take(32).collect()),
        token: body_token.or(msg.token).map(|t| t.into_owned()),
    })
}

/// Finds the token in a first message: `$.body.token` (signalling hello or sync) or `$.token`
/// (insights connect). Returns `None` for anything that is not such JSON.
pub fn find_token(message: &[u8]) -> Option<String> {
    read_first(message)?.token
}

#[derive(Deserialize)]
struct Header {
    twr: Option<String>,
}

#[derive(Deserialize)]
struct Payload {
    exp: Option<i64>,
    nbf: Option<i64>,
    grants: Option<Grants>,
}

#[derive(Deserialize)]
struct Grants {
    identity: Option<String>,
    video: Option<VideoGrant>,
}

#[derive(Deserialize)]
struct VideoGrant {
    room: Option<String>,
}

/// Why a token could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token is not three dot-separated parts")]
    Shape,
    #[error("token {0} is not base64url")]
    Base64(&'static str),
    #[error("token {0} is not a JSON object")]
    Json(&'static str),
}

/// Decodes a JWT's header and payload (the signature is not checked).
pub fn decode(token: &str) -> Result<TokenInfo, TokenError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(_sig), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(TokenError::Shape);
    };
    let h = URL_SAFE_NO_PAD.decode(h.trim_end_matches('=')).map_err(|_| TokenError::Base64("header"))?;
    let p = URL_SAFE_NO_PAD.decode(p.trim_end_matches('=')).map_err(|_| TokenError::Base64("payload"))?;
    let header: Header = serde_json::from_slice(&h).map_err(|_| TokenError::Json("header"))?;
    let payload: Payload = serde_json::from_slice(&p).map_err(|_| TokenError::Json("payload"))?;
    let (identity, room) = match payload.grants {
        Some(g) => (g.identity, g.video.and_then(|v| v.room)),
        None => (None, None),
    };
    Ok(TokenInfo { region: header.twr, exp: payload.exp, nbf: payload.nbf, identity, room })
}

#[cfg(test)]
mod tests {
    use super::*;

    const AU1: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCIsImN0eSI6InR3aWxpby1mcGE7dj0xIiwidHdyIjoiYXUxIn0.eyJqdGkiOiJTS2JiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiLTE3OTU0ODM4NzMiLCJncmFudHMiOnsiaWRlbnRpdHkiOiJhbGljZSIsInZpZGVvIjp7InJvb20iOiJyb29tMTMifX0sImlhdCI6MTc5NTQ4Mzg3MywiZXhwIjo0MTAyNDQ0ODAwLCJpc3MiOiJTS2JiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiIiwic3ViIjoiQUNhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYSJ9.LL9g7Ca6DpwAMPwTHNBR41IWeLkBJBPszLze-Vyd50U";

    #[test]
    fn finds_the_token_in_both_first_messages() {
        let hello = format!(r#"{{"id":"x","type":"hello","version":2,"body":{{"edge":"roaming","token":"{AU1}","type":"ice"}}}}"#);
        assert_eq!(find_token(hello.as_bytes()).as_deref(), Some(AU1));
        let connect = format!(r#"{{"type":"connect","token":"{AU1}","version":1}}"#);
        assert_eq!(find_token(connect.as_bytes()).as_deref(), Some(AU1));
        assert_eq!(find_token(br#"{"type":"heartbeat"}"#), None);
        assert_eq!(find_token(b"not json"), None);
        assert_eq!(find_token(br#"{"token":5}"#), None);
        let kind = |m: &str| read_first(m.as_bytes()).and_then(|f| f.kind);
        assert_eq!(kind(&hello).as_deref(), Some("ice"));
        assert_eq!(kind(&connect).as_deref(), Some("connect"));
        assert_eq!(kind(r#"{"type":"hello","body":{"type":"sync","token":"t"}}"#).as_deref(), Some("sync"));
        assert_eq!(kind(r#"{"type":"hello","version":2}"#), None, "2.0-2.4: a hello without a body");
    }

    #[test]
    fn decodes_region_and_times() {
        let info = decode(AU1).unwrap();
        assert_eq!(info.region.as_deref(), Some("au1"));
        assert_eq!(info.exp, Some(4102444800));
        assert_eq!(info.identity.as_deref(), Some("alice"));
        assert_eq!(info.room.as_deref(), Some("room13"));
        assert!(!info.expired_at(1_800_000_000));
        assert_eq!(decode("a.b"), Err(TokenError::Shape));
        assert_eq!(decode("!!.e30.x"), Err(TokenError::Base64("header")));
    }
}
