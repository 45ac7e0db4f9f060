//! Routing: which route a request names, and where its connection goes. Both steps live here:
//! [`Router::match_request`] checks the path and query before the 101 (a pure function), and
//! [`decide`] picks the region, its source and the gateway once the first message is known.
//!
//! The upstream host always comes from the configured template; nothing in the request (Host
//! header, absolute URI, query string) can name another one. Every route's URL for every allowed
//! region was built once, when the configuration was validated.

use std::collections::HashSet;
use std::sync::Arc;

use crate::config::{Config, RegionSource, Route, UpstreamTarget};
use crate::outcome::Outcome;
use crate::token::TokenInfo;

/// What a request path names.
#[derive(Debug)]
pub enum PathMatch<'a> {
    Route { index: usize, region: Option<&'a str> },
    /// `/<x>/<route>` where `x` is not an allowed region.
    BadRegion,
    NotFound,
}

/// Why a request cannot be routed. Always the client's doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no route for this path")]
    NoRoute,
    #[error("region in the path is not allowed")]
    PathRegion,
    #[error("region in the query is not allowed")]
    QueryRegion,
    #[error("more than one region in the query")]
    SeveralQueryRegions,
}

impl RouteError {
    /// The handshake record's outcome.
    pub fn outcome(self) -> Outcome {
        match self {
            RouteError::NoRoute => Outcome::NotFound,
            RouteError::PathRegion | RouteError::QueryRegion | RouteError::SeveralQueryRegions => Outcome::BadRegion,
        }
    }
}

/// A request matched to a route, with the (allowed) regions its path and query name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRequest {
    /// Index into [`Router`]'s routes.
    pub route: usize,
    pub path_region: Option<String>,
    pub query_region: Option<String>,
}

/// Where a connection goes and why.
#[derive(Debug, Clone)]
pub struct Decision {
    pub region: String,
    pub source: RegionSource,
    pub target: Arc<UpstreamTarget>,
    pub token: TokenFacts,
}

/// What the first message's token says, as the handshake record carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenFacts {
    pub present: bool,
    /// `twr`, cut to 32 characters: it is attacker-controlled text.
    pub region: Option<String>,
    pub exp: Option<i64>,
    pub expired: Option<bool>,
    /// Whether `twr` differs from the chosen region, on routes that route by token.
    pub region_mismatch: Option<bool>,
}

/// All routes, ready to match request paths.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
    regions: HashSet<String>,
}

impl Router {
    /// The router of a validated configuration.
    pub fn new(config: &Config) -> Router {
        Router { routes: config.routes.clone(), regions: config.regions.iter().cloned().collect() }
    }

    /// The route at an index from [`Router::match_path`] or a [`RouteRequest`].
    pub fn route(&self, index: usize) -> &Route {
        &self.routes[index]
    }

    /// Whether a region code is in the allow-list.
    pub fn is_allowed(&self, region: &str) -> bool {
        self.regions.contains(region)
    }

    /// Matches a request path (without query): the route's own path, or `/<region>` followed by it
    /// on a route that takes its region from the path.
    pub fn match_path<'a>(&'a self, path: &'a str) -> PathMatch<'a> {
        if let Some(index) = self.routes.iter().position(|r| r.path == path) {
            return PathMatch::Route { index, region: None };
        }
        let Some((prefix, _)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
            return PathMatch::NotFound;
        };
        let tail = &path[1 + prefix.len()..];
        let Some(index) = self.routes.iter().position(|r| r.path == tail && uses(r, RegionSource::Path)) else {
            return PathMatch::NotFound;
        };
        if prefix.is_empty() || !self.is_allowed(prefix) {
            return PathMatch::BadRegion;
        }
        PathMatch::Route { index, region: Some(prefix) }
    }

    /// The checks a request's path and query must pass before the 101.
    pub fn match_request(&self, path: &str, query: Option<&str>) -> Result<RouteRequest, RouteError> {
        let (index, path_region) = match self.match_path(path) {
            PathMatch::NotFound => return Err(RouteError::NoRoute),
            PathMatch::BadRegion => return Err(RouteError::PathRegion),
            PathMatch::Route { index, region } => (index, region.map(str::to_string)),
        };
        let query_region = if uses(self.route(index), RegionSource::Query) {
            match query_region(query)? {
                Some(r) if !self.is_allowed(r) => return Err(RouteError::QueryRegion),
                r => r.map(str::to_string),
            }
        } else {
            None
        };
        Ok(RouteRequest { route: index, path_region, query_region })
    }
}

/// Whether a route reads the region from the given source.
pub fn uses(route: &Route, source: RegionSource) -> bool {
    route.region_from.contains(&source)
}

/// The raw `region` query parameter, if any (not decoded: an encoded region is not allowed).
/// More than one is ambiguous (which would a proxy in front have looked at?), so refused.
pub fn query_region(query: Option<&str>) -> Result<Option<&str>, RouteError> {
    let mut regions = query.into_iter().flat_map(|q| q.split('&')).filter_map(|pair| pair.strip_prefix("region="));
    let first = regions.next();
    match regions.next() {
        Some(_) => Err(RouteError::SeveralQueryRegions),
        None => Ok(first),
    }
}

/// What the token can tell `choose`: nothing yet (the first message is not read), or its region.
enum TokenRegion<'a> {
    NotRead,
    Read(Option<&'a str>),
}

/// Picks the region in `region_from` order; `None` when the token decides and is not read yet.
/// A token region outside the allow-list is skipped.
fn choose(route: &Route, request: &RouteRequest, token: TokenRegion<'_>) -> Option<(String, RegionSource)> {
    for source in &route.region_from {
        let found = match source {
            RegionSource::Path => request.path_region.as_deref(),
            RegionSource::Query => request.query_region.as_deref(),
            RegionSource::Token => match token {
                TokenRegion::NotRead => return None,
                TokenRegion::Read(twr) => twr.filter(|r| route.targets.contains_key(*r)),
            },
            RegionSource::Default => None,
        };
        if let Some(region) = found {
            return Some((region.to_string(), *source));
        }
    }
    Some((route.default_region.clone(), RegionSource::Default))
}

/// The region and gateway a request goes to before its first message is read, when nothing in
/// that message can change them (the path or query decided, or the route ignores tokens).
pub fn early(route: &Route, request: &RouteRequest) -> Option<(String, Arc<UpstreamTarget>)> {
    let (region, _) = choose(route, request, TokenRegion::NotRead)?;
    let target = route.targets.get(&region).expect("chosen regions are allowed").clone();
    Some((region, target))
}

/// The routing decision for a request, given the first message's token (`present`: whether one
/// was found; `token`: what could be decoded of it) at `now` (unix seconds).
pub fn decide(route: &Route, request: &RouteRequest, present: bool, token: Option<&TokenInfo>, now: i64) -> Decision {
    let twr = token.and_then(|t| t.region.as_deref());
    let (region, source) = choose(route, request, TokenRegion::Read(twr)).expect("a read token decides");
    let target = route.targets.get(&region).expect("chosen regions are allowed").clone();
    let facts = TokenFacts {
        present,
        region: twr.map(|r| r.chars().take(32).collect()),
        exp: token.and_then(|t| t.exp),
        expired: token.and_then(|t| t.exp.map(|_| t.expired_at(now))),
        region_mismatch: if uses(route, RegionSource::Token) { twr.map(|t| t != region) } else { None },
    };
    Decision { region, source, target, token: facts }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        Router::new(&Config::defaults())
    }

    fn request(path: Option<&str>, query: Option<&str>) -> RouteRequest {
        RouteRequest { route: 0, path_region: path.map(Into::into), query_region: query.map(Into::into) }
    }

    fn info(twr: &str) -> TokenInfo {
        TokenInfo { region: Some(twr.into()), ..Default::default() }
    }

    #[test]
    fn matches_plain_and_region_prefixed_paths() {
        let r = router();
        assert!(matches!(r.match_path("/signaling"), PathMatch::Route { region: None, .. }));
        assert!(matches!(r.match_path("/au1/signaling"), PathMatch::Route { region: Some("au1"), .. }));
        assert!(matches!(r.match_path("/xx1/signaling"), PathMatch::BadRegion));
        assert!(matches!(r.match_path("/..%2f/signaling"), PathMatch::BadRegion));
        assert!(matches!(r.match_path("//signaling"), PathMatch::BadRegion));
        assert!(matches!(r.match_path("/a/b/signaling"), PathMatch::NotFound));
        assert!(matches!(r.match_path("/signaling/"), PathMatch::NotFound));
        assert!(matches!(r.match_path("/"), PathMatch::NotFound));
        assert!(matches!(r.match_path("/de1/v1/VideoEvents"), PathMatch::Route { region: Some("de1"), .. }));
        assert_eq!(r.match_request("/signaling", Some("region=zz9")), Err(RouteError::QueryRegion));
        assert_eq!(r.match_request("/signaling", Some("region=de1")).unwrap().query_region.as_deref(), Some("de1"));
    }

    #[test]
    fn chooses_in_region_from_order() {
        let r = router();
        let route = r.route(0);
        let d = |req: &RouteRequest, twr: Option<&str>| {
            let token = twr.map(info);
            decide(route, req, token.is_some(), token.as_ref(), 0)
        };
        assert_eq!(d(&request(Some("au1"), Some("de1")), None).source, RegionSource::Path);
        assert_eq!(d(&request(None, Some("de1")), None).region, "de1");
        assert_eq!(early(route, &request(None, None)), None, "waits for the token");
        assert_eq!(early(route, &request(None, Some("de1"))).unwrap().0, "de1");
        assert_eq!(d(&request(None, None), Some("jp1")).source, RegionSource::Token);
        let fallback = d(&request(None, None), Some("zz9"));
        assert_eq!((fallback.region.as_str(), fallback.source), ("gll", RegionSource::Default));
        assert_eq!(fallback.token.region_mismatch, Some(true));
        assert_eq!(route.targets["gll"].url, "wss://global.vss.twilio.com/signaling");
        assert_eq!(route.targets["au1"].host, "au1.vss.twilio.com");
        assert_eq!(d(&request(Some("de1"), None), Some("au1")).token.region_mismatch, Some(true));
        // The insights route does not route by token: no mismatch is claimed.
        let insights = decide(r.route(1), &request(None, None), true, Some(&info("au1")), 0);
        assert_eq!((insights.region.as_str(), insights.token.region_mismatch), ("us1", None));
    }

    #[test]
    fn query_region_is_taken_raw() {
        assert_eq!(query_region(Some("a=1&region=au1")), Ok(Some("au1")));
        assert_eq!(query_region(Some("region=au%31")), Ok(Some("au%31")));
        assert_eq!(query_region(Some("regions=au1")), Ok(None));
        assert_eq!(query_region(None), Ok(None));
        assert_eq!(query_region(Some("region=au1&region=evil.example.com")), Err(RouteError::SeveralQueryRegions));
        assert_eq!(query_region(Some("region=au1&region=au1")), Err(RouteError::SeveralQueryRegions));
    }
}
