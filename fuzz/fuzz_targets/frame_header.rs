//! The frame-header codec, on any bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sigrelay::tools::fuzz_checks::frame_header(data));
