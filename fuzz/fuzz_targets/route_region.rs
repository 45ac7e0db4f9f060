//! The route and region parser, on any path and query against the shipped routes.
#![no_main]
static ROUTER: std::sync::OnceLock<sigrelay::route::Router> = std::sync::OnceLock::new();
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let router = ROUTER.get_or_init(|| sigrelay::route::Router::new(&sigrelay::Config::defaults()));
    sigrelay::tools::fuzz_checks::route_region(router, data)
});
