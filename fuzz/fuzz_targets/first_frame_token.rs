//! The first-message token reader, on any payload.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sigrelay::tools::fuzz_checks::first_frame_token(data));
