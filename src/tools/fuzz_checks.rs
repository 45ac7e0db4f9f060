//! The properties the fuzz targets (fuzz/) check, kept here so the regression test
//! (tests/fuzz_regressions.rs) replays saved inputs through exactly the same code.

use crate::frame::{encode_frame, parse_close_payload, parse_header};
use crate::route::{self, PathMatch, Router};

/// The first-message token reader never panics on any payload.
pub fn first_frame_token(data: &[u8]) {
    if let Some(token) = crate::token::find_token(data) {
        let _ = crate::token::decode(&token);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = crate::token::decode(s);
    }
}

/// Any path and query: only allowed regions are taken, and the upstream is a configured host.
pub fn route_region(router: &Router, data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (path, query) = s.split_once('?').map_or((s, None), |(p, q)| (p, Some(q)));
    if let PathMatch::Route { region: Some(r), .. } = router.match_path(path) {
        assert!(router.is_allowed(r), "path region {r:?} is not allowed");
    }
    if let Ok(request) = router.match_request(path, query) {
        for r in [&request.path_region, &request.query_region].into_iter().flatten() {
            assert!(router.is_allowed(r), "region {r:?} is not allowed");
        }
        let decision = route::decide(router.route(request.route), &request, false, None, 0);
        assert!(decision.target.host.ends_with(".twilio.com"), "{}", decision.target.host);
    }
}

/// Parsing a frame header never panics, stays within the input, and re-encodes consistently.
pub fn frame_header(data: &[u8]) {
    if let Ok(Some(h)) = parse_header(data) {
        assert!(h.header_len <= data.len());
        let body = &data[h.header_len..];
        if h.payload_len <= body.len() as u64 && h.payload_len <= 1 << 16 {
            let payload = &body[..h.payload_len as usize];
            let mut out = Vec::new();
            encode_frame(&mut out, h.opcode, payload, h.mask);
            let again = parse_header(&out).expect("re-encoded frame parses").expect("complete");
            // Only the fewest-bytes length encoding parses, and it is the one encoding writes.
            assert_eq!((again.opcode, again.payload_len, again.mask, again.header_len), (h.opcode, h.payload_len, h.mask, h.header_len));
            let _ = parse_close_payload(payload);
        }
    }
}

/// The PROXY header parser never panics, and a parsed header fits the input.
pub fn proxy_header(data: &[u8]) {
    if let Ok(Some((len, _))) = crate::proxy_protocol::parse(data) {
        assert!(len <= data.len());
    }
}
