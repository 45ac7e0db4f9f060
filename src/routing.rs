//! Routing: which route a request path names, which region it goes to, and the upstream URL.
//!
//! The upstream host always comes from the configured template; nothing in the request (Host
//! header, absolute URI, query string) can name another one. Every route's URL for every allowed
//! region is built once, at start-up.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use rustls_pki_types::ServerName;

use crate::config::{Config, Route};

/// Where a region code came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionSource {
    Path,
    Query,
    Token,
    Default,
}

impl RegionSource {
    /// Parses a `region_from` entry (`default` is implied, not listed).
    pub fn parse(s: &str) -> Option<RegionSource> {
        match s {
            "path" => Some(RegionSource::Path),
            "query" => Some(RegionSource::Query),
            "token" => Some(RegionSource::Token),
            _ => None,
        }
    }

    /// The word written to records (`region_source`).
    pub fn as_str(self) -> &'static str {
        match self {
            RegionSource::Path => "path",
            RegionSource::Query => "query",
            RegionSource::Token => "token",
            RegionSource::Default => "default",
        }
    }
}

/// A resolved upstream: a `wss://` URL split into what the connector needs.
#[derive(Debug, Clone)]
pub struct UpstreamTarget {
    pub url: String,
    pub host: String,
    pub port: u16,
    pub path_and_query: String,
    pub server_name: ServerName<'static>,
}

impl UpstreamTarget {
    /// Fills `{region}` in a template with a host label and checks the result is a usable
    /// `wss://` URL.
    pub fn from_template(template: &str, label: &str) -> Result<UpstreamTarget, String> {
        let url = template.replace("{region}", label);
        let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        if uri.scheme_str() != Some("wss") {
            return Err("must start with wss://".into());
        }
        let authority = uri.authority().ok_or("has no host")?;
        if authority.as_str().contains('@') {
            return Err("must not carry user info".into());
        }
        let host = authority.host().to_ascii_lowercase();
        let server_name = ServerName::try_from(host.clone()).map_err(|_| format!("{host:?} is not a valid host name"))?;
        let path_and_query = uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
        Ok(UpstreamTarget { port: authority.port_u16().unwrap_or(443), url, host, path_and_query, server_name })
    }
}

/// A configured route with its upstream for every allowed region.
#[derive(Debug)]
pub struct RouteEntry {
    pub route: Route,
    targets: HashMap<String, Arc<UpstreamTarget>>,
}

/// The region chosen for a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub region: String,
    pub source: RegionSource,
}

impl RouteEntry {
    /// Whether this route reads the region from the given source.
    pub fn uses(&self, source: RegionSource) -> bool {
        self.route.region_from.contains(&source)
    }

    /// Picks the region in `region_from` order. `token` is `None` while the first message has not
    /// been read, and then `Some(twr)`; a token region that is not allowed is skipped. Returns
    /// `None` when the token decides and is not known yet.
    pub fn choose(&self, path: Option<&str>, query: Option<&str>, token: Option<Option<&str>>) -> Option<Chosen> {
        for source in &self.route.region_from {
            let found = match source {
                RegionSource::Path => path,
                RegionSource::Query => query,
                RegionSource::Token => match token {
                    None => return None,
                    Some(twr) => twr.filter(|r| self.targets.contains_key(*r)),
                },
                RegionSource::Default => None,
            };
            if let Some(region) = found {
                return Some(Chosen { region: region.to_string(), source: *source });
            }
        }
        Some(Chosen { region: self.route.default_region.clone(), source: RegionSource::Default })
    }

    /// `region_mismatch`: whether the token's region differs from the chosen one, when this route
    /// routes by token and the token names a region.
    pub fn region_mismatch(&self, token_region: Option<&str>, chosen: &str) -> Option<bool> {
        if !self.uses(RegionSource::Token) {
            return None;
        }
        token_region.map(|t| t != chosen)
    }

    /// The upstream for an allowed region.
    pub fn target(&self, region: &str) -> Option<Arc<UpstreamTarget>> {
        self.targets.get(region).cloned()
    }
}

/// What a request path names.
#[derive(Debug)]
pub enum PathMatch<'a> {
    Route { index: usize, region: Option<&'a str> },
    /// `/<x>/<route>` where `x` is not an allowed region.
    BadRegion,
    NotFound,
}

/// All routes, ready to match request paths.
#[derive(Debug)]
pub struct Router {
    entries: Vec<RouteEntry>,
    regions: HashSet<String>,
}

impl Router {
    /// Builds the router from a validated config.
    pub fn new(config: &Config) -> Router {
        let entries = config
            .routes
            .iter()
            .map(|route| {
                let targets = config
                    .regions
                    .iter()
                    .map(|region| {
                        let target = UpstreamTarget::from_template(&route.upstream, route.host_label(region))
                            .expect("config validation checked every template");
                        (region.clone(), Arc::new(target))
                    })
                    .collect();
                RouteEntry { route: route.clone(), targets }
            })
            .collect();
        Router { entries, regions: config.regions.iter().cloned().collect() }
    }

    /// The route at an index returned by [`Router::match_path`].
    pub fn entry(&self, index: usize) -> &RouteEntry {
        &self.entries[index]
    }

    /// Whether a region code is in the allow-list.
    pub fn is_allowed(&self, region: &str) -> bool {
        self.regions.contains(region)
    }

    /// Matches a request path (without query): the route's own path, or `/<region>` followed by it
    /// on a route that takes its region from the path.
    pub fn match_path<'a>(&'a self, path: &'a str) -> PathMatch<'a> {
        if let Some(index) = self.entries.iter().position(|e| e.route.path == path) {
            return PathMatch::Route { index, region: None };
        }
        let Some((prefix, _)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
            return PathMatch::NotFound;
        };
        let tail = &path[1 + prefix.len()..];
        let Some(index) = self.entries.iter().position(|e| e.route.path == tail && e.uses(RegionSource::Path)) else {
            return PathMatch::NotFound;
        };
        if prefix.is_empty() || !self.is_allowed(prefix) {
            return PathMatch::BadRegion;
        }
        PathMatch::Route { index, region: Some(prefix) }
    }

    /// The raw `region` query parameter, if any (not decoded: an encoded region is not allowed).
    pub fn query_region(query: Option<&str>) -> Option<&str> {
        query?.split('&').find_map(|pair| pair.strip_prefix("region="))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        Router::new(&Config::defaults())
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
    }

    #[test]
    fn chooses_in_region_from_order() {
        let r = router();
        let PathMatch::Route { index, .. } = r.match_path("/signaling") else { panic!() };
        let entry = r.entry(index);
        let c = |p, q, t| entry.choose(p, q, t);
        assert_eq!(c(Some("au1"), Some("de1"), None).unwrap().source, RegionSource::Path);
        assert_eq!(c(None, Some("de1"), None).unwrap().region, "de1");
        assert_eq!(c(None, None, None), None, "waits for the token");
        assert_eq!(c(None, None, Some(Some("jp1"))).unwrap().source, RegionSource::Token);
        assert_eq!(c(None, None, Some(Some("zz9"))).unwrap(), Chosen { region: "gll".into(), source: RegionSource::Default });
        assert_eq!(entry.target("gll").unwrap().url, "wss://global.vss.twilio.com/signaling");
        assert_eq!(entry.target("au1").unwrap().host, "au1.vss.twilio.com");
        assert_eq!(entry.region_mismatch(Some("au1"), "de1"), Some(true));
    }

    #[test]
    fn query_region_is_taken_raw() {
        assert_eq!(Router::query_region(Some("a=1&region=au1")), Some("au1"));
        assert_eq!(Router::query_region(Some("region=au%31")), Some("au%31"));
        assert_eq!(Router::query_region(Some("regions=au1")), None);
    }
}
