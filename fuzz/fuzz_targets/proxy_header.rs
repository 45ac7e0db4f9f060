//! The PROXY protocol header parser, on any bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sigrelay::tools::fuzz_checks::proxy_header(data));
