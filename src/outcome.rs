//! Outcome words, the side at fault, and the one place they map to HTTP statuses and close codes.

use http::StatusCode;
use serde::Serialize;

/// One word saying how a handshake or a relayed connection ended. Written to records as
/// snake_case; the README documents every value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Handshake: the connection is relayed. Never a close outcome.
    Ok,
    /// A plain (non-upgrade) request on a route: 426.
    NotWebsocket,
    /// No route for the path: 404.
    NotFound,
    /// Malformed upgrade, wrong method or version, absolute URI naming another host: 400.
    BadRequest,
    /// A region in the path or query that is not in the allow-list: 400.
    BadRegion,
    /// The token had expired and `reject_expired_tokens` is on: closed with 1008.
    TokenExpired,
    UpstreamDnsError,
    UpstreamConnectError,
    UpstreamTimeout,
    UpstreamTlsError,
    /// The gateway answered the upgrade with a non-101 status (see `upstream_status`).
    UpstreamRejected,
    /// The gateway broke the HTTP or WebSocket protocol.
    UpstreamProtocolError,
    /// The TLS handshake with the browser failed (including non-TLS bytes).
    ClientTlsError,
    /// The browser did not finish TLS and its request headers within `handshake_timeout`.
    ClientTimeout,
    /// The browser closed the connection before sending any request.
    NoRequest,
    /// `proxy_protocol` is on and the connection did not start with a valid PROXY header.
    BadProxyHeader,
    /// The browser sent a close frame.
    ClientClosed,
    /// The gateway sent a close frame.
    UpstreamClosed,
    /// The browser's connection ended without a close frame.
    ClientGone,
    /// The gateway's connection ended without a close frame.
    UpstreamGone,
    /// A message exceeded `max_message_size`.
    MessageTooBig,
    /// The browser broke the WebSocket framing rules.
    ClientProtocolError,
    /// sigrelay was shutting down.
    Shutdown,
    /// The Origin is not in `allowed_origins`: 403.
    ForbiddenOrigin,
    /// `limits.max_connections` reached: closed with 1013.
    OverMaxConnections,
    /// `limits.max_connections_per_ip` reached for this client: closed with 1013.
    OverMaxConnectionsPerIp,
    /// The client's handshake rate (`handshakes_per_ip_per_s`, `handshake_burst`): closed with 1013.
    OverHandshakeRate,
    /// The CONNECT proxy (`upstream.proxy`) refused or failed.
    UpstreamProxyError,
    /// The browser stopped answering pings.
    ClientSilent,
    /// The gateway stopped answering pings.
    UpstreamSilent,
    /// No data message either way for `idle_timeout`.
    IdleTimeout,
    /// Closed through the admin API (`DELETE /connections/{id}`).
    ClosedByOperator,
    /// The `/diag` echo endpoint's bound on messages or time was reached.
    DiagLimit,
    /// The relay dropped a connection without deciding its outcome: a bug, please report it.
    RelayError,
}

impl Outcome {
    /// The word as it appears in records and close reasons.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NotWebsocket => "not_websocket",
            Outcome::NotFound => "not_found",
            Outcome::BadRequest => "bad_request",
            Outcome::BadRegion => "bad_region",
            Outcome::TokenExpired => "token_expired",
            Outcome::UpstreamDnsError => "upstream_dns_error",
            Outcome::UpstreamConnectError => "upstream_connect_error",
            Outcome::UpstreamTimeout => "upstream_timeout",
            Outcome::UpstreamTlsError => "upstream_tls_error",
            Outcome::UpstreamRejected => "upstream_rejected",
            Outcome::UpstreamProtocolError => "upstream_protocol_error",
            Outcome::ClientTlsError => "client_tls_error",
            Outcome::ClientTimeout => "client_timeout",
            Outcome::NoRequest => "no_request",
            Outcome::BadProxyHeader => "bad_proxy_header",
            Outcome::ClientClosed => "client_closed",
            Outcome::UpstreamClosed => "upstream_closed",
            Outcome::ClientGone => "client_gone",
            Outcome::UpstreamGone => "upstream_gone",
            Outcome::MessageTooBig => "message_too_big",
            Outcome::ClientProtocolError => "client_protocol_error",
            Outcome::Shutdown => "shutdown",
            Outcome::ForbiddenOrigin => "forbidden_origin",
            Outcome::OverMaxConnections => "over_max_connections",
            Outcome::OverMaxConnectionsPerIp => "over_max_connections_per_ip",
            Outcome::OverHandshakeRate => "over_handshake_rate",
            Outcome::UpstreamProxyError => "upstream_proxy_error",
            Outcome::ClientSilent => "client_silent",
            Outcome::UpstreamSilent => "upstream_silent",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::ClosedByOperator => "closed_by_operator",
            Outcome::DiagLimit => "diag_limit",
            Outcome::RelayError => "relay_error",
        }
    }

    /// The HTTP status a handshake that failed before the upgrade answers with.
    pub fn http_status(self) -> StatusCode {
        match self {
            Outcome::NotWebsocket => StatusCode::UPGRADE_REQUIRED,
            Outcome::NotFound => StatusCode::NOT_FOUND,
            Outcome::BadRequest | Outcome::BadRegion => StatusCode::BAD_REQUEST,
            Outcome::ForbiddenOrigin => StatusCode::FORBIDDEN,
            Outcome::Shutdown | Outcome::OverMaxConnections => StatusCode::SERVICE_UNAVAILABLE,
            Outcome::OverHandshakeRate => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The close code the browser gets when the relay gives up on an accepted WebSocket before
    /// relaying it. Browsers hide HTTP errors from scripts, so the code and the reason
    /// `<outcome> conn=<id>` are all a page can learn.
    pub fn client_close_code(self) -> u16 {
        match self {
            Outcome::TokenExpired => close_code::POLICY,
            Outcome::Shutdown => close_code::RESTART,
            Outcome::OverMaxConnectionsPerIp | Outcome::OverHandshakeRate => {
                close_code::TRY_AGAIN
            }
            _ => close_code::BAD_GATEWAY,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which side of a relayed connection did something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Client,
    Upstream,
    Relay,
}

impl Side {
    /// The other end of the relayed connection (the relay's is itself).
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
            Side::Relay => Side::Relay,
        }
    }

    /// The word records use (`closed_by`).
    pub fn word(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
            Side::Relay => "relay",
        }
    }
}

/// Close codes sigrelay sends itself.
pub mod close_code {
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const RESTART: u16 = 1012;
    pub const TRY_AGAIN: u16 = 1013;
    pub const BAD_GATEWAY: u16 = 1014;
}

/// Why the relay ended a relayed connection, and so what it tells each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// This side sent a close frame; it was forwarded as is.
    Closed(Side),
    /// This side's connection ended without a close frame.
    Gone(Side),
    /// This side sent a message over `max_message_size`.
    TooBig(Side),
    /// This side broke the framing rules (or sent a malformed close).
    ProtocolError(Side),
    /// This side sent a text message that is not UTF-8.
    InvalidData(Side),
    /// The relay is shutting down.
    Shutdown,
    /// This side answered none of the relay's pings.
    Silent(Side),
    /// No data message either way for `idle_timeout`.
    Idle,
    /// An operator closed it through the admin API.
    Operator,
}

impl Ending {
    /// The close record's outcome.
    pub fn outcome(self) -> Outcome {
        match self {
            Ending::Closed(Side::Upstream) => Outcome::UpstreamClosed,
            Ending::Closed(_) => Outcome::ClientClosed,
            Ending::Gone(Side::Upstream) => Outcome::UpstreamGone,
            Ending::Gone(_) => Outcome::ClientGone,
            Ending::TooBig(_) => Outcome::MessageTooBig,
            Ending::ProtocolError(Side::Upstream) | Ending::InvalidData(Side::Upstream) => Outcome::UpstreamProtocolError,
            Ending::ProtocolError(_) | Ending::InvalidData(_) => Outcome::ClientProtocolError,
            Ending::Shutdown => Outcome::Shutdown,
            Ending::Silent(Side::Upstream) => Outcome::UpstreamSilent,
            Ending::Silent(_) => Outcome::ClientSilent,
            Ending::Idle => Outcome::IdleTimeout,
            Ending::Operator => Outcome::ClosedByOperator,
        }
    }

    /// The close record's `closed_by`: who started the end.
    pub fn closed_by(self) -> Side {
        match self {
            Ending::Closed(side) | Ending::Gone(side) => side,
            Ending::TooBig(_)
            | Ending::ProtocolError(_)
            | Ending::InvalidData(_)
            | Ending::Shutdown
            | Ending::Silent(_)
            | Ending::Idle
            | Ending::Operator => Side::Relay,
        }
    }

    /// The side whose fault the ending is, when the relay fails the connection because of what
    /// it sent.
    pub fn at_fault(self) -> Option<Side> {
        match self {
            Ending::TooBig(side) | Ending::ProtocolError(side) | Ending::InvalidData(side) => Some(side),
            _ => None,
        }
    }

    /// The close code the relay itself sends to `to`, if it sends one (a forwarded close frame is
    /// not the relay's own).
    pub fn close_code_for(self, to: Side) -> Option<u16> {
        use close_code::*;
        match self {
            Ending::Closed(_) => None,
            Ending::Gone(side) if side == to => None,
            Ending::Gone(Side::Upstream) => Some(BAD_GATEWAY),
            Ending::Gone(_) => Some(GOING_AWAY),
            Ending::TooBig(side) if side == to => Some(TOO_BIG),
            Ending::ProtocolError(side) if side == to => Some(PROTOCOL),
            Ending::InvalidData(side) if side == to => Some(INVALID_DATA),
            // The browser learns that the gateway misbehaved; the gateway that the browser did.
            Ending::ProtocolError(Side::Upstream) => Some(BAD_GATEWAY),
            Ending::TooBig(_) | Ending::ProtocolError(_) | Ending::InvalidData(_) => Some(GOING_AWAY),
            Ending::Shutdown => Some(RESTART),
            Ending::Silent(_) | Ending::Idle | Ending::Operator => Some(GOING_AWAY),
        }
    }
}
