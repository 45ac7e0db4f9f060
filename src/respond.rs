//! The one builder of the plain responses sigrelay's HTTP listeners send.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;

/// A response with a complete body.
pub type Resp = Response<Full<Bytes>>;

/// A response that no cache keeps.
pub fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    response(status, "text/plain; charset=utf-8", body)
}

/// A response with no body (a 101 or a 204).
pub fn empty(status: StatusCode) -> Resp {
    Response::builder().status(status).body(Full::new(Bytes::new())).expect("static response parts are valid")
}
